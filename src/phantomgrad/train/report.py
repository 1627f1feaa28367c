"""The run report, rendered from the files of a run directory (``phantomgrad report RUN_DIR``).

At the end of ``fit()`` the trainer records the environment (:mod:`.environment`) and calls
:func:`write_report`; the command renders it again from the files alone. Files in a run
directory (rank 0 writes them all):

    config.yaml            the full resolved config (trainer)
    metrics.csv            one row per epoch (trainer; the monitor adds grad_* columns)
    summary.json           final metrics (trainer)
    environment.json       python, torch, platform, threads, device, processes, git commit, seeds
    forward_stats.csv      per training batch: forward steps, residuals, non-converged, fallback (recorder)
    forward_hist.json      per epoch: histograms of per-sample forward steps and log10 residuals (recorder)
    gradient_quality.csv   the gradient-quality trace, when monitored (monitor_every > 0)
    adaptive_state.json    AdaptivePhantom's (k, lambda, history) per epoch, when used
    report.json            all of the above in one document
    report.md              the same for people, with report_metrics.png, report_forward.png
                           and gradient_quality.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .environment import ENV_FILE
from .monitor_callback import ADAPTIVE_FILE, PLOT_FILE, TRACE_FILE, plot_trace, read_trace
from .recorder import HIST_FILE, STATS_FILE
from .runfiles import finite_or_none, json_default, read_csv, read_json

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
METRICS_PLOT = "report_metrics.png"
FORWARD_PLOT = "report_forward.png"
# the gradient monitor's columns summarised in the report (mean, min, max, last), in table order
_QUALITY_KEYS = (
    "cosine",
    "cosine_deq",
    "norm_ratio",
    "norm_ratio_deq",
    "spectral_radius",
    "reference_converged",
    "scale",
    "k",
)


def write_report(out_dir: Path, env: dict[str, Any]) -> dict[str, Any] | None:
    """At the end of training (rank 0): write environment.json and render the report."""
    out = Path(out_dir)
    (out / ENV_FILE).write_text(json.dumps(env, indent=2, default=json_default))
    try:
        return render(out)
    except Exception as err:  # a report must never lose a finished run
        log.warning(
            "could not render the run report in %s (%s: %s); run `phantomgrad report %s` to retry",
            out,
            type(err).__name__,
            err,
            out,
        )
        return None


# ----------------------------------------------------------------------------- rendering


def render(run_dir: str | Path) -> dict[str, Any]:
    """Build report.json, report.md and the plots from the files in ``run_dir``; returns the report."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(
            f"{run_dir} has no config.yaml, so it is not a phantomgrad run directory; "
            "pass the out_dir of a training run"
        )
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    env = read_json(run_dir / ENV_FILE)
    summary = read_json(run_dir / "summary.json")
    epochs = [_numbers(r) for r in read_csv(run_dir / "metrics.csv")]
    forward = _forward_section(run_dir)
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "rendered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "seeds": (env or {}).get("seeds", {"seed": config.get("seed")}),
        "config": config,
        "summary": summary,
        "epochs": epochs,
        "forward": forward,
        "skipped_steps": (summary or {}).get("skipped_steps", epochs[-1].get("skipped_steps") if epochs else None),
        "gradient_quality": _gradient_section(run_dir),
        "adaptive": _adaptive_section(run_dir),
    }
    if epochs:
        _plot_metrics(epochs, run_dir / METRICS_PLOT)
    if forward:
        _plot_forward(forward, read_csv(run_dir / STATS_FILE), run_dir / FORWARD_PLOT)
    if report["gradient_quality"]:
        plot_trace(read_trace(run_dir / TRACE_FILE), run_dir / PLOT_FILE)
    report["files"] = sorted(
        {p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")} | {REPORT_JSON, REPORT_MD}
    )
    (run_dir / REPORT_JSON).write_text(json.dumps(finite_or_none(report), indent=2, default=json_default))
    (run_dir / REPORT_MD).write_text(_markdown(report, run_dir))
    return report


def _forward_section(run_dir: Path) -> dict[str, Any] | None:
    hist = read_json(run_dir / HIST_FILE)
    if not hist:
        return None
    per_epoch = hist.get("epochs", {})
    nstep: Counter = Counter()
    residual = [0] * (len(hist["residual_log10_edges"]) + 1)
    totals: Counter[str] = Counter()
    for e in per_epoch.values():
        nstep.update({int(k): v for k, v in e["nstep"].items()})
        residual = [a + b for a, b in zip(residual, e["residual"])]
        totals.update(
            {k: e[k] for k in ("batches", "pretrain_batches", "samples", "not_converged", "fallback", "nonfinite")}
        )
    samples = totals["samples"]
    return {
        "batches": totals["batches"],
        "pretrain_batches": totals["pretrain_batches"],
        "samples": samples,
        "not_converged": totals["not_converged"],
        "not_converged_share": totals["not_converged"] / samples if samples else None,
        "fallback": totals["fallback"],
        "nonfinite": totals["nonfinite"],
        "nstep_histogram": {str(k): nstep[k] for k in sorted(nstep)},
        "nstep_mean": sum(k * v for k, v in nstep.items()) / samples if samples else None,
        "residual_log10_edges": hist["residual_log10_edges"],
        "residual_histogram": residual,
        "per_epoch": {
            e: {k: v[k] for k in ("batches", "samples", "not_converged", "fallback", "nonfinite")}
            for e, v in per_epoch.items()
        },
    }


def _gradient_section(run_dir: Path) -> dict[str, Any] | None:
    if not (run_dir / TRACE_FILE).exists():
        return None
    trace = read_trace(run_dir / TRACE_FILE)
    if not trace:
        return None

    def stats(key: str) -> dict[str, float]:
        vals = [r[key] for r in trace if math.isfinite(r.get(key, math.nan))]
        return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "last": vals[-1]} if vals else {}

    seconds = sum(r["seconds"] for r in trace)
    summary = read_json(run_dir / "summary.json") or {}
    train_seconds = summary.get("train_seconds")
    return {
        "points": len(trace),
        "every": int(trace[1]["step"] - trace[0]["step"]) if len(trace) > 1 else None,
        **{key: stats(key) for key in _QUALITY_KEYS},
        "monitor_seconds": seconds,
        "monitor_share": seconds / train_seconds if train_seconds else None,
        "trace": TRACE_FILE,
    }


def _adaptive_section(run_dir: Path) -> dict[str, Any] | None:
    saved = read_json(run_dir / ADAPTIVE_FILE)
    if not saved:
        return None
    last_epoch = max(saved, key=int)
    states = saved[last_epoch]
    return {
        "epoch": int(last_epoch),
        "k": [s["k"] for s in states],
        "damping": [s["damping"] for s in states],
        "changes": [[h for h in s.get("history", []) if h.get("action") not in (None, "keep")] for s in states],
    }


def _markdown(report: dict[str, Any], run_dir: Path) -> str:
    cfg, env, summary = report["config"], report["environment"] or {}, report["summary"] or {}
    lines = [
        f"# Run report: {cfg.get('model')} on {cfg.get('dataset')} with backward={cfg.get('backward')}",
        "",
        f"Run directory `{run_dir}`; rendered {report['rendered']} by `phantomgrad report {run_dir}`.",
        "",
    ]
    lines += ["## Result", ""]
    if summary:
        acc = summary.get("test_accuracy")
        lines += [
            f"- test accuracy (final epoch, no selection): {acc:.4f}" if acc is not None else "- test accuracy: n/a",
            f"- epochs {summary.get('epochs')}, optimiser steps {summary.get('steps')}, "
            f"skipped steps {summary.get('skipped_steps')}",
            f"- training time {summary.get('train_seconds', math.nan):.1f} s "
            f"(median {summary.get('seconds_per_epoch', math.nan):.1f} s per epoch; "
            f"backward share {summary.get('backward_share', math.nan):.0%})",
            f"- parameters {summary.get('parameters')}, processes {summary.get('processes')}",
            "",
        ]
        final = summary.get("final_metrics", {})
        if final:
            lines += (
                ["| final metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in final.items()] + [""]
            )
    else:
        lines += ["No summary.json: the run did not finish (the tables below show what it wrote).", ""]
    lines += ["## Environment", ""]
    if env:
        keys = (
            "python",
            "torch",
            "numpy",
            "phantomgrad",
            "platform",
            "cpu_count",
            "torch_threads",
            "device",
            "device_name",
            "processes",
            "cuda",
            "git_commit",
            "git_dirty",
            "recorded",
        )
        lines += ["| | |", "|---|---|"] + [f"| {k} | {env.get(k)} |" for k in keys] + [""]
        lines += ["Seeds: " + ", ".join(f"{k} = {v}" for k, v in report["seeds"].items()), ""]
    else:
        lines += ["Not recorded (environment.json is written at the end of training).", ""]
    if report["epochs"]:
        lines += ["## Per epoch", "", f"![metrics]({METRICS_PLOT})", ""]
        cols = [
            c
            for c in report["epochs"][0]
            if c in ("epoch", "lr")
            or c.startswith(
                (
                    "train_loss",
                    "train_accuracy",
                    "test_",
                    "train_nstep",
                    "train_seconds",
                    "skipped",
                    "grad_cosine",
                    "grad_norm",
                    "adaptive_",
                    "monitor_share",
                    "grad_scale",
                )
            )
        ]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in report["epochs"]] + [""]
    lines += _health_lines(report["epochs"])
    fwd = report["forward"]
    if fwd:
        lines += [
            "## Forward solves (training batches)",
            "",
            f"![forward]({FORWARD_PLOT})",
            "",
            f"- {fwd['batches']} batches, {fwd['samples']} samples"
            + (
                f" (and {fwd['pretrain_batches']} pretraining batches through the unrolled stack)"
                if fwd["pretrain_batches"]
                else ""
            ),
            f"- mean forward steps {_fmt(fwd['nstep_mean'])}; histogram (steps: samples) "
            + ", ".join(f"{k}: {v}" for k, v in fwd["nstep_histogram"].items()),
            f"- not converged to the solver tolerance: {fwd['not_converged']} samples "
            f"({_fmt(fwd['not_converged_share'])})",
            f"- fallback solver used: {fwd['fallback']} samples; non-finite: {fwd['nonfinite']} samples; "
            f"steps skipped by the divergence guard: {report['skipped_steps']}",
            "",
        ]
    gq = report["gradient_quality"]
    if gq:
        lines += [
            "## Gradient quality (phantom vs exact, monitored)",
            "",
            "![gradient quality](gradient_quality.png)",
            "",
            f"{gq['points']} measurements (every {gq['every']} steps), {gq['monitor_seconds']:.1f} s in all"
            + (f", {gq['monitor_share']:.1%} of training time" if gq["monitor_share"] is not None else "")
            + ".",
            "",
            "| quantity | mean | min | max | last |",
            "|---|---|---|---|---|",
        ]
        for key in _QUALITY_KEYS:
            s = gq[key]
            if s:
                lines.append(f"| {key} | {_fmt(s['mean'])} | {_fmt(s['min'])} | {_fmt(s['max'])} | {_fmt(s['last'])} |")
        lines.append("")
    ad = report["adaptive"]
    if ad:
        lines += [
            "## Adaptive phantom gradient",
            "",
            f"After epoch {ad['epoch']}: k = {ad['k']}, damping = {ad['damping']}.",
            "",
        ]
        for changes in ad["changes"]:
            lines += [f"- {h['action']} -> k={h['k']}, damping={_fmt(h['damping'])}" for h in changes[:40]]
            if len(changes) > 40:
                lines.append(f"- ... {len(changes) - 40} more changes in adaptive_state.json")
        lines.append("")
    lines += [
        "## Configuration (config.yaml)",
        "",
        "```yaml",
        yaml.safe_dump(report["config"], sort_keys=False).rstrip(),
        "```",
        "",
        "Reproduce with `phantomgrad train --config config.yaml out_dir=NEW_DIR` on the environment above.",
        "",
    ]
    lines += ["## Files", ""] + [f"- `{name}`" for name in report["files"]] + [""]
    return "\n".join(lines)


def _health_lines(epochs: list[dict[str, Any]]) -> list[str]:
    """The equilibrium-health table (:mod:`.health`): per epoch and split, mean forward steps, the
    converged fraction and the final relative residual; the backward solve's (Implicit) and rho(dF/dh)."""
    if not epochs:
        return []
    cols = [c for c in epochs[0] if c == "epoch" or c.endswith(_HEALTH_SUFFIXES)]
    cols += [c for e in epochs for c in e if c.endswith(_HEALTH_SUFFIXES) and c not in cols]  # later columns
    if len(cols) < 2:
        return []
    return [
        "## Equilibrium health",
        "",
        "Per epoch and split: mean forward steps (`nstep`), fraction of samples whose forward solve met its "
        "tolerance (`converged`), mean final relative residual (`residual`); `bwd_*` the same for Implicit's "
        "backward solve; `spectral_radius` the power-iteration estimate of rho(dF/dh) at h* on a training batch "
        "(above 1: F is not a contraction there).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in epochs),
        "",
    ]


_HEALTH_SUFFIXES = ("_nstep", "_converged", "_residual", "_bwd_fallback", "_spectral_radius")


def _plot_metrics(epochs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["epoch"] for r in epochs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("train_loss", "test_loss"):
        if any(key in r for r in epochs):
            axes[0].plot(x, [r.get(key, math.nan) for r in epochs], marker="o", label=key)
    for key in ("train_accuracy", "test_accuracy"):
        if any(key in r for r in epochs):
            axes[1].plot(x, [r.get(key, math.nan) for r in epochs], marker="o", label=key)
    axes[0].set(xlabel="epoch", ylabel="loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a language model has no accuracy curve
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_forward(fwd: dict[str, Any], batches: list[dict[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    hist = {int(k): v for k, v in fwd["nstep_histogram"].items()}
    lo, hi = (min(hist), max(hist)) if hist else (0, 1)
    axes[0].stairs([hist.get(k, 0) for k in range(lo, hi + 1)], [k - 0.5 for k in range(lo, hi + 2)], fill=True)
    axes[0].set(xlabel="forward solver steps", ylabel="samples", title="forward steps per sample")
    edges = fwd["residual_log10_edges"]
    width = edges[1] - edges[0]
    # the first and last bins are open-ended: drawn one bin wide beyond the outer edges
    axes[1].stairs(fwd["residual_histogram"], [edges[0] - width] + list(edges) + [edges[-1] + width], fill=True)
    axes[1].set(xlabel="log10 relative residual", ylabel="samples", title="forward residual per sample")
    if batches:
        axes[2].semilogy([int(r["step"]) for r in batches], [float(r["rel_residual_mean"]) for r in batches], lw=0.8)
    axes[2].set(xlabel="optimiser step", ylabel="mean relative residual", title="residual along training")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- small helpers


def _numbers(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except (ValueError, AttributeError):
            out[key] = value
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


# ----------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training run's out_dir (holds config.yaml, metrics.csv, ...)")


def run(args: argparse.Namespace) -> int:
    report = render(args.run_dir)
    summary = report["summary"] or {}
    acc = summary.get("test_accuracy")
    print(
        f"wrote {args.run_dir / REPORT_MD} and {args.run_dir / REPORT_JSON}"
        + (f" (test accuracy {acc:.4f})" if acc is not None else "")
    )
    return 0


__all__ = ["write_report", "render"]
