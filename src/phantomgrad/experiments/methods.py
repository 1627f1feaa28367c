"""``phantomgrad methods``: every gradient method side by side (:func:`.cosine.compare_methods`).

Each backward mode of :data:`phantomgrad.modes.BACKWARD_MODES` (plus Reversible + Backprop) on the
synthetic tanh layer of Fig. 1 and on MDEQ-Tiny: the cosine of its gradient to the exact implicit
gradient, its evaluations of F and the bytes it saves for backward. It was part of ``phantomgrad
cosine`` (2 min and 1.2 GB by default); ``cosine`` is Fig. 1 alone again and this study has its own
command. Writes ``methods.json`` and ``methods.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .cosine import (
    METHOD_MODELS,
    MethodsConfig,
    check_lipschitz_and_set_threads,
    compare_methods,
    format_methods,
    machine,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = MethodsConfig()
    parser.add_argument(
        "--models",
        default=",".join(m.models),
        help=f"models to compare the methods on, comma-separated from {list(METHOD_MODELS)} (default %(default)s)",
    )
    parser.add_argument("--trials", type=int, default=m.trials, help="batches per model (default %(default)s)")
    parser.add_argument("--batch", type=int, default=m.batch, help="batch of the methods (default %(default)s)")
    parser.add_argument("--dim", type=int, default=m.dim, help="synthetic layer: state size (default %(default)s)")
    parser.add_argument(
        "--lipschitz", type=float, default=m.lipschitz, help="synthetic layer: ||W||_2 (default %(default)s)"
    )
    parser.add_argument(
        "--solver-iter", type=int, default=m.solver_iter, help="forward solver steps (default %(default)s)"
    )
    parser.add_argument(
        "--mdeq-warmup",
        type=int,
        default=m.mdeq_warmup,
        help="training steps of MDEQ-Tiny before the comparison (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=m.seed)
    parser.add_argument("--out", type=Path, default=Path("runs/methods"), help="directory for methods.json/.md")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    models = tuple(filter(None, (m.strip() for m in args.models.split(","))))
    unknown = sorted(set(models) - set(METHOD_MODELS))
    if unknown or not models:
        raise ValueError(f"--models: unknown or no model(s) {unknown}; choose from {list(METHOD_MODELS)}")
    if min(args.batch, args.solver_iter, args.trials) < 1 or args.mdeq_warmup < 0:
        raise ValueError("--batch, --solver-iter and --trials must be >= 1 and --mdeq-warmup >= 0")
    check_lipschitz_and_set_threads(args)
    cfg = MethodsConfig(
        models=models,
        batch=args.batch,
        dim=args.dim,
        lipschitz=args.lipschitz,
        solver_iter=args.solver_iter,
        trials=args.trials,
        mdeq_warmup=args.mdeq_warmup,
        seed=args.seed,
    )
    start = time.perf_counter()
    result = compare_methods(cfg)
    result["seconds"] = time.perf_counter() - start
    result["machine"] = machine()
    table = format_methods(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "methods.json").write_text(json.dumps(result, indent=2))
    (args.out / "methods.md").write_text(table + "\n")
    print(f"wrote {args.out / 'methods.json'}, {args.out / 'methods.md'} in {result['seconds']:.1f} s")
    bad = [r for r in result["reference"] if not r["converged"]]
    if bad:
        print(f"warning: the exact gradient's solves did not reach ref_tol for {len(bad)} batch(es); see methods.json")
    return 0
