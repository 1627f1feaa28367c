"""The paper's synthetic study (Fig. 1): how close are phantom gradients to the exact one?

Setting: one implicit layer h = tanh(W h + U x + b) (:class:`~phantomgrad.models.toy.TanhMap`)
with W scaled to spectral norm ``lipschitz`` (0.9), so F is a contraction with that Lipschitz constant; the loss is
||h* - y||^2 / 2 for random targets y. The fixed point is found by fixed-point
iteration (100 steps, relative tolerance 1e-5). The exact gradient is backprop
through those iterations, cross-checked by implicit differentiation with Broyden.
For UPG and NPG with k = 1..K and lambda in {0.5, 0.8, 1.0} we report the cosine
between the phantom gradient (over W, U, b) and the exact one, averaged over
``trials`` random layers.

Every method side by side (:func:`compare_methods`, the command ``phantomgrad methods``): each
backward mode of :data:`phantomgrad.modes.BACKWARD_MODES` with the run's forward solver (a mode
that refuses it, as SHINE refuses all but Broyden, gets the first registered solver it accepts,
named in its row), plus Reversible + Backprop (RevDEQ's exact gradient of the reversible
iteration). On the synthetic layer and on MDEQ-Tiny (digits, float64, after a few training steps)
each gets the cosine of its gradient of F's parameters to the exact implicit gradient, its F
evaluations in the forward and the backward, and the bytes it saves for backward.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import nn

import phantomgrad as pg

from ..models.toy import TanhMap
from ..modes import BACKWARD_MODES
from ..solvers import SOLVERS
from .bench.instruments import FCounter
from .bench.modes import takes

log = logging.getLogger(__name__)


@dataclass
class CosineConfig:
    dim: int = 64
    in_dim: int = 32
    batch: int = 32
    lipschitz: float = 0.9
    max_k: int = 10
    dampings: tuple[float, ...] = (0.5, 0.8, 1.0)
    trials: int = 5
    solver_steps: int = 100
    solver_tol: float = 1e-5
    seed: int = 0


@dataclass
class CosineResult:
    config: CosineConfig
    implicit_vs_backprop: list[float] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # mode, damping, k, mean, std
    seconds: float = 0.0


def _gradient(layer: nn.Module, deq: pg.DEQ, x, y) -> torch.Tensor:
    layer.zero_grad()
    h, _ = deq(x, torch.zeros(x.shape[0], y.shape[1], dtype=x.dtype))
    (0.5 * (h - y).pow(2).sum()).backward()
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in layer.parameters()])


def run_study(cfg: CosineConfig) -> CosineResult:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    solver = pg.FixedPoint(max_iter=cfg.solver_steps, tol=cfg.solver_tol)
    cos = torch.nn.functional.cosine_similarity
    result = CosineResult(cfg)
    samples: dict[tuple[str, float, int], list[float]] = {}
    for _ in range(cfg.trials):
        layer = TanhMap(cfg.dim, cfg.in_dim, cfg.lipschitz, generator=gen)
        x = torch.randn(cfg.batch, cfg.in_dim, generator=gen, dtype=torch.float64)
        y = torch.randn(cfg.batch, cfg.dim, generator=gen, dtype=torch.float64)
        exact = _gradient(layer, pg.DEQ(layer, solver=solver, backward=pg.Backprop()), x, y)
        implicit = _gradient(
            layer, pg.DEQ(layer, solver=solver, backward=pg.Implicit(pg.Broyden(max_iter=100, tol=1e-10))), x, y
        )
        result.implicit_vs_backprop.append(float(cos(exact, implicit, dim=0)))
        for mode_cls in (pg.UPG, pg.NPG):
            for lam in cfg.dampings:
                for k in range(1, cfg.max_k + 1):
                    g = _gradient(layer, pg.DEQ(layer, solver=solver, backward=mode_cls(k=k, damping=lam)), x, y)
                    samples.setdefault((mode_cls.__name__, lam, k), []).append(float(cos(exact, g, dim=0)))
    for (mode, lam, k), values in samples.items():
        t = torch.tensor(values, dtype=torch.float64)
        std = float(t.std()) if len(values) > 1 else 0.0
        result.rows.append({"mode": mode, "damping": lam, "k": k, "cosine_mean": float(t.mean()), "cosine_std": std})
    result.seconds = time.perf_counter() - start
    return result


def write_outputs(result: CosineResult, out_dir: Path) -> list[Path]:
    """CSV of every (mode, lambda, k) cosine and a PNG plot like the paper's Fig. 1."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "cosine.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["mode", "damping", "k", "cosine_mean", "cosine_std"])
        writer.writeheader()
        writer.writerows(result.rows)
    png_path = out_dir / "cosine.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("UPG", "NPG")):
        for lam in result.config.dampings:
            rows = [r for r in result.rows if r["mode"] == mode and r["damping"] == lam]
            ks = [r["k"] for r in rows]
            ax.errorbar(
                ks,
                [r["cosine_mean"] for r in rows],
                yerr=[r["cosine_std"] for r in rows],
                marker="o",
                capsize=2,
                label=f"lambda = {lam}",
            )
        ax.set_title(f"{mode}: cosine to the exact gradient")
        ax.set_xlabel("k (phantom steps)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("cosine similarity")
    fig.suptitle(f"h = tanh(Wh + Ux + b), Lipschitz {result.config.lipschitz}, {result.config.trials} random layers")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return [csv_path, png_path]


def format_table(result: CosineResult) -> str:
    cfg = result.config
    header = "| k | " + " | ".join(f"{m} l={lam}" for m in ("UPG", "NPG") for lam in cfg.dampings) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(cfg.dampings))]
    lookup = {(r["mode"], r["damping"], r["k"]): r["cosine_mean"] for r in result.rows}
    for k in range(1, cfg.max_k + 1):
        cells = [f"{lookup[(m, lam, k)]:.4f}" for m in ("UPG", "NPG") for lam in cfg.dampings]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CosineConfig()
    parser.add_argument("--max-k", type=int, default=d.max_k, help="largest k (default %(default)s)")
    parser.add_argument(
        "--trials", type=int, default=d.trials, help="random layers to average over (default %(default)s)"
    )
    parser.add_argument("--dim", type=int, default=d.dim, help="state size (default %(default)s)")
    parser.add_argument("--lipschitz", type=float, default=d.lipschitz, help="spectral norm of W (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", type=Path, default=Path("runs/cosine"), help="directory for cosine.csv and cosine.png")
    parser.add_argument("--json", type=Path, default=None, help="also write a machine-readable summary here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default %(default)s: the layer's products are too small to share; on a "
        "loaded 2-core machine torch's default of 2 threads took 75 s instead of 9 s)",
    )


def check_lipschitz_and_set_threads(args: argparse.Namespace) -> None:
    """The checks and the thread count shared by ``cosine`` and ``methods``: --lipschitz in (0, 1), --threads >= 1."""
    if not 0 < args.lipschitz < 1:
        raise ValueError(f"--lipschitz must be in (0, 1) for a contraction, got {args.lipschitz}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def run(args: argparse.Namespace) -> int:
    if args.max_k < 1 or args.trials < 1:
        raise ValueError("--max-k and --trials must be >= 1")
    check_lipschitz_and_set_threads(args)
    return _run_fig1(args)


def machine() -> dict:
    """Where a result was measured."""
    import os
    import platform

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def _run_fig1(args: argparse.Namespace) -> int:
    cfg = CosineConfig(max_k=args.max_k, trials=args.trials, dim=args.dim, lipschitz=args.lipschitz, seed=args.seed)
    result = run_study(cfg)
    paths = write_outputs(result, args.out)
    worst = min(result.implicit_vs_backprop)
    print(f"exact gradient check: cosine(Implicit+Broyden, Backprop through {cfg.solver_steps} steps) >= {worst:.6f}")
    print(format_table(result))
    print(f"wrote {', '.join(map(str, paths))} in {result.seconds:.1f} s")
    if args.json:
        summary = {
            "config": asdict(cfg),
            "implicit_vs_backprop": result.implicit_vs_backprop,
            "rows": result.rows,
            "seconds": result.seconds,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    if worst <= 0.9999:
        print("error: the exact-gradient cross-check failed (cosine <= 0.9999)")
        return 1
    return 0


# ----------------------------------------------------------------------------- every method side by side


@dataclass
class MethodsConfig:
    """Every gradient method on one batch: its cosine to the exact gradient, its evaluations of F
    and the memory it saves for backward (see :func:`compare_methods`)."""

    models: tuple[str, ...] = ("synthetic", "mdeq-tiny")
    batch: int = 32
    dim: int = 64  # synthetic: state size
    in_dim: int = 32  # synthetic: input size
    lipschitz: float = 0.9  # synthetic: ||W||_2
    solver: str = "broyden"  # the forward solver of every method (a mode that refuses it gets one it accepts)
    # Broyden keeps as many updates as it takes steps (TorchDEQ's default, as in the bench)
    solver_iter: int = 30
    solver_tol: float = 1e-6
    k: int = 5  # UPG, NPG, AdaptivePhantom (its starting k)
    damping: float = 0.5
    backward_iter: int = 30  # a mode with a backward solve (Implicit): Broyden steps
    backward_tol: float = 1e-6
    beta: float = 0.5  # the Reversible + Backprop row
    ref_iter: int = 200  # the exact gradient: Implicit, tight Broyden solves in both directions
    ref_tol: float = 1e-9
    mdeq_warmup: int = 30  # MDEQ-Tiny: training steps before the comparison (see _warm_up)
    trials: int = 3  # batches (synthetic: random layers) per model
    seed: int = 0


METHOD_MODELS: tuple[str, ...] = ("synthetic", "mdeq-tiny")


@dataclass(frozen=True)
class Method:
    """A backward mode of :data:`~phantomgrad.modes.BACKWARD_MODES` with a forward solver of
    :data:`~phantomgrad.solvers.SOLVERS` (None: the run's)."""

    mode: str
    solver: str | None = None


def methods() -> list[Method]:
    """Every registered backward mode with the run's forward solver, then Reversible + Backprop
    (the exact gradient of the reversible iteration, by reconstruction)."""
    return [Method(name) for name in BACKWARD_MODES] + [Method("backprop", "reversible")]


def _build_solver(cfg: MethodsConfig, name: str, max_iter: int, tol: float) -> pg.Solver:
    cls = SOLVERS[name]
    options: dict[str, Any] = {"max_iter": max_iter, "tol": tol, "stop": "rel", "beta": cfg.beta, "memory": max_iter}
    return cls(**{key: val for key, val in options.items() if takes(cls, key)})


def build_method(cfg: MethodsConfig, method: Method) -> tuple[pg.Solver, pg.BackwardMode, str]:
    """The forward solver, the backward mode and the solver's registry name. A mode that refuses
    the run's solver (SHINE needs Broyden's inverse-Jacobian estimate) gets the first registered
    solver it accepts, and the row says so: no mode is ever run with a solver it refuses."""
    cls = BACKWARD_MODES[method.mode]
    options: dict = {"k": cfg.k, "damping": cfg.damping}
    options["solver"] = pg.Broyden(max_iter=cfg.backward_iter, tol=cfg.backward_tol, stop="rel")
    mode = cls(**{key: val for key, val in options.items() if key in cls.config_keys})
    names = [method.solver or cfg.solver] + ([] if method.solver else list(SOLVERS))
    for name in names:
        solver = _build_solver(cfg, name, cfg.solver_iter, cfg.solver_tol)
        try:
            mode.check_solver(solver)
        except ValueError:
            continue
        return solver, mode, name
    raise ValueError(f"backward mode {method.mode!r} accepts none of the solvers {names}")


@dataclass
class _Task:
    """One model cut at the DEQ: ``prepare() -> (u, z0)``, the layer, F, and ``loss(z)``."""

    deq: pg.DEQ
    block: nn.Module
    prepare: Callable[[], tuple]
    loss: Callable[[Any], torch.Tensor]  # z: a tensor or a tuple of tensors


def _task(cfg: MethodsConfig, model: str, trial: int) -> _Task:
    gen = torch.Generator().manual_seed(cfg.seed + trial)
    if model == "synthetic":  # Fig. 1's layer and loss, in float64
        layer = TanhMap(cfg.dim, cfg.in_dim, cfg.lipschitz, generator=gen)
        x = torch.randn(cfg.batch, cfg.in_dim, generator=gen, dtype=torch.float64)
        y = torch.randn(cfg.batch, cfg.dim, generator=gen, dtype=torch.float64)
        return _Task(
            pg.DEQ(layer, warn_not_converged=False),
            layer,
            lambda: (x, torch.zeros(cfg.batch, cfg.dim, dtype=torch.float64)),
            lambda h: 0.5 * (h - y).pow(2).sum(),
        )
    if model == "mdeq-tiny":  # MDEQ-Tiny (random weights) on a batch of the 8x8 digits, in float64
        from ..data.digits import load_digits
        from ..models.mdeq import MDEQ, MDEQConfig

        torch.manual_seed(cfg.seed + trial)
        net = MDEQ(MDEQConfig.named("mdeq-tiny", in_channels=1, image_size=8, num_classes=10))
        net.deq.warn_not_converged = False
        data, _ = load_digits("train")
        images, labels = data.images, data.labels
        _warm_up(net, images, labels, cfg.mdeq_warmup, gen)
        net.double().train()
        idx = torch.randperm(len(labels), generator=gen)[: cfg.batch]
        x, y = images[idx].double(), labels[idx]
        return _Task(
            net.deq, net.block, lambda: net.prepare(x), lambda z: torch.nn.functional.cross_entropy(net.head(z), y)
        )
    raise ValueError(f"unknown model {model!r}; choose from {list(METHOD_MODELS)}")


def _warm_up(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, gen: torch.Generator) -> None:
    """``steps`` Adam steps (lr 1e-3, batch 32, UPG A_{5,0.5}, Anderson 20 steps) on the digits:
    at random initialisation MDEQ-Tiny has no fixed point the solvers reach (relative residual
    ~0.1 after 100 Broyden steps); a few training steps make F contract, so an exact gradient exists."""
    if steps == 0:
        return
    deq = cast(pg.DEQ, net.deq)
    deq.solver, deq.backward_mode = pg.Anderson(max_iter=20, tol=1e-4), pg.UPG(k=5, damping=0.5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (32,), generator=gen)
        logits, _ = net(images[idx])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits, labels[idx]).backward()
        opt.step()


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the ``with`` block
    (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, leaving out
    the storages of ``existing`` tensors (parameters, the injection: kept anyway).

    ``total`` counts every tensor saved, ``retained`` only those still alive when read (a graph
    built and dropped inside the block, such as a probe evaluation, no longer holds its tensors)."""

    def __init__(self, existing: list[torch.Tensor]):
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.storages: dict[int, int] = {}
        self.refs: dict[int, list[weakref.ref]] = {}
        self.dropped = 0  # bytes of saved storages freed since (their address may be reused)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip:
            if ptr in self.refs and all(r() is None for r in self.refs[ptr]):  # a new storage at a freed address
                self.dropped += self.storages[ptr]
                self.refs[ptr] = []
            self.storages[ptr] = storage.nbytes()
        # the graph keeps what the hook returns: a detached alias, as the tensor itself (an output of
        # the node that saves it) would make a cycle through C++ that outlives the graph
        saved = t.detach()
        if ptr not in self.skip:
            self.refs.setdefault(ptr, []).append(weakref.ref(saved))
        return saved

    @property
    def total(self) -> int:
        return self.dropped + sum(self.storages.values())

    @property
    def retained(self) -> int:
        gc.collect()  # a saved output and its graph form a reference cycle
        alive = [ptr for ptr, refs in self.refs.items() if any(r() is not None for r in refs)]
        return sum(self.storages[ptr] for ptr in alive)

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _step(task: _Task, solver: pg.Solver, mode: pg.BackwardMode, seed: int, counter: FCounter | None = None):
    """One forward and backward of the task under (solver, mode); returns (grad of F's params,
    (bytes saved for backward by the DEQ layer, of which still held when it returns), bytes of an
    inverse-Jacobian estimate kept for the backward, info)."""
    mode.check_solver(solver)
    task.deq.solver, task.deq.backward_mode = solver, mode
    task.block.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks for every method
    u, z0 = task.prepare()
    params = [p for p in task.block.parameters() if p.requires_grad]
    with SavedBytes(params + _tensors(u) + _tensors(z0)) as saved:
        z, info = task.deq(u, z0)
    saved_bytes = (saved.total, saved.retained)
    held = 0
    if mode.needs_inverse_jacobian and info.inverse_jacobian is not None:  # held by the backward's closure
        held = sum(t.untyped_storage().nbytes() for t in vars(info.inverse_jacobian).values() if torch.is_tensor(t))
    if counter is not None:
        counter.phase = "backward"
    task.loss(z).backward()
    grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]).double()
    task.block.zero_grad()
    return grad, saved_bytes, held, info


def compare_methods(cfg: MethodsConfig) -> dict:
    """Every method of :func:`methods` on every model of ``cfg.models``, ``cfg.trials`` batches each.

    Per method: the cosine and relative error of the gradient of F's parameters against the exact
    implicit gradient (Implicit with Broyden solves to ``ref_tol`` in both directions, checked
    converged), F evaluations in the forward and the backward and VJPs through stored evaluations
    of F in the backward (counted by a wrapper on F, in a pass of their own), and the bytes
    autograd saves for backward inside the DEQ layer, plus the inverse-Jacobian estimate a mode
    keeps for its backward outside autograd (SHINE). Returns {"config", "reference", "rows"}.
    """
    rows: list[dict] = []
    reference: list[dict] = []
    for model in cfg.models:
        samples: dict[Method, list[dict]] = {}
        for trial in range(cfg.trials):
            task = _task(cfg, model, trial)
            seed = cfg.seed + trial
            ref_solver = pg.Broyden(max_iter=cfg.ref_iter, tol=cfg.ref_tol, stop="rel")
            ref_mode = pg.Implicit(pg.Broyden(max_iter=cfg.ref_iter, tol=cfg.ref_tol, stop="rel"))
            exact, *_, rinfo = _step(task, ref_solver, ref_mode, seed)
            back = rinfo.backward
            reference.append(
                {
                    "model": model,
                    "trial": trial,
                    "forward_rel_residual": float(rinfo.rel_residual.max()),
                    "backward_rel_residual": float(back.rel_residual.max()),
                    "converged": bool(rinfo.converged.all() and back.converged.all()),
                }
            )
            for method in methods():
                solver, mode, solver_name = build_method(cfg, method)
                grad, saved, held, info = _step(task, solver, mode, seed)
                counter = FCounter(task.block).install()
                try:
                    _step(task, solver, mode, seed, counter)
                finally:
                    counter.remove()
                samples.setdefault(method, []).append(
                    {
                        "label": f"{type(mode).__name__} ({solver_name} forward)",
                        "mode": repr(mode),
                        "solver": solver_name,
                        "cosine": float(torch.nn.functional.cosine_similarity(grad, exact, dim=0)),
                        "rel_error": float((grad - exact).norm() / exact.norm()),
                        "f_forward": counter.calls.get("forward", 0),
                        "f_backward": counter.calls.get("backward", 0),
                        "vjp_backward": counter.vjp,
                        "saved_bytes": saved[0],
                        "retained_bytes": saved[1],
                        "held_bytes": held,
                        "forward_converged": bool(info.converged.all()),
                        "forward_rel_residual": float(info.rel_residual.max()),
                    }
                )
        for method, runs in samples.items():
            first = runs[0]
            row = {"model": model, "method": method.mode, **{k: first[k] for k in ("label", "mode", "solver")}}
            cos = [r["cosine"] for r in runs]
            row.update(cosine_mean=sum(cos) / len(cos), cosine_min=min(cos))
            row["rel_error_max"] = max(r["rel_error"] for r in runs)
            for key in ("f_forward", "f_backward", "vjp_backward", "saved_bytes", "retained_bytes", "held_bytes"):
                row[key] = sum(r[key] for r in runs) / len(runs)
            row["forward_converged"] = all(r["forward_converged"] for r in runs)
            row["forward_rel_residual"] = max(r["forward_rel_residual"] for r in runs)
            row["trials"] = [{k: r[k] for k in ("cosine", "rel_error", "forward_rel_residual")} for r in runs]
            rows.append(row)
    return {"config": asdict(cfg), "reference": reference, "rows": rows}


def format_methods(result: dict) -> str:
    """The comparison as a Markdown table (means over the trials; counts per training step)."""
    lines = [
        "| model | method | cosine (mean / min) | max rel. error | forward residual | F evals fwd | F evals bwd "
        "| VJPs bwd | saved for backward (KiB) | still held after forward (KiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        kib = f"{r['saved_bytes'] / 1024:.1f} | {r['retained_bytes'] / 1024:.1f}"
        if r["held_bytes"]:
            kib += f" + {r['held_bytes'] / 1024:.1f} estimate"
        lines.append(
            f"| {r['model']} | {r['label']} | {r['cosine_mean']:.6f} / {r['cosine_min']:.6f} "
            f"| {r['rel_error_max']:.2e} | {r['forward_rel_residual']:.1e} | {r['f_forward']:g} | {r['f_backward']:g} "
            f"| {r['vjp_backward']:g} | {kib} |"
        )
    return "\n".join(lines)
