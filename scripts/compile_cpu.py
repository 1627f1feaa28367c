"""torch.compile on the CPU with default arguments: compile time and compiled training step against eager.

    python scripts/compile_cpu.py [--model ten-lines|mdeq-tiny|both] [--repeats 30] [--threads 1] [--json PATH]
                                  [--backend inductor]

For each model: the eager step (forward solve, loss, backward), ``torch.compile(model)`` with every default
(inductor backend; the DEQ with its default Anderson forward and UPG A_{5,0.5}), and F alone compiled
(``layer.f = torch.compile(layer.f)``: the solver loop stays eager). Reported: the first compiled call with its
backward (the compile time), then the median of ``--repeats`` steps of each, measured alternately so that a
change of machine load hits all three. Under ``torch.compile(model)`` the solve runs every ``max_iter`` step
(it cannot stop early without a host read); with F alone compiled it stops as in eager mode, so the mean
steps of the eager solve are printed too.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import phantomgrad as pg


class TenLines(torch.nn.Module):
    """The README's ten-line example, F(z, x) = tanh(0.5 W z + U x), with a linear head."""

    def __init__(self):
        super().__init__()
        self.W, self.U, self.head = torch.nn.Linear(32, 32), torch.nn.Linear(16, 32), torch.nn.Linear(32, 10)
        self.deq = pg.DEQ(lambda z, x: torch.tanh(0.5 * self.W(z) + self.U(x)))

    def forward(self, x):
        z, info = self.deq(x, torch.zeros(x.shape[0], 32))
        return self.head(z), info


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if name == "ten-lines":
        return TenLines(), torch.randn(8, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    from phantomgrad.models.mdeq import MDEQ, MDEQConfig

    model = MDEQ(MDEQConfig.named("mdeq-tiny", in_channels=1, image_size=8, num_classes=10))
    return model, torch.rand(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)


def step(model, x, y) -> float:
    """One training step (forward, loss, backward); returns the mean solver steps when eager."""
    model.zero_grad(set_to_none=True)
    logits, info = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    return float(info.nstep.float().mean())


def measure(name: str, repeats: int, backend: str = "inductor") -> dict:
    torch.manual_seed(0)
    model, x, y = build(name)
    torch._dynamo.reset()
    f_only = copy.deepcopy(model)  # the other recipe: compile F alone, the solver loop stays eager (stops early)
    layer = pg.deq_layers(f_only)[0]
    layer.f = torch.compile(layer.f, backend=backend)
    compiled = torch.compile(model, backend=backend)
    steps = step(model, x, y)  # eager warm-up
    start = time.perf_counter()
    step(compiled, x, y)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    step(f_only, x, y)
    compile_f_s = time.perf_counter() - start
    times: dict[str, list[float]] = {"eager": [], "compiled": [], "compiled_f": []}
    for _ in range(repeats):  # alternate, so that load changes hit all three
        for key, net in (("eager", model), ("compiled", compiled), ("compiled_f", f_only)):
            t = time.perf_counter()
            step(net, x, y)
            times[key].append(time.perf_counter() - t)
    e, c, cf = (statistics.median(times[k]) for k in ("eager", "compiled", "compiled_f"))
    return {
        "model": name,
        "compile_s": compile_s,
        "compile_f_s": compile_f_s,
        "eager_ms": 1e3 * e,
        "compiled_ms": 1e3 * c,
        "compiled_f_ms": 1e3 * cf,
        "eager_over_compiled": e / c,
        "eager_over_compiled_f": e / cf,
        "eager_mean_solver_steps": steps,
        "max_iter": pg.deq_layers(model)[0].solver.max_iter,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=["ten-lines", "mdeq-tiny", "both"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["ten-lines", "mdeq-tiny"] if args.model == "both" else [args.model]
    rows = []
    for name in names:
        row = measure(name, args.repeats, args.backend)
        rows.append(row)
        print(
            f"{name}: step eager {row['eager_ms']:.1f} ms ({row['eager_mean_solver_steps']:.1f} solver steps); "
            f"torch.compile(model): compile {row['compile_s']:.1f} s, step {row['compiled_ms']:.1f} ms "
            f"({row['max_iter']} steps), eager / compiled {row['eager_over_compiled']:.2f}x; "
            f"F alone compiled: compile {row['compile_f_s']:.1f} s, step {row['compiled_f_ms']:.1f} ms, "
            f"eager / compiled {row['eager_over_compiled_f']:.2f}x",
            flush=True,
        )
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "backend": args.backend}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
