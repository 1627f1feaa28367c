"""The paper's Table 1 (MDEQ-Tiny ablation) and Fig. 3 (accuracy against k and lambda) at CPU scale.

Table 1 rows, each trained with the same budget and several seeds:

    Implicit (with unrolled pretraining) | Implicit (no pretraining) | UPG A_{5,0.5} |
    NPG A_{5,0.5} | UPG A_{9,0.5} with dropout

Fig. 3: test accuracy against k for UPG and NPG at lambda = 0.5, and against lambda for
UPG at k = 5, with the spectral radius of dF/dh at the fixed point at the end of each run
(the paper sees NPG degrade and the radius surge at large k while UPG holds).

The reported accuracy is each run's final-epoch test accuracy (no selection on the test set).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import phantomgrad as pg
from phantomgrad.train.config import TrainConfig
from phantomgrad.train.trainer import Trainer

log = logging.getLogger(__name__)

TABLE1_ROWS: list[tuple[str, list[str]]] = [
    ("Implicit (with pretraining)", ["backward=implicit", "pretrain_steps=PRETRAIN"]),
    ("Implicit (no pretraining)", ["backward=implicit"]),
    ("UPG A_{5,0.5}", ["backward=upg", "k=5", "damping=0.5"]),
    ("NPG A_{5,0.5}", ["backward=npg", "k=5", "damping=0.5"]),
    ("UPG A_{9,0.5} + dropout", ["backward=upg", "k=9", "damping=0.5", "dropout=0.1"]),
]


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


BUDGETS = {
    # Used for docs/results/ablate.md: 8000 training images (a fixed subset), 2 epochs (250 steps of
    # batch 64), the full 10,000-image test set; 15 Table-1 runs and 13 Fig.-3 runs.
    "cpu": Budget(train_subset=8000, test_subset=None, epochs=2, seeds=(0, 1, 2), pretrain_steps=50,
                  ks=(1, 3, 5, 9), dampings=(0.3, 0.5, 1.0)),
    # For tests: seconds.
    "tiny": Budget(train_subset=128, test_subset=64, epochs=1, seeds=(0,), pretrain_steps=1, ks=(1, 2), dampings=(0.5, 1.0)),
}

BASE = [
    "dataset=fashion-mnist", "model=mdeq-tiny-28", "batch_size=64", "lr=0.002", "optimizer=adam",
    "solver=anderson", "solver_max_iter=12", "solver_tol=1e-3", "backward_solver=broyden",
    "backward_max_iter=12", "backward_tol=1e-4", "pretrain_depth=6", "eval_every=1000", "progress=false",
]


def _overrides(budget: Budget, extra: list[str], seed: int, out_dir: Path, base: list[str]) -> list[str]:
    subsets = [f"data_options.train_subset={budget.train_subset}"] if budget.train_subset else []
    subsets += [f"data_options.test_subset={budget.test_subset}"] if budget.test_subset else []
    extra = [e.replace("PRETRAIN", str(budget.pretrain_steps)) for e in extra]
    return base + subsets + [f"epochs={budget.epochs}", f"seed={seed}", f"out_dir={out_dir}"] + extra


def run_one(overrides: list[str], radius_batch: int = 64) -> dict[str, Any]:
    """Train one configuration; add the spectral radius of dF/dh at h* on a test batch.

    A run whose directory already holds a checkpoint is resumed (and, if it had finished,
    only re-evaluated), so an interrupted experiment picks up where it stopped."""
    cfg = TrainConfig.from_sources(None, overrides)
    trainer = Trainer(cfg, resume=(Path(cfg.out_dir) / "checkpoint.pt").exists())
    summary = trainer.fit()
    model = trainer.model.eval()
    images = torch.stack([trainer.task.eval_sets["test"][i][0] for i in range(min(radius_batch, len(trainer.task.eval_sets["test"])))])
    z, u, info = model.equilibrium(images.to(trainer.device))
    summary["spectral_radius"] = float(pg.spectral_radius(model.block, z, u, iters=30).mean())
    summary["eval_rel_residual"] = float(info.rel_residual.mean())
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_table1(budget: Budget, out_dir: Path, base: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name, extra in TABLE1_ROWS:
        runs = []
        for seed in budget.seeds:
            slug = name.split(" ")[0].lower() + f"-{TABLE1_ROWS.index((name, extra))}-s{seed}"
            log.info("table 1: %s, seed %d", name, seed)
            runs.append(run_one(_overrides(budget, extra, seed, out_dir / slug, base)))
        acc = _mean_std([r["test_accuracy"] for r in runs])
        secs = _mean_std([r["train_seconds"] for r in runs])
        rows.append({"row": name, "overrides": extra, "accuracy_mean": acc[0], "accuracy_std": acc[1],
                     "train_seconds_mean": secs[0], "spectral_radius_mean": statistics.fmean(r["spectral_radius"] for r in runs),
                     "mean_forward_steps": statistics.fmean(r["mean_forward_steps"] for r in runs),
                     "runs": runs})
    reference = rows[1]["train_seconds_mean"]  # implicit without pretraining
    for row in rows:
        row["time_vs_implicit"] = row["train_seconds_mean"] / reference
    return rows


def run_fig3(budget: Budget, out_dir: Path, base: list[str]) -> list[dict[str, Any]]:
    """One seed per point (the first of the budget's)."""
    seed = budget.seeds[0]
    points = [("UPG", k, 0.5) for k in budget.ks] + [("NPG", k, 0.5) for k in budget.ks]
    points += [("UPG", 5, lam) for lam in budget.dampings if ("UPG", 5, lam) not in points]
    results = []
    for mode, k, lam in points:
        log.info("fig 3: %s k=%d lambda=%.2f", mode, k, lam)
        extra = [f"backward={mode.lower()}", f"k={k}", f"damping={lam}"]
        summary = run_one(_overrides(budget, extra, seed, out_dir / f"{mode.lower()}-k{k}-l{lam}", base))
        results.append({"mode": mode, "k": k, "damping": lam, "test_accuracy": summary["test_accuracy"],
                        "spectral_radius": summary["spectral_radius"], "train_seconds": summary["train_seconds"]})
    return results


def format_table1(rows: list[dict[str, Any]], budget: Budget) -> str:
    lines = [f"| row | test accuracy (mean +- std, {len(budget.seeds)} seeds) | training time vs implicit | "
             "mean forward steps | spectral radius at h* |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f} | "
                     f"{r['time_vs_implicit']:.2f}x ({r['train_seconds_mean']:.0f} s) | {r['mean_forward_steps']:.1f} | "
                     f"{r['spectral_radius_mean']:.2f} |")
    return "\n".join(lines)


def format_fig3(points: list[dict[str, Any]]) -> str:
    lines = ["| mode | k | lambda | test accuracy | spectral radius at h* | training time |", "|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['mode']} | {p['k']} | {p['damping']} | {100 * p['test_accuracy']:.2f} | "
                     f"{p['spectral_radius']:.2f} | {p['train_seconds']:.0f} s |")
    return "\n".join(lines)


def plot_fig3(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode, marker in (("UPG", "o"), ("NPG", "s")):
        pts = sorted((p for p in points if p["mode"] == mode and p["damping"] == 0.5), key=lambda p: p["k"])
        axes[0].plot([p["k"] for p in pts], [100 * p["test_accuracy"] for p in pts], marker=marker, label=f"{mode}, lambda=0.5")
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
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="cpu: the committed results; tiny: seconds")
    parser.add_argument("--out", type=Path, default=Path("runs/ablate"), help="run directories and results go here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for every run (e.g. data_dir=...)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    base = BASE + [f"threads={args.threads}"] + list(args.overrides)
    TrainConfig.from_sources(None, base)  # fail fast on a bad override
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {"budget": budget.__dict__,
                              "base_overrides": base, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    text = []
    if args.what in ("table1", "both"):
        rows = run_table1(budget, args.out, base)
        result["table1"] = rows
        text.append("## Table 1\n\n" + format_table1(rows, budget))
    if args.what in ("fig3", "both"):
        points = run_fig3(budget, args.out, base)
        result["fig3"] = points
        plot_fig3(points, args.out / "fig3.png")
        text.append("## Fig. 3\n\n" + format_fig3(points) + f"\n\n![fig3]({(args.out / 'fig3.png').name})")
    result["seconds"] = time.perf_counter() - start
    report = "\n\n".join(text) + f"\n\nTotal wall time: {result['seconds'] / 60:.1f} min.\n"
    (args.out / "ablate.md").write_text(report)
    print(report)
    json_path = args.json or args.out / "ablate.json"
    json_path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out / 'ablate.md'} and {json_path}")
    return 0
