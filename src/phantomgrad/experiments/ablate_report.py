"""The tables and plots of ``phantomgrad ablate``: Table 1 (with the equilibrium-health table of the
``full_converge`` budget) and Fig. 3, from the aggregated rows of :mod:`.ablate`."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .ablate_budgets import Budget


def time_ratio(row: dict[str, Any], reference: dict[str, Any] | None) -> float | None:
    """Row's training time over the reference row's, over the seeds both finished (runs that trained
    side by side); None without a reference or a shared seed."""
    common = [s for s in row["seeds"] if reference is not None and s in reference["seeds"]]
    if reference is None or not common:
        return None

    def seconds(r: dict[str, Any]) -> float:
        return statistics.fmean(run["train_seconds"] for s, run in zip(r["seeds"], r["runs"]) if s in common)

    return seconds(row) / seconds(reference)


def _times(ratio: float | None) -> str:
    """A time ratio as the tables print it ("-" where there is none)."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def _final(row: dict[str, Any], key: str) -> float:
    """The mean over the row's seeds of a final-epoch metric (metrics.csv's last row)."""
    return statistics.fmean(float(r["final_metrics"][key]) for r in row["runs"])


def format_health(rows: list[dict[str, Any]], budget: Budget) -> str:
    """The final epoch's equilibrium health per row (means over its seeds), and each row's training
    time against the budget's reference row, against the "Implicit (today)" row where there is one, and
    against the row it trained beside (rows 0|1, 2|3, ...: the pairs of ``--jobs 2``)."""
    implicit = next((r for r in rows if r["row"].startswith("Implicit") and "today" in r["row"]), None)
    by_name = {r["row"]: r for r in rows}
    names = [name for name, _ in budget.rows]
    lines = [
        "| row | test accuracy | forward F evals per train step (final epoch; whole run) | train converged | "
        "F evals per test sample | test converged | training time | vs "
        + budget.reference
        + " | vs Implicit (today) | vs the row beside it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        beside = names.index(r["row"]) ^ 1  # rows 2j and 2j+1 train side by side under --jobs 2
        partner = by_name.get(names[beside]) if beside < len(names) else None
        lines.append(
            f"| {r['row']} | {100 * r['accuracy_mean']:.2f} | {_final(r, 'train_nstep'):.2f}; "
            f"{r['mean_forward_steps']:.2f} | {100 * _final(r, 'train_converged'):.1f}% | "
            f"{_final(r, 'test_nstep'):.2f} | {100 * _final(r, 'test_converged'):.1f}% | "
            f"{r['train_seconds_mean']:.0f} s | {_times(r['time_vs_implicit'])} | {_times(time_ratio(r, implicit))} | "
            f"{_times(time_ratio(r, partner))} |"
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


__all__ = ["format_fig3", "format_health", "format_table1", "plot_curves", "plot_fig3", "time_ratio"]
