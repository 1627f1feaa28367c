"""The run report: everything needed to reproduce or compare a training run, in its directory.

During training :class:`RunRecorder` (a trainer callback) keeps, for every training batch, the
forward solve's per-sample steps and relative residuals, non-converged, fallback and
non-finite counts. At the end of ``fit()``, :func:`write_report` records the environment and
renders the report; ``phantomgrad report RUN_DIR`` renders it again from the files alone.

Files in a run directory (rank 0 writes them all):

    config.yaml            the full resolved config (trainer)
    metrics.csv            one row per epoch (trainer; the monitor adds grad_* columns)
    summary.json           final metrics (trainer)
    environment.json       python, torch, platform, threads, device, processes, git commit, seeds
    forward_stats.csv      per training batch: forward steps, residuals, non-converged, fallback
    forward_hist.json      per epoch: histograms of per-sample forward steps and log10 residuals
    gradient_quality.csv   the gradient-quality trace, when monitored (monitor_every > 0)
    adaptive_state.json    AdaptivePhantom's (k, lambda, history) per epoch, when used
    report.json            all of the above in one document
    report.md              the same for people, with report_metrics.png, report_forward.png
                           and gradient_quality.png
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

if TYPE_CHECKING:
    from .tasks import StepResult
    from .trainer import Trainer

log = logging.getLogger(__name__)

ENV_FILE = "environment.json"
STATS_FILE = "forward_stats.csv"
HIST_FILE = "forward_hist.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
METRICS_PLOT = "report_metrics.png"
FORWARD_PLOT = "report_forward.png"
# log10 bins of the relative residual: (-inf, 1e-8), [1e-8, 10^-7.75), ..., [10^0.75, 10), [10, inf)
RESIDUAL_LOG_EDGES = [e / 4 for e in range(-32, 5)]
STATS_FIELDS = ["step", "epoch", "samples", "nstep_mean", "nstep_max", "rel_residual_mean", "rel_residual_max",
                "not_converged", "fallback", "nonfinite"]


# ----------------------------------------------------------------------------- recording

class RunRecorder:
    """Trainer callback: forward-solve statistics of every training batch (pretraining batches,
    whose 'solve' is the unrolled stack, are counted apart). Rank 0 writes ``forward_stats.csv``
    and ``forward_hist.json`` at the end of every epoch; a resumed run continues them."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []  # this epoch's batches
        self.epochs: dict[str, dict[str, Any]] = {}
        self._current = self._empty()
        self._pending: list[tuple] = []  # (step, epoch, guard code, device tensors or None for pretraining)
        self._resumed: dict[str, Any] | None = None  # an unfinished epoch's statistics from a checkpoint
        self._started = False

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"batches": 0, "pretrain_batches": 0, "samples": 0, "not_converged": 0, "fallback": 0, "nonfinite": 0,
                "nstep": Counter(), "residual": [0] * (len(RESIDUAL_LOG_EDGES) + 1)}

    def _start(self, trainer: "Trainer") -> None:
        if self._started:
            return
        self._started = True
        out = Path(trainer.out_dir)
        if not trainer.dist.is_main:
            return
        if trainer.resume and (out / HIST_FILE).exists():
            saved = json.loads((out / HIST_FILE).read_text())
            self.epochs = {e: v for e, v in saved.get("epochs", {}).items() if int(e) <= trainer.epoch}
            rows = _read_csv(out / STATS_FILE) if (out / STATS_FILE).exists() else []
            _write_csv(out / STATS_FILE, [r for r in rows if int(r["step"]) < trainer.step], STATS_FIELDS)
        else:
            (out / STATS_FILE).unlink(missing_ok=True)
            (out / HIST_FILE).unlink(missing_ok=True)
        if self._resumed is not None:
            self.rows = list(self._resumed["rows"])
            self._current = {**self._resumed["current"], "nstep": Counter(self._resumed["current"]["nstep"])}
            self._resumed = None

    def state_dict(self) -> dict[str, Any]:
        """This epoch's statistics so far (a checkpoint in the middle of an epoch)."""
        self._settle()
        return {"rows": list(self.rows), "current": {**self._current, "nstep": dict(self._current["nstep"]),
                                                     "residual": list(self._current["residual"])}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed = state

    def after_backward(self, trainer: "Trainer", batch: Any, result: "StepResult") -> None:
        """Keep this step's solver info on the device; :meth:`_settle` reads it (no host sync here)."""
        self._start(trainer)
        info = result.info
        if info is None or not hasattr(info, "nstep"):
            return
        pretrain = trainer.step < trainer.cfg.pretrain_steps
        tensors = None if pretrain else tuple(t.detach() for t in (info.nstep, info.rel_residual, info.converged,
                                                                   info.fallback, info.nonfinite))
        self._pending.append((trainer.step, trainer.epoch + 1, getattr(trainer, "step_code", None), tensors))

    def _settle(self) -> None:
        """Add the pending steps the guard applied (code 0) to this epoch's statistics (host syncs)."""
        cur = self._current
        for step, epoch, code, tensors in self._pending:
            if code is not None and int(code) != 0:
                continue
            if tensors is None:
                cur["pretrain_batches"] += 1
                continue
            self._add(step, epoch, *(t.cpu() for t in tensors))
        self._pending = []

    def _add(self, step: int, epoch: int, nstep, residual, converged, fallback, nonfinite) -> None:
        cur = self._current
        nstep = nstep.reshape(-1)
        res = residual.double().reshape(-1)
        not_conv = int((~converged).sum())
        logs = torch.log10(res.clamp_min(1e-300))
        edges = torch.tensor(RESIDUAL_LOG_EDGES, dtype=torch.float64)
        bins = torch.bucketize(logs, edges, right=True)  # 0: below the first edge
        bins = torch.where(torch.isfinite(res), bins, torch.full_like(bins, len(RESIDUAL_LOG_EDGES)))
        cur["batches"] += 1
        cur["samples"] += nstep.numel()
        cur["not_converged"] += not_conv
        cur["fallback"] += int(fallback.sum())
        cur["nonfinite"] += int(nonfinite.sum())
        cur["nstep"].update(int(v) for v in nstep.tolist())
        for b, n in Counter(bins.tolist()).items():
            cur["residual"][b] += n
        finite = res[torch.isfinite(res)]
        self.rows.append({"step": step, "epoch": epoch, "samples": nstep.numel(),
                          "nstep_mean": float(nstep.float().mean()), "nstep_max": int(nstep.max()),
                          "rel_residual_mean": float(finite.mean()) if finite.numel() else math.nan,
                          "rel_residual_max": float(finite.max()) if finite.numel() else math.nan,
                          "not_converged": not_conv, "fallback": int(fallback.sum()), "nonfinite": int(nonfinite.sum())})

    def on_epoch_end(self, trainer: "Trainer", row: dict[str, Any]) -> None:
        self._start(trainer)
        self._settle()
        cur = self._current
        self.epochs[str(trainer.epoch + 1)] = {**cur, "nstep": {str(k): v for k, v in sorted(cur["nstep"].items())},
                                               "skipped_steps_total": trainer.skipped}
        if trainer.dist.is_main:
            out = Path(trainer.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            _append_csv(out / STATS_FILE, self.rows, STATS_FIELDS)
            (out / HIST_FILE).write_text(json.dumps({"residual_log10_edges": RESIDUAL_LOG_EDGES, "epochs": self.epochs}, indent=1))
        self.rows = []
        self._current = self._empty()


def environment(trainer: "Trainer | None" = None) -> dict[str, Any]:
    """Versions and machine: enough to tell whether two runs are comparable."""
    import numpy

    import phantomgrad

    env: dict[str, Any] = {
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "phantomgrad": phantomgrad.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if _git("rev-parse", "HEAD") else None,
    }
    if trainer is not None:
        device = trainer.device
        env["device"] = str(device)
        env["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        env["processes"] = trainer.dist.world_size
        env["seeds"] = {"seed": trainer.cfg.seed, "torch_initial_seed": torch.initial_seed(),
                        "data_subsets": "fixed permutation seeded by the dataset size (same for every run)",
                        "batch_order": "DistributedSampler(seed=seed), set_epoch(epoch)"}
    return env


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def write_report(trainer: "Trainer") -> dict[str, Any] | None:
    """At the end of ``fit()``: record the environment and render the report (rank 0 only)."""
    if not trainer.dist.is_main:
        return None
    out = Path(trainer.out_dir)
    (out / ENV_FILE).write_text(json.dumps(environment(trainer), indent=2))
    try:
        return render(out)
    except Exception as err:  # a report must never lose a finished run
        log.warning("could not render the run report in %s (%s: %s); run `phantomgrad report %s` to retry",
                    out, type(err).__name__, err, out)
        return None


# ----------------------------------------------------------------------------- rendering

def render(run_dir: str | Path) -> dict[str, Any]:
    """Build report.json, report.md and the plots from the files in ``run_dir``; returns the report."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml, so it is not a phantomgrad run directory; "
                                "pass the out_dir of a training run")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    env = _read_json(run_dir / ENV_FILE)
    summary = _read_json(run_dir / "summary.json")
    epochs = [_numbers(r) for r in _read_csv(run_dir / "metrics.csv")] if (run_dir / "metrics.csv").exists() else []
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
        _plot_forward(forward, _read_csv(run_dir / STATS_FILE) if (run_dir / STATS_FILE).exists() else [], run_dir / FORWARD_PLOT)
    if report["gradient_quality"]:
        from .monitor_callback import PLOT_FILE, TRACE_FILE, plot_trace, read_trace

        plot_trace(read_trace(run_dir / TRACE_FILE), run_dir / PLOT_FILE)
    report["files"] = sorted({p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
                             | {REPORT_JSON, REPORT_MD})
    (run_dir / REPORT_JSON).write_text(json.dumps(_finite_or_none(report), indent=2, default=_json_default))
    (run_dir / REPORT_MD).write_text(_markdown(report, run_dir))
    return report


def _forward_section(run_dir: Path) -> dict[str, Any] | None:
    hist = _read_json(run_dir / HIST_FILE)
    if not hist:
        return None
    per_epoch = hist.get("epochs", {})
    nstep: Counter = Counter()
    residual = [0] * (len(hist["residual_log10_edges"]) + 1)
    totals = Counter()
    for e in per_epoch.values():
        nstep.update({int(k): v for k, v in e["nstep"].items()})
        residual = [a + b for a, b in zip(residual, e["residual"])]
        totals.update({k: e[k] for k in ("batches", "pretrain_batches", "samples", "not_converged", "fallback", "nonfinite")})
    samples = totals["samples"]
    return {
        "batches": totals["batches"], "pretrain_batches": totals["pretrain_batches"], "samples": samples,
        "not_converged": totals["not_converged"], "not_converged_share": totals["not_converged"] / samples if samples else None,
        "fallback": totals["fallback"], "nonfinite": totals["nonfinite"],
        "nstep_histogram": {str(k): nstep[k] for k in sorted(nstep)},
        "nstep_mean": sum(k * v for k, v in nstep.items()) / samples if samples else None,
        "residual_log10_edges": hist["residual_log10_edges"], "residual_histogram": residual,
        "per_epoch": {e: {k: v[k] for k in ("batches", "samples", "not_converged", "fallback", "nonfinite")}
                      for e, v in per_epoch.items()},
    }


def _gradient_section(run_dir: Path) -> dict[str, Any] | None:
    from .monitor_callback import TRACE_FILE, read_trace

    if not (run_dir / TRACE_FILE).exists():
        return None
    trace = read_trace(run_dir / TRACE_FILE)
    if not trace:
        return None

    def stats(key: str) -> dict[str, float]:
        vals = [r[key] for r in trace if math.isfinite(r.get(key, math.nan))]
        return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "last": vals[-1]} if vals else {}

    seconds = sum(r["seconds"] for r in trace)
    summary = _read_json(run_dir / "summary.json") or {}
    train_seconds = summary.get("train_seconds")
    return {"points": len(trace), "every": int(trace[1]["step"] - trace[0]["step"]) if len(trace) > 1 else None,
            **{key: stats(key) for key in ("cosine", "cosine_deq", "norm_ratio", "norm_ratio_deq", "spectral_radius",
                                           "reference_converged", "scale", "k")},
            "monitor_seconds": seconds, "monitor_share": seconds / train_seconds if train_seconds else None,
            "trace": TRACE_FILE}


def _adaptive_section(run_dir: Path) -> dict[str, Any] | None:
    from .monitor_callback import ADAPTIVE_FILE

    saved = _read_json(run_dir / ADAPTIVE_FILE)
    if not saved:
        return None
    last_epoch = max(saved, key=int)
    states = saved[last_epoch]
    return {"epoch": int(last_epoch), "k": [s["k"] for s in states], "damping": [s["damping"] for s in states],
            "changes": [[h for h in s.get("history", []) if h.get("action") not in (None, "keep")] for s in states]}


def _markdown(report: dict[str, Any], run_dir: Path) -> str:
    cfg, env, summary = report["config"], report["environment"] or {}, report["summary"] or {}
    lines = [f"# Run report: {cfg.get('model')} on {cfg.get('dataset')} with backward={cfg.get('backward')}", "",
             f"Run directory `{run_dir}`; rendered {report['rendered']} by `phantomgrad report {run_dir}`.", ""]
    lines += ["## Result", ""]
    if summary:
        acc = summary.get("test_accuracy")
        lines += [f"- test accuracy (final epoch, no selection): {acc:.4f}" if acc is not None else "- test accuracy: n/a",
                  f"- epochs {summary.get('epochs')}, optimiser steps {summary.get('steps')}, skipped steps {summary.get('skipped_steps')}",
                  f"- training time {summary.get('train_seconds', math.nan):.1f} s "
                  f"(median {summary.get('seconds_per_epoch', math.nan):.1f} s per epoch; "
                  f"backward share {summary.get('backward_share', math.nan):.0%})",
                  f"- parameters {summary.get('parameters')}, processes {summary.get('processes')}", ""]
        final = summary.get("final_metrics", {})
        if final:
            lines += ["| final metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in final.items()] + [""]
    else:
        lines += ["No summary.json: the run did not finish (the tables below show what it wrote).", ""]
    lines += ["## Environment", ""]
    if env:
        keys = ("python", "torch", "numpy", "phantomgrad", "platform", "cpu_count", "torch_threads", "device", "device_name",
                "processes", "cuda", "git_commit", "git_dirty", "recorded")
        lines += ["| | |", "|---|---|"] + [f"| {k} | {env.get(k)} |" for k in keys] + [""]
        lines += ["Seeds: " + ", ".join(f"{k} = {v}" for k, v in report["seeds"].items()), ""]
    else:
        lines += ["Not recorded (environment.json is written at the end of training).", ""]
    if report["epochs"]:
        lines += ["## Per epoch", "", f"![metrics]({METRICS_PLOT})", ""]
        cols = [c for c in report["epochs"][0] if c in ("epoch", "lr") or c.startswith(("train_loss", "train_accuracy", "test_", "train_nstep",
                                                                                      "train_seconds", "skipped", "grad_cosine", "grad_norm",
                                                                                      "adaptive_", "monitor_share", "grad_scale"))]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in report["epochs"]] + [""]
    fwd = report["forward"]
    if fwd:
        lines += ["## Forward solves (training batches)", "", f"![forward]({FORWARD_PLOT})", "",
                  f"- {fwd['batches']} batches, {fwd['samples']} samples"
                  + (f" (and {fwd['pretrain_batches']} pretraining batches through the unrolled stack)" if fwd["pretrain_batches"] else ""),
                  f"- mean forward steps {_fmt(fwd['nstep_mean'])}; histogram (steps: samples) "
                  + ", ".join(f"{k}: {v}" for k, v in fwd["nstep_histogram"].items()),
                  f"- not converged to the solver tolerance: {fwd['not_converged']} samples ({_fmt(fwd['not_converged_share'])})",
                  f"- fallback solver used: {fwd['fallback']} samples; non-finite: {fwd['nonfinite']} samples; "
                  f"steps skipped by the divergence guard: {report['skipped_steps']}", ""]
    gq = report["gradient_quality"]
    if gq:
        lines += ["## Gradient quality (phantom vs exact, monitored)", "", "![gradient quality](gradient_quality.png)", "",
                  f"{gq['points']} measurements (every {gq['every']} steps), {gq['monitor_seconds']:.1f} s in all"
                  + (f", {gq['monitor_share']:.1%} of training time" if gq["monitor_share"] is not None else "") + ".", "",
                  "| quantity | mean | min | max | last |", "|---|---|---|---|---|"]
        for key in ("cosine", "cosine_deq", "norm_ratio", "norm_ratio_deq", "spectral_radius", "reference_converged", "scale", "k"):
            s = gq[key]
            if s:
                lines.append(f"| {key} | {_fmt(s['mean'])} | {_fmt(s['min'])} | {_fmt(s['max'])} | {_fmt(s['last'])} |")
        lines.append("")
    ad = report["adaptive"]
    if ad:
        lines += ["## Adaptive phantom gradient", "", f"After epoch {ad['epoch']}: k = {ad['k']}, damping = {ad['damping']}.", ""]
        for changes in ad["changes"]:
            lines += [f"- {h['action']} -> k={h['k']}, damping={_fmt(h['damping'])}" for h in changes[:40]]
            if len(changes) > 40:
                lines.append(f"- ... {len(changes) - 40} more changes in adaptive_state.json")
        lines.append("")
    lines += ["## Configuration (config.yaml)", "", "```yaml", yaml.safe_dump(report["config"], sort_keys=False).rstrip(), "```", "",
              "Reproduce with `phantomgrad train --config config.yaml out_dir=NEW_DIR` on the environment above.", ""]
    lines += ["## Files", ""] + [f"- `{name}`" for name in report["files"]] + [""]
    return "\n".join(lines)


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

def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _append_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


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


def _json_default(value: Any) -> Any:
    return str(value)


def _finite_or_none(obj: Any) -> Any:
    """NaN and Inf become null, so report.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- the command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training run's out_dir (holds config.yaml, metrics.csv, ...)")


def run(args: argparse.Namespace) -> int:
    report = render(args.run_dir)
    summary = report["summary"] or {}
    acc = summary.get("test_accuracy")
    print(f"wrote {args.run_dir / REPORT_MD} and {args.run_dir / REPORT_JSON}"
          + (f" (test accuracy {acc:.4f})" if acc is not None else ""))
    return 0


__all__ = ["RunRecorder", "write_report", "render", "environment"]
