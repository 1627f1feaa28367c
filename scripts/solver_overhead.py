"""Time beyond F of chosen forward solvers alone (no grad), measured as ``phantomgrad bench``'s
forward-solver table measures it (the solve's time minus the time inside F's own evaluations in the
same solve), but only for the solvers named, interleaved round by round:

    PYTHONPATH=TREE/src python scripts/solver_overhead.py --model conv-cell --solvers fixed_point,anderson

Run it with ``PYTHONPATH`` pointing at two checkouts (``git worktree add``) to compare the solvers of
two commits with the same bench code; alternate the runs (A B B A) on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from phantomgrad.experiments.bench.config import BenchConfig
from phantomgrad.experiments.bench.instruments import FTimer
from phantomgrad.experiments.bench.modes import make_solver
from phantomgrad.experiments.bench.problem import build_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="conv-cell")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--solvers", default="fixed_point,anderson")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(model=args.model, batch=args.batch, solver_iter=args.steps)
    p = build_problem(cfg)
    with torch.no_grad(), p.context():
        u, z0 = p.prepare(p.x)
    deq = p.deq
    deq.eval()
    names = args.solvers.split(",")
    solvers = {name: make_solver(cfg, name, cfg.solver_iter, cfg.solver_tol, cfg.stop) for name in names}
    total: dict[str, list[float]] = {n: [] for n in names}
    inside: dict[str, list[float]] = {n: [] for n in names}
    calls: dict[str, int] = {}
    for r in range(args.warmup + args.repeats):
        for name, solver in solvers.items():
            deq.solver = solver
            timer = FTimer(p.block, time.perf_counter).install()
            try:
                start = time.perf_counter()
                with torch.no_grad():
                    deq(u, z0)
                elapsed = time.perf_counter() - start
            finally:
                timer.remove()
            if r >= args.warmup:
                total[name].append(elapsed)
                inside[name].append(timer.seconds)
                calls[name] = timer.calls
    rows = []
    for name in names:
        over = [a - b for a, b in zip(total[name], inside[name])]
        rows.append(
            {
                "solver": name,
                "f_evals": calls[name],
                "ms": 1e3 * statistics.median(total[name]),
                "inside_f_ms": 1e3 * statistics.median(inside[name]),
                "overhead_ms": 1e3 * statistics.median(over),
                "overhead_pct": 100 * statistics.median(o / b for o, b in zip(over, inside[name])),
            }
        )
        r_ = rows[-1]
        print(
            f"{args.model} {name}: {r_['ms']:.1f} ms, {r_['f_evals']} F evals, {r_['inside_f_ms']:.1f} ms in F, "
            f"+{r_['overhead_ms']:.1f} ms ({r_['overhead_pct']:+.1f}%)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "torch": torch.__version__}, fh, indent=1)


if __name__ == "__main__":
    main()
