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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

import phantomgrad as pg
from phantomgrad.models.mdeq import MDEQ
from phantomgrad.train.config import TrainConfig
from phantomgrad.train.errors import TrainingInterrupted
from phantomgrad.train.trainer import Trainer

from .jobs import RunsInterrupted, run_jobs

log = logging.getLogger(__name__)

Row = tuple[str, tuple[str, ...]]

TABLE1_ROWS: tuple[Row, ...] = (
    ("Implicit (with pretraining)", ("backward=implicit", "pretrain_steps=PRETRAIN")),
    ("Implicit (no pretraining)", ("backward=implicit",)),
    ("UPG A_{5,0.5}", ("backward=upg", "k=5", "damping=0.5")),
    ("NPG A_{5,0.5}", ("backward=npg", "k=5", "damping=0.5")),
    ("UPG A_{9,0.5} + dropout", ("backward=upg", "k=9", "damping=0.5", "dropout=0.1")),
)

# The full-scale table (issue 17): the rows are run in this order, so that with --jobs 2 the
# first pair (Implicit, UPG A_{5,0.5}) trains side by side and their times compare directly.
TABLE1_FULL_ROWS: tuple[Row, ...] = (
    ("Implicit", ("backward=implicit",)),
    ("UPG A_{5,0.5}", ("backward=upg", "k=5", "damping=0.5")),
    ("NPG A_{5,0.5}", ("backward=npg", "k=5", "damping=0.5")),
    ("JFB", ("backward=jfb",)),
    ("UPG A_{9,0.5} + dropout", ("backward=upg", "k=9", "damping=0.5", "dropout=0.1")),
)

# Issue 25's full-scale rows: the same setting as TABLE1_FULL_ROWS, with and without the levers that
# bring the forward solve to its equilibrium. "today" is warm_start=none (the committed table1_full ran
# before warm starts existed); "best" is the recipe the README's main job chose (docs/convergence.md):
# fixed-point reuse with Jacobian regularisation of weight 2 on half of the steps. Ordered in pairs for
# --jobs 2: each pair trains side by side, one thread each, so its times compare directly.
_BEST = ("warm_start=reuse", "jac_reg_weight=2.0", "jac_reg_freq=0.5")
_UPG = ("backward=upg", "k=5", "damping=0.5")
TABLE1_CONVERGE_ROWS: tuple[Row, ...] = (
    ("UPG A_{5,0.5} (today)", (*_UPG, "warm_start=none")),
    ("UPG A_{5,0.5} + reuse + Jacobian reg. (best)", (*_UPG, *_BEST)),
    ("Implicit (today)", ("backward=implicit", "warm_start=none")),
    ("Implicit + reuse + Jacobian reg. (best)", ("backward=implicit", *_BEST)),
    ("UPG A_{5,0.5} + reuse", (*_UPG, "warm_start=reuse")),
    ("UPG A_{5,0.5} + learned init", (*_UPG, "warm_start=learned")),
)

# The methods that came before and after the paper, as extra rows of the CPU-scale table (same setting
# and seeds as docs/results/ablate): SHINE needs a Broyden forward (12 steps, as Anderson's) and runs without its
# fallback (at 12 steps the forward never meets its tolerance, so the fallback would make every step JFB); the
# reversible solver counts F evaluations, two per coupled step, so 24 of them make 12 steps.
TABLE1_METHOD_ROWS: tuple[Row, ...] = (
    ("SHINE (Broyden forward, no fallback)", ("backward=shine", "solver=broyden", "backward_options.fallback=none")),
    ("JFB", ("backward=jfb",)),
    ("Reversible + Backprop", ("solver=reversible", "solver_max_iter=24", "backward=backprop")),
)


@dataclass(frozen=True)
class Budget:
    """How much each run trains; the same for every row."""

    train_subset: int | None
    test_subset: int | None
    epochs: int
    seeds: tuple[int, ...]
    pretrain_steps: int
    ks: tuple[int, ...]
    dampings: tuple[float, ...]
    rows: tuple[Row, ...] = TABLE1_ROWS
    reference: str = "Implicit (no pretraining)"  # the row that "time vs implicit" divides by
    eval_every: int = 1000  # 1000: only after the last epoch; 1: a per-epoch test curve
    health: bool = False  # the table adds the final epoch's equilibrium health (steps, converged fractions)


# Used for docs/results/ablate.md: 8000 training images (a fixed subset), 2 epochs (250 steps of
# batch 64), the full 10,000-image test set; 15 Table-1 runs and 13 Fig.-3 runs.
_CPU = Budget(
    train_subset=8000,
    test_subset=None,
    epochs=2,
    seeds=(0, 1, 2),
    pretrain_steps=50,
    ks=(1, 3, 5, 9),
    dampings=(0.3, 0.5, 1.0),
)

# docs/results/table1_full: all 60,000 training images, 6 epochs (5,628 steps of batch 64), seed 0
# (--seeds 0 1 for both), the test set evaluated after every epoch for the curves (the table reports
# the last epoch only).
_FULL = Budget(
    train_subset=None,
    test_subset=None,
    epochs=6,
    seeds=(0,),
    pretrain_steps=0,
    ks=(5,),
    dampings=(0.5,),
    rows=TABLE1_FULL_ROWS,
    reference="Implicit",
    eval_every=1,
)

BUDGETS = {
    "cpu": _CPU,
    "full": _FULL,
    # docs/results/table1_converge (issue 25): the full budget's setting and seed, TABLE1_CONVERGE_ROWS,
    # times against today's UPG row.
    "full_converge": dataclasses.replace(
        _FULL, rows=TABLE1_CONVERGE_ROWS, reference="UPG A_{5,0.5} (today)", health=True
    ),
    # docs/results/ablate_methods: the cpu budget's setting and seeds for TABLE1_METHOD_ROWS
    # (no Implicit row: compare with docs/results/ablate's, same setting and seeds).
    "cpu_methods": dataclasses.replace(
        _CPU, pretrain_steps=0, ks=(5,), dampings=(0.5,), rows=TABLE1_METHOD_ROWS, reference=""
    ),
    # For tests: seconds.
    "tiny": Budget(
        train_subset=128, test_subset=64, epochs=1, seeds=(0,), pretrain_steps=1, ks=(1, 2), dampings=(0.5, 1.0)
    ),
}

BASE = [
    "dataset=fashion-mnist",
    "model=mdeq-tiny-28",
    "batch_size=64",
    "lr=0.002",
    "optimizer=adam",
    "solver=anderson",
    "solver_max_iter=12",
    "solver_tol=1e-3",
    "backward_solver=broyden",
    "backward_max_iter=12",
    "backward_tol=1e-4",
    "pretrain_depth=6",
    "eval_every=1000",
    "progress=false",
]


def _overrides(budget: Budget, extra: list[str], seed: int, out_dir: Path, base: list[str]) -> list[str]:
    subsets = [f"data_options.train_subset={budget.train_subset}"] if budget.train_subset else []
    subsets += [f"data_options.test_subset={budget.test_subset}"] if budget.test_subset else []
    extra = [e.replace("PRETRAIN", str(budget.pretrain_steps)) for e in extra]
    evals = [f"eval_every={budget.eval_every}"]
    return base + subsets + evals + [f"epochs={budget.epochs}", f"seed={seed}", f"out_dir={out_dir}"] + extra


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
        row["time_vs_implicit"] = _time_ratio(row, reference)
    return rows


def _time_ratio(row: dict[str, Any], reference: dict[str, Any] | None) -> float | None:
    """Row's training time over the reference row's, over the seeds both finished (runs that trained
    side by side); None without a reference or a shared seed."""
    common = [s for s in row["seeds"] if reference is not None and s in reference["seeds"]]
    if reference is None or not common:
        return None

    def seconds(r: dict[str, Any]) -> float:
        return statistics.fmean(run["train_seconds"] for s, run in zip(r["seeds"], r["runs"]) if s in common)

    return seconds(row) / seconds(reference)


def run_table1(
    budget: Budget,
    out_dir: Path,
    base: list[str],
    n_jobs: int = 1,
    threads: int = 1,
    on_rows: Any = None,
    report_only: bool = False,
) -> list[dict[str, Any]]:
    """Train (or resume, or read back) every row and seed; ``report_only``: read back the finished
    runs only, train nothing (the table of what has finished while other rows still train)."""
    jobs = []
    for seed in budget.seeds:
        for i, (name, extra) in enumerate(budget.rows):
            slug = name.split(" ")[0].lower() + f"-{i}-s{seed}"
            jobs.append(((i, seed), _overrides(budget, list(extra), seed, out_dir / slug, base)))
    if report_only:
        done = {key: Path(_run_dir(overrides)) / "result.json" for key, overrides in jobs}
        return _table1_rows(budget, {key: json.loads(p.read_text()) for key, p in done.items() if p.exists()})
    results = run_jobs(
        run_one, jobs, n_jobs, threads, on_done=(lambda res: on_rows(_table1_rows(budget, res))) if on_rows else None
    )
    return _table1_rows(budget, results)


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


def _final(row: dict[str, Any], key: str) -> float:
    """The mean over the row's seeds of a final-epoch metric (metrics.csv's last row)."""
    return statistics.fmean(float(r["final_metrics"][key]) for r in row["runs"])


def format_health(rows: list[dict[str, Any]], budget: Budget) -> str:
    """The final epoch's equilibrium health per row (means over its seeds), and each row's training
    time against the budget's reference row and against the "Implicit (today)" row where there is one."""
    implicit = next((r for r in rows if r["row"].startswith("Implicit") and "today" in r["row"]), None)
    lines = [
        "| row | test accuracy | forward F evals per train step (final epoch; whole run) | train converged | "
        "F evals per test sample | test converged | training time | vs "
        + budget.reference
        + " | vs Implicit (today) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = _time_ratio(r, implicit)
        ratio = "-" if r["time_vs_implicit"] is None else f"{r['time_vs_implicit']:.2f}x"
        lines.append(
            f"| {r['row']} | {100 * r['accuracy_mean']:.2f} | {_final(r, 'train_nstep'):.2f}; "
            f"{r['mean_forward_steps']:.2f} | {100 * _final(r, 'train_converged'):.1f}% | "
            f"{_final(r, 'test_nstep'):.2f} | {100 * _final(r, 'test_converged'):.1f}% | "
            f"{r['train_seconds_mean']:.0f} s | {ratio} | {'-' if versus is None else f'{versus:.2f}x'} |"
        )
    return "\n".join(lines)


def format_table1(rows: list[dict[str, Any]], budget: Budget) -> str:
    if budget.health:
        return format_health(rows, budget) + "\n\n" + _format_table1(rows, budget)
    return _format_table1(rows, budget)


def _format_table1(rows: list[dict[str, Any]], budget: Budget) -> str:
    full = budget.eval_every == 1
    head = (
        "| row | test accuracy (mean +- std over its seeds) | seeds | "
        f"training time vs {budget.reference or 'implicit'} | mean forward steps | spectral radius at h* |"
    )
    lines = [
        head + (" s/epoch | rel. residual at h* (test) | Implicit backward converged |" if full else ""),
        "|---|---|---|---|---|---|" + ("---|---|---|" if full else ""),
    ]
    for r in rows:
        ratio = (
            f"{r['time_vs_implicit']:.2f}x"
            if r["time_vs_implicit"] is not None
            else "n/a (no Implicit row in this table)"
        )
        line = (
            f"| {r['row']} | {100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f} | "
            f"{', '.join(map(str, r['seeds']))} | {ratio} ({r['train_seconds_mean']:.0f} s) | "
            f"{r['mean_forward_steps']:.1f} | "
            f"{r['spectral_radius_mean']:.2f} |"
        )
        if full:
            conv = r.get("backward_converged_fraction")
            line += (
                f" {r['seconds_per_epoch_mean']:.0f} | {r['eval_rel_residual_mean']:.2g} | "
                f"{'-' if conv is None else f'{100 * conv:.0f}% of samples'} |"
            )
        lines.append(line)
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy and the training solves' mean relative residual per epoch, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        curve = r["runs"][0]["curves"]
        pts = [c for c in curve if c["test_accuracy"] is not None]
        axes[0].plot([c["epoch"] for c in pts], [100 * c["test_accuracy"] for c in pts], marker="o", label=r["row"])
        pts = [c for c in curve if c["train_rel_residual"] is not None]
        axes[1].semilogy([c["epoch"] for c in pts], [c["train_rel_residual"] for c in pts], marker="o", label=r["row"])
    axes[0].set(
        xlabel="epoch", ylabel="test accuracy (%)", title=f"test accuracy per epoch (seed {rows[0]['seeds'][0]})"
    )
    axes[1].set(
        xlabel="epoch",
        ylabel="mean relative residual ||F(z)-z||/||F(z)||",
        title="forward residual of the training solves",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_fig3(points: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | k | lambda | test accuracy | spectral radius at h* | training time |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['mode']} | {p['k']} | {p['damping']} | {100 * p['test_accuracy']:.2f} | "
            f"{p['spectral_radius']:.2f} | {p['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def plot_fig3(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode, marker in (("UPG", "o"), ("NPG", "s")):
        pts = sorted((p for p in points if p["mode"] == mode and p["damping"] == 0.5), key=lambda p: p["k"])
        axes[0].plot(
            [p["k"] for p in pts], [100 * p["test_accuracy"] for p in pts], marker=marker, label=f"{mode}, lambda=0.5"
        )
        axes[1].plot([p["k"] for p in pts], [p["spectral_radius"] for p in pts], marker=marker, label=mode)
    pts = sorted((p for p in points if p["mode"] == "UPG" and p["k"] == 5), key=lambda p: p["damping"])
    axes[2].plot([p["damping"] for p in pts], [100 * p["test_accuracy"] for p in pts], marker="o", label="UPG, k=5")
    axes[0].set(xlabel="k", ylabel="test accuracy (%)", title="accuracy vs k")
    axes[1].set(xlabel="k", ylabel="spectral radius of dF/dh at h*", title="spectral radius vs k")
    axes[2].set(xlabel="lambda", ylabel="test accuracy (%)", title="accuracy vs lambda")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        "overrides", nargs="*", metavar="key=value", help="extra config overrides for every run (e.g. data_dir=...)"
    )


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
    if args.report_only and args.what != "table1":
        raise ValueError("--report-only reads back Table 1 runs; pass --what table1")
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
