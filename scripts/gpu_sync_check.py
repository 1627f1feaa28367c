"""Check that an MDEQ-Tiny training step never waits for the host inside the DEQ layer, then capture it.

    python scripts/gpu_sync_check.py                      # on a GPU: about a minute
    python scripts/gpu_sync_check.py --device cpu --tiny  # the same path on a CPU, in seconds

1. Sync check. For UPG, NPG, JFB and Implicit (with a sync-free Broyden backward solve), MDEQ-Tiny
   with sync-free solvers (``check_every=None``) takes a warm-up step, then a step in which the DEQ
   layer's forward and the whole backward pass run under ``torch.cuda.set_sync_debug_mode("error")``:
   any host sync there raises and is reported with the operation that made it. On a CPU there is no
   such mode; ``Tensor.item``, ``tolist``, ``__bool__`` and ``nonzero`` are made to raise instead (the
   ways Python code reads a device value; a sync inside an operator, such as boolean-mask indexing or
   ``.cpu()``, only CUDA's mode sees).
2. Capture. The forward and loss of a UPG step are compiled whole with ``torch.compile(fullgraph=True,
   mode="reduce-overhead")`` (CUDA graphs on CUDA; ``backend="aot_eager"`` on a CPU), and the loss and
   gradients are compared with the eager step; on CUDA the median step times of both are printed.

Prints one line per check and, with ``--json FILE``, writes every result there. Exit status 0 when
every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # works without `pip install -e .`

import phantomgrad as pg  # noqa: E402
from phantomgrad.models.mdeq import MDEQ, MDEQConfig  # noqa: E402

HOST_READS = ("item", "tolist", "__bool__", "nonzero")


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """Inside the block a host sync raises: CUDA's sync debug mode, or on a CPU the Tensor methods that read
    a value back to Python patched to raise."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name: str) -> Any:
        def method(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"host sync: Tensor.{name} called")

        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def build(args: argparse.Namespace, backward: pg.BackwardMode) -> MDEQ:
    torch.manual_seed(0)
    cfg = MDEQConfig.named("mdeq-tiny", in_channels=3, image_size=args.image_size, num_classes=10)
    solver = pg.Broyden(max_iter=args.solver_iter, tol=1e-4, check_every=args.check_every, fused=args.fused)
    return MDEQ(cfg, solver=solver, backward=backward).to(args.device)


def modes(args: argparse.Namespace) -> dict[str, pg.BackwardMode]:
    backward_solver = pg.Broyden(max_iter=args.solver_iter, tol=1e-6, check_every=args.check_every, fused=args.fused)
    return {
        "upg": pg.UPG(k=5, damping=0.5),
        "npg": pg.NPG(k=5, damping=0.5),
        "jfb": pg.JFB(),
        "implicit": pg.Implicit(backward_solver),
    }


def sync_check(args: argparse.Namespace, name: str, backward: pg.BackwardMode) -> dict[str, Any]:
    """One warm-up step, then one step with host syncs refused in the DEQ layer and the backward pass."""
    device = torch.device(args.device)
    model = build(args, backward)
    model.train()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    refuse = contextlib.ExitStack()

    def on(module: Any, inputs: Any) -> None:
        refuse.enter_context(no_host_sync(device))

    def off(module: Any, inputs: Any, output: Any) -> None:
        refuse.close()

    def step(checked: bool) -> None:
        hooks = [model.deq.register_forward_pre_hook(on), model.deq.register_forward_hook(off)] if checked else []
        try:
            logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            with no_host_sync(device) if checked else contextlib.nullcontext():
                loss.backward()
        finally:
            refuse.close()
            for hook in hooks:
                hook.remove()
        model.zero_grad(set_to_none=True)

    step(False)
    try:
        step(True)
    except RuntimeError as err:
        return {"check": f"no host sync in the DEQ layer, {name}", "ok": False, "detail": str(err).splitlines()[0]}
    return {"check": f"no host sync in the DEQ layer, {name}", "ok": True, "detail": ""}


def capture_check(args: argparse.Namespace) -> dict[str, Any]:
    """The UPG step's forward and loss compiled whole; loss and gradients against eager, and times on CUDA."""
    device = torch.device(args.device)
    model = build(args, pg.UPG(k=5, damping=0.5))
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, _ = model(x)
        return torch.nn.functional.cross_entropy(logits, y)

    if device.type == "cuda":
        compiled = torch.compile(forward_loss, fullgraph=True, mode="reduce-overhead")
    else:
        compiled = torch.compile(forward_loss, fullgraph=True, backend="aot_eager")
    results: dict[str, list[float]] = {}
    grads = {}
    for label, fn in (("eager", forward_loss), ("captured", compiled)):
        times = []
        for _ in range(args.repeats + 2):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if label == "captured" and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the graph may reuse its outputs
            loss = fn(x, y)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[label] = times[2:]  # the first two compile (and record the graph)
        grads[label] = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        results[label + "_loss"] = [float(loss.detach())]
    close = len(grads["eager"]) == len(grads["captured"]) and all(
        torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(grads["eager"], grads["captured"])
    )
    eager_ms = 1e3 * statistics.median(results["eager"])
    captured_ms = 1e3 * statistics.median(results["captured"])
    detail = (
        f"loss {results['eager_loss'][0]:.6f} eager vs {results['captured_loss'][0]:.6f} captured, gradients "
        f"{'close' if close else 'DIFFER'}; median step {eager_ms:.2f} ms eager, {captured_ms:.2f} ms captured"
    )
    return {
        "check": "whole UPG step captured (torch.compile fullgraph"
        + (", reduce-overhead)" if device.type == "cuda" else ")"),
        "ok": close,
        "detail": detail,
        "eager_ms": eager_ms,
        "captured_ms": captured_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="image size 8, 4 solver steps, batch 2 (a quick run)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--fused", action="store_true", help="solvers with fused=True")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--host-checks",
        dest="check_every",
        action="store_const",
        const=1,
        default=None,
        help="solvers with check_every=1 instead of None: the sync check must then fail (a control)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.image_size, args.solver_iter = (8, 4) if args.tiny else (32, 30)
    if args.tiny:
        args.batch, args.repeats = 2, 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_sync_check: --device cuda but no GPU here; run with --device cpu --tiny for the CPU path")
        return 2
    results = [sync_check(args, name, mode) for name, mode in modes(args).items()]
    if args.check_every is None:  # a solve that reads the host cannot be captured whole
        results.append(capture_check(args))
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}" + (f": {r['detail']}" if r["detail"] else ""))
    if args.json is not None:
        device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
        meta = {"device": device, "torch": torch.__version__, "batch": args.batch, "fused": args.fused}
        args.json.write_text(json.dumps({**meta, "results": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
