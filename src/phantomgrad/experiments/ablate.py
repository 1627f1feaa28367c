"""The paper's Table 1 (MDEQ-Tiny ablation) and Fig. 3 (accuracy against k and lambda) at CPU scale.

Table 1 rows, each trained with the same budget and several seeds:

    Implicit (with unrolled pretraining) | Implicit (no pretraining) | UPG A_{5,0.5} |
    NPG A_{5,0.5} | UPG A_{9,0.5} with dropout

Fig. 3: test accuracy against k for UPG and NPG at lambda = 0.5, and against lambda for
UPG at k = 5, with the spectral radius of dF/dh at the fixed point at the end of each run
(the paper sees NPG degrade and the radius surge at large k while UPG holds).

The reported accuracy is each run's final-epoch test accuracy (no selection on the test set).

Budgets: ``cpu`` (the committed docs/results/ablate: 8,000 images, 2 epochs), ``full`` (all
60,000 training images, 6 epochs, rows Implicit | UPG A_{5,0.5} | NPG A_{5,0.5} | JFB |
UPG A_{9,0.5} + dropout: docs/results/table1_full) and ``tiny`` (tests). Every run keeps its
own directory under ``--out``: a run with a checkpoint resumes from it (mid-epoch after a
signal), a finished run (``result.json``) is read back, so an interrupted experiment continues
where it stopped; ``--jobs N`` trains N runs side by side, one thread each. Ctrl-C or SIGTERM stops
every run with a checkpoint and exits 130 or 143 (:mod:`phantomgrad.experiments.jobs`).

The rows and budgets are plain data in :mod:`.ablate_budgets`; the tables and plots are made by
:mod:`.ablate_report`; this module trains the runs and aggregates them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import platform
import statistics
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, cast

import torch

import phantomgrad as pg
from phantomgrad.models.mdeq import MDEQ
from phantomgrad.train.config import TrainConfig
from phantomgrad.train.errors import TrainingInterrupted
from phantomgrad.train.trainer import Trainer

from .ablate_budgets import BASE, BUDGETS, Budget, _overrides
from .ablate_report import format_fig3, format_table1, plot_curves, plot_fig3, time_ratio
from .jobs import RunsInterrupted, run_jobs

log = logging.getLogger(__name__)


class BackwardSolveRecorder:
    """Trainer callback: how the backward solve of ``pg.Implicit`` went, over all training steps
    (the fraction of samples whose backward solve met its tolerance, mean steps and residual)."""

    def __init__(self) -> None:
        self.samples = self.converged = 0
        self.nstep_sum = self.residual_sum = 0.0

    def after_backward(self, ctx: Any, batch: Any, result: Any) -> None:
        info = getattr(result.info, "backward", None)
        if info is None:
            return
        self.samples += info.converged.numel()  # host syncs below: once per step, Implicit rows only
        self.converged += int(info.converged.sum())
        self.nstep_sum += float(info.nstep.float().sum())
        self.residual_sum += float(info.rel_residual.double().sum())

    def on_epoch_end(self, ctx: Any, row: dict[str, Any]) -> None:
        pass  # the statistics cover the whole run: nothing to add per epoch

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {
                "backward_converged_fraction": None,
                "backward_mean_steps": None,
                "backward_rel_residual_mean": None,
            }
        return {
            "backward_converged_fraction": self.converged / self.samples,
            "backward_mean_steps": self.nstep_sum / self.samples,
            "backward_rel_residual_mean": self.residual_sum / self.samples,
        }


def _epoch_curves(run_dir: Path) -> list[dict[str, Any]]:
    """Per epoch: test accuracy (where evaluated), training seconds and the mean relative residual
    of the training solves (from metrics.csv and forward_stats.csv)."""
    with (run_dir / "metrics.csv").open(newline="") as fh:
        epochs = list(csv.DictReader(fh))
    residuals: dict[int, list[float]] = {}
    stats = run_dir / "forward_stats.csv"
    if stats.exists():
        with stats.open(newline="") as fh:
            for r in csv.DictReader(fh):
                if r["rel_residual_mean"] not in ("", "nan"):
                    residuals.setdefault(int(r["epoch"]), []).append(float(r["rel_residual_mean"]))
    out = []
    for r in epochs:
        e = int(r["epoch"])
        acc = r.get("test_accuracy", "")
        out.append(
            {
                "epoch": e,
                "test_accuracy": float(acc) if acc else None,
                "train_seconds": float(r["train_seconds"]),
                "train_rel_residual": statistics.fmean(residuals[e]) if residuals.get(e) else None,
            }
        )
    return out


def run_one(overrides: list[str], threads: int | None = None, radius_batch: int = 64) -> dict[str, Any]:
    """Train one configuration; add the spectral radius of dF/dh at h* on a test batch, the
    per-epoch curves and, for Implicit, how its backward solves went.

    A run whose directory already holds a checkpoint is resumed from its last finished epoch;
    a run that finished (``result.json``) is read back without training, so an interrupted
    experiment picks up where it stopped."""
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig.from_sources(None, overrides)
    if cfg.out_dir is None:
        raise ValueError("run_one needs out_dir=... among the overrides (a finished run is read back from it)")
    out_dir = Path(cfg.out_dir)
    done = out_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    recorder = BackwardSolveRecorder()
    trainer = Trainer(cfg, resume=(out_dir / "checkpoint.pt").exists(), callbacks=[recorder])
    summary = trainer.fit()
    model = cast(MDEQ, trainer.model).eval()  # the image task's model
    images = torch.stack(
        [trainer.task.eval_sets["test"][i][0] for i in range(min(radius_batch, len(trainer.task.eval_sets["test"])))]
    )
    with torch.no_grad():  # h* only: no backward work
        z, u, info = model.equilibrium(images.to(trainer.device))
    summary["spectral_radius"] = float(pg.spectral_radius(model.block, z, u, iters=30).mean())
    summary["eval_rel_residual"] = float(info.rel_residual.mean())
    summary["train_images"] = len(trainer.task.train_set)
    summary["test_images"] = len(trainer.task.eval_sets["test"])
    summary["curves"] = _epoch_curves(out_dir)
    summary["threads"] = torch.get_num_threads()
    if trainer.resume:  # the backward statistics of epochs before the resume are not in this process
        summary["backward_stats_from_epoch"] = trainer.history[0]["epoch"] if trainer.history else None
    summary.update(recorder.summary())
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(done)
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _table1_rows(budget: Budget, results: dict[tuple[int, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate the finished runs into table rows: a row appears once one of its seeds finished, and
    lists the seeds it averages over (rows may differ while a multi-seed run is under way). A row's
    time against the reference row is taken over the seeds both finished (the same runs side by side)."""
    rows = []
    for i, (name, extra) in enumerate(budget.rows):
        seeds = [seed for seed in budget.seeds if (i, seed) in results]
        if not seeds:
            continue
        runs = [results[(i, seed)] for seed in seeds]
        acc = _mean_std([r["test_accuracy"] for r in runs])
        secs = _mean_std([r["train_seconds"] for r in runs])
        row = {
            "row": name,
            "overrides": list(extra),
            "seeds": seeds,
            "test_accuracies": [r["test_accuracy"] for r in runs],
            "accuracy_mean": acc[0],
            "accuracy_std": acc[1],
            "train_images": runs[0].get("train_images"),
            "epochs": runs[0]["epochs"],
            "train_seconds_mean": secs[0],
            "seconds_per_epoch_mean": statistics.fmean(r["seconds_per_epoch"] for r in runs),
            "spectral_radius_mean": statistics.fmean(r["spectral_radius"] for r in runs),
            "mean_forward_steps": statistics.fmean(r["mean_forward_steps"] for r in runs),
            "eval_rel_residual_mean": statistics.fmean(r["eval_rel_residual"] for r in runs),
            "runs": runs,
        }
        fractions = [r["backward_converged_fraction"] for r in runs if r.get("backward_converged_fraction") is not None]
        row["backward_converged_fraction"] = statistics.fmean(fractions) if len(fractions) == len(runs) else None
        rows.append(row)
    reference = next((r for r in rows if r["row"] == budget.reference), None)
    for row in rows:
        row["time_vs_implicit"] = time_ratio(row, reference)
    return rows


def run_table1(
    budget: Budget,
    out_dir: Path,
    base: list[str],
    n_jobs: int = 1,
    threads: int = 1,
    on_rows: Any = None,
    report_only: bool = False,
    only_rows: Collection[int] | None = None,
) -> list[dict[str, Any]]:
    """Train (or resume, or read back) every row and seed; ``report_only``: read back the finished
    runs only, train nothing (the table of what has finished while other rows still train);
    ``only_rows``: train these rows (indices into ``budget.rows``) only, the others' finished runs
    are read back into the table."""
    jobs = []
    for seed in budget.seeds:
        for i, (name, extra) in enumerate(budget.rows):
            slug = name.split(" ")[0].lower() + f"-{i}-s{seed}"
            jobs.append(((i, seed), _overrides(budget, list(extra), seed, out_dir / slug, base)))
    done = {key: Path(_run_dir(overrides)) / "result.json" for key, overrides in jobs}
    finished = {key: json.loads(p.read_text()) for key, p in done.items() if p.exists()}
    if report_only:
        return _table1_rows(budget, finished)
    if only_rows is not None:
        jobs = [(key, overrides) for key, overrides in jobs if key[0] in only_rows]
    results = run_jobs(
        run_one,
        jobs,
        n_jobs,
        threads,
        on_done=(lambda res: on_rows(_table1_rows(budget, {**finished, **res}))) if on_rows else None,
    )
    return _table1_rows(budget, {**finished, **results})


def _run_dir(overrides: list[str]) -> str:
    """The out_dir among a run's overrides (the last one wins, as in the config)."""
    return [o.split("=", 1)[1] for o in overrides if o.startswith("out_dir=")][-1]


def run_fig3(budget: Budget, out_dir: Path, base: list[str]) -> list[dict[str, Any]]:
    """One seed per point (the first of the budget's)."""
    seed = budget.seeds[0]
    points = [("UPG", k, 0.5) for k in budget.ks] + [("NPG", k, 0.5) for k in budget.ks]
    points += [("UPG", 5, lam) for lam in budget.dampings if ("UPG", 5, lam) not in points]
    results: list[dict[str, Any]] = []
    for mode, k, lam in points:
        log.info("fig 3: %s k=%d lambda=%.2f", mode, k, lam)
        extra = [f"backward={mode.lower()}", f"k={k}", f"damping={lam}"]
        try:
            summary = run_one(_overrides(budget, extra, seed, out_dir / f"{mode.lower()}-k{k}-l{lam}", base))  # resumes
        except TrainingInterrupted as err:  # rerunning ablate resumes it (not `train --resume`)
            raise RunsInterrupted(err.signum, len(results), len(points)) from None
        results.append(
            {
                "mode": mode,
                "k": k,
                "damping": lam,
                "test_accuracy": summary["test_accuracy"],
                "spectral_radius": summary["spectral_radius"],
                "train_seconds": summary["train_seconds"],
            }
        )
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--what", choices=("table1", "fig3", "both"), default="both")
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="cpu",
        help="cpu: docs/results/ablate (8,000 images, 2 epochs); full: docs/results/table1_full "
        "(60,000 images, 6 epochs, hours); full_converge: issue 25's rows with and without warm starts and "
        "Jacobian regularisation (docs/results/table1_converge); cpu_methods: SHINE, JFB, reversible rows at cpu scale "
        "(docs/results/ablate_methods); tiny: seconds",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/ablate"),
        help="run directories and results go here; rerunning with the same --out resumes",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (per run when --jobs > 1: then 1 is best)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="Table 1 runs trained side by side, each in its own process"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds instead of the budget's (finished runs of other seeds are reused, e.g. add a second seed later)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the table of the runs in --out that have finished (while others still train)",
    )
    parser.add_argument(
        "--rows",
        type=_row_indices,
        default=None,
        metavar="I,J",
        help="train these Table 1 rows only (0-based, in the budget's order, e.g. 6,7); the table reads back the "
        "others' finished runs",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="extra config overrides for every run (e.g. data_dir=...)"
    )


def _row_indices(text: str) -> list[int]:
    """``--rows 6,7``: comma-separated, so that the overrides after it stay overrides."""
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated row indices such as 6,7, not {text!r}") from None


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(args.seeds))
    base = BASE + [f"threads={args.threads}"] + list(args.overrides)
    TrainConfig.from_sources(None, base)  # fail fast on a bad override
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "budget": budget.__dict__,
        "base_overrides": base,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    text = []
    if args.jobs < 1 or args.threads < 1:
        raise ValueError("--jobs and --threads take a positive integer")
    if args.rows is not None and not all(0 <= i < len(budget.rows) for i in args.rows):
        raise ValueError(f"--rows takes indices 0-{len(budget.rows) - 1} of the {args.budget} budget's rows")
    if (args.report_only or args.rows is not None) and args.what != "table1":
        raise ValueError("--report-only and --rows concern Table 1 runs; pass --what table1")
    if args.what in ("table1", "both"):

        def write_partial(rows: list[dict[str, Any]]) -> None:  # each row's result as soon as it finishes
            _write_outputs(
                args,
                budget,
                {**result, "table1": rows, "partial": True},
                ["## Table 1\n\n" + format_table1(rows, budget)],
                rows,
            )

        rows = run_table1(
            budget,
            args.out,
            base,
            n_jobs=args.jobs,
            threads=args.threads,
            on_rows=write_partial,
            report_only=args.report_only,
            only_rows=args.rows,
        )
        result["table1"] = rows
        text.append("## Table 1\n\n" + format_table1(rows, budget))
        if budget.eval_every == 1 and rows:
            plot_curves(rows, args.out / "curves.png")
            text.append("![curves](curves.png)")
    if args.what in ("fig3", "both"):
        points = run_fig3(budget, args.out, base)
        result["fig3"] = points
        plot_fig3(points, args.out / "fig3.png")
        text.append("## Fig. 3\n\n" + format_fig3(points) + f"\n\n![fig3]({(args.out / 'fig3.png').name})")
    result["seconds"] = time.perf_counter() - start
    report = _write_outputs(
        args,
        budget,
        result,
        text + [f"Total wall time of this invocation: {result['seconds'] / 60:.1f} min."],
        result.get("table1", []),
    )
    print(report)
    print(f"wrote {args.out / 'ablate.md'} and {args.json or args.out / 'ablate.json'}")
    return 0


def _write_outputs(
    args: argparse.Namespace, budget: Budget, result: dict[str, Any], text: list[str], rows: list[dict[str, Any]]
) -> str:
    report = "\n\n".join(text) + "\n"
    (args.out / "ablate.md").write_text(report)
    json_path = args.json or args.out / "ablate.json"
    json_path.write_text(json.dumps(result, indent=2, default=str))
    if budget.eval_every == 1 and rows:
        plot_curves(rows, args.out / "curves.png")
    return report
