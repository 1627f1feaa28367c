"""``phantomgrad bench``'s command line: arguments, the run, and the files it writes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import MODELS, BenchConfig
from .measure import run_bench
from .modes import UNSET, forward_solver_names
from .output import format_tables, from_json, plot, to_json
from .torchdeq import TORCHDEQ_INSTALL


def _ints(text: str) -> tuple[int, ...]:
    """'1..10' or '5,10,20' -> a tuple of ints."""
    text = text.strip()
    if not text:
        return ()
    if ".." in text:
        a, b = text.split("..", 1)
        return tuple(range(int(a), int(b) + 1))
    return tuple(int(t) for t in text.split(","))


def _check_every(text: str) -> int | str | None:
    """'none' -> None (never check), 'default' -> not passed, else an integer."""
    low = text.strip().lower()
    if low == "none":
        return None
    if low == UNSET:
        return UNSET
    try:
        return int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, 'none' or '{UNSET}', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    arg = parser.add_argument
    arg("--model", choices=MODELS, default=d.model, help="model (default %(default)s)")
    arg("--batch", type=int, default=d.batch, help="batch size (default %(default)s)")
    arg("--image-size", type=int, default=d.image_size, help="mdeq-tiny and conv-cell image size (default %(default)s)")
    arg("--dim", type=int, default=d.dim, help="synthetic state size (default %(default)s)")
    arg("--seq-len", type=int, default=d.seq_len, help="deq-transformer tokens per sequence (default %(default)s)")
    arg(
        "--solver",
        choices=forward_solver_names(),
        default=d.solver,
        help="forward solver of every mode (default %(default)s)",
    )
    arg("--solver-iter", type=int, default=d.solver_iter, help="forward solver steps K (default %(default)s)")
    arg("--solver-tol", type=float, default=d.solver_tol, help="forward tolerance (default %(default)s)")
    arg(
        "--check-every",
        type=_check_every,
        default=d.check_every,
        help="host-check interval of phantomgrad's solvers: an integer, 'none' (never: every solve runs its "
        "max_iter steps without a host sync) or 'default' (the solver's own; default %(default)s)",
    )
    arg(
        "--modes",
        default=",".join(d.modes),
        help="comma-separated backward modes, <mode>[-<backward solver>][@<forward solver>] (default all: %(default)s)",
    )
    arg("--k", type=int, default=d.k, help="UPG/NPG steps (default %(default)s)")
    arg("--damping", type=float, default=d.damping, help="UPG/NPG lambda (default %(default)s)")
    arg(
        "--backward-iter",
        type=int,
        default=d.backward_iter,
        help="Implicit's backward solver steps (default %(default)s)",
    )
    arg(
        "--backward-tol",
        type=float,
        default=d.backward_tol,
        help="Implicit's relative backward tolerance (default %(default)s)",
    )
    arg("--sync-free", action="store_true", help="add a check_every=none row for every mode")
    arg(
        "--compiled",
        action="store_true",
        help="add a row for every mode whose training step runs its forward and loss under torch.compile "
        "(check_every=none with --sync-free)",
    )
    arg(
        "--fused",
        action="store_true",
        help="add a row for every mode whose solvers run their per-step bookkeeping fused (fused=True; "
        "check_every=none with --sync-free) and fused rows to the forward-solver table",
    )
    arg(
        "--warm-starts",
        action="store_true",
        help="add, for every mode, a row whose solve starts from the batch's fixed point of the previous step "
        "(reuse, through pg.FixedPointCache) and one that starts from a learned init head (mdeq-tiny only)",
    )
    arg(
        "--warm-iter",
        type=int,
        default=d.warm_iter,
        help="solver steps of the warm-start rows: the steps a run took with them (default: --solver-iter)",
    )
    arg("--compile-backend", default=d.compile_backend, help="torch.compile backend (default %(default)s)")
    arg("--compile-mode", default=d.compile_mode, help="torch.compile mode, e.g. reduce-overhead (default none)")
    arg("--repeats", type=int, default=d.repeats, help="timed rounds (default %(default)s)")
    arg("--warmup", type=int, default=d.warmup, help="untimed rounds first (default %(default)s)")
    arg("--threads", type=int, default=d.threads, help="torch.set_num_threads (default %(default)s)")
    arg("--device", default=d.device, help="cpu or cuda (default %(default)s)")
    arg("--dtype", choices=("float32", "float64"), default=d.dtype)
    arg("--seed", type=int, default=d.seed)
    arg("--compare", choices=("torchdeq",), default=None, help=f"also time TorchDEQ (install: {TORCHDEQ_INSTALL})")
    arg("--sweep-k", type=_ints, default=(), help="UPG/NPG k values, e.g. 1..10 (default none)")
    arg(
        "--sweep-K",
        type=_ints,
        default=(),
        help="solver steps for Implicit/Backprop, e.g. 5,10,20,30,40 (default none)",
    )
    arg("--sweep-repeats", type=int, default=d.sweep_repeats, help="timed rounds in sweeps (default %(default)s)")
    arg(
        "--quiet-factor",
        type=float,
        default=d.quiet_factor,
        help="medians over steps whose adjacent F probe is <= this x the fastest F of the run "
        "(default %(default)s; 0: all)",
    )
    arg("--no-memory", action="store_true", help="skip peak-memory subprocesses")
    arg("--no-cosine", action="store_true", help="skip the gradient cosine")
    arg("--no-solvers", action="store_true", help="skip the forward-solver table")
    arg("--profile", type=Path, default=None, help="write torch.profiler tables (one step per mode) to this directory")
    arg("--out", type=Path, default=Path("runs/bench"), help="directory for bench.md and bench.png")
    arg("--json", type=Path, default=None, help="also write every measurement here")
    arg("--render", type=Path, default=None, help="measure nothing: print the tables (and plot) of an earlier --json")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model,
        batch=args.batch,
        image_size=args.image_size,
        dim=args.dim,
        seq_len=args.seq_len,
        solver=args.solver,
        solver_iter=args.solver_iter,
        solver_tol=args.solver_tol,
        check_every=args.check_every,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        k=args.k,
        damping=args.damping,
        backward_iter=args.backward_iter,
        backward_tol=args.backward_tol,
        sync_free=args.sync_free,
        compiled=args.compiled,
        fused=args.fused,
        warm_starts=args.warm_starts,
        warm_iter=args.warm_iter,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        compare=args.compare,
        memory=not args.no_memory,
        cosine=not args.no_cosine,
        solvers=not args.no_solvers,
        sweep_k=args.sweep_k,
        sweep_K=args.sweep_K,
        sweep_repeats=args.sweep_repeats,
        quiet_factor=args.quiet_factor,
        profile=str(args.profile) if args.profile else None,
    )


def run(args: argparse.Namespace) -> int:
    if args.render is not None:  # no measuring: tables and plot from an earlier --json
        result = from_json(json.loads(args.render.read_text()))
        print(format_tables(result))
        png = plot(result, args.out / "bench.png")
        if png:
            print(f"wrote {png}")
        return 0
    cfg = config_from_args(args)
    result = run_bench(cfg)
    table = format_tables(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / "bench.md"
    md.write_text(
        f"`phantomgrad bench {' '.join(sys.argv[2:]) if len(sys.argv) > 2 else ''}`\n\n"
        f"machine: {result.machine}\n\n{table}\n"
    )
    written = [md]
    png = plot(result, args.out / "bench.png")
    if png:
        written.append(png)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(result), indent=1))
        written.append(args.json)
    print(f"wrote {', '.join(map(str, written))} in {result.seconds:.0f} s")
    return 0


__all__ = ["add_arguments", "config_from_args", "run"]
