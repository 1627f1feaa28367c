"""The forward-solve recorder: a training callback keeping, for every training batch, the forward
solve's per-sample steps and relative residuals, non-converged, fallback and non-finite counts.

Rank 0 writes (and a resumed run continues)

    forward_stats.csv   per training batch: forward steps, residuals, non-converged, fallback
    forward_hist.json   per epoch: histograms of per-sample forward steps and log10 residuals

The solver info stays on the device during the epoch; it is read at the epoch's end (or when a
checkpoint is written), and the steps the divergence guard skipped are left out.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .context import RunContext
from .runfiles import append_csv, read_csv, write_csv
from .tasks import StepResult

STATS_FILE = "forward_stats.csv"
HIST_FILE = "forward_hist.json"
# log10 bins of the relative residual: (-inf, 1e-8), [1e-8, 10^-7.75), ..., [10^0.75, 10), [10, inf)
RESIDUAL_LOG_EDGES = [e / 4 for e in range(-32, 5)]
STATS_FIELDS = [
    "step",
    "epoch",
    "samples",
    "nstep_mean",
    "nstep_max",
    "rel_residual_mean",
    "rel_residual_max",
    "not_converged",
    "fallback",
    "nonfinite",
]


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
        return {
            "batches": 0,
            "pretrain_batches": 0,
            "samples": 0,
            "not_converged": 0,
            "fallback": 0,
            "nonfinite": 0,
            "nstep": Counter(),
            "residual": [0] * (len(RESIDUAL_LOG_EDGES) + 1),
        }

    def _start(self, ctx: RunContext) -> None:
        if self._started:
            return
        self._started = True
        out = Path(ctx.out_dir)
        if not ctx.dist.is_main:
            return
        if ctx.resume and (out / HIST_FILE).exists():
            saved = json.loads((out / HIST_FILE).read_text())
            self.epochs = {e: v for e, v in saved.get("epochs", {}).items() if int(e) <= ctx.epoch}
            rows = read_csv(out / STATS_FILE)
            write_csv(out / STATS_FILE, [r for r in rows if int(r["step"]) < ctx.step], STATS_FIELDS)
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
        return {
            "rows": list(self.rows),
            "current": {
                **self._current,
                "nstep": dict(self._current["nstep"]),
                "residual": list(self._current["residual"]),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed = state

    def after_backward(self, ctx: RunContext, batch: Any, result: "StepResult") -> None:
        """Keep this step's solver info on the device; :meth:`_settle` reads it (no host sync here)."""
        self._start(ctx)
        info = result.info
        if info is None or not hasattr(info, "nstep"):
            return
        pretrain = ctx.step < ctx.config.pretrain_steps
        tensors = (
            None
            if pretrain
            else tuple(
                t.detach() for t in (info.nstep, info.rel_residual, info.converged, info.fallback, info.nonfinite)
            )
        )
        self._pending.append((ctx.step, ctx.epoch + 1, ctx.step_code, tensors))

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
        self.rows.append(
            {
                "step": step,
                "epoch": epoch,
                "samples": nstep.numel(),
                "nstep_mean": float(nstep.float().mean()),
                "nstep_max": int(nstep.max()),
                "rel_residual_mean": float(finite.mean()) if finite.numel() else math.nan,
                "rel_residual_max": float(finite.max()) if finite.numel() else math.nan,
                "not_converged": not_conv,
                "fallback": int(fallback.sum()),
                "nonfinite": int(nonfinite.sum()),
            }
        )

    def on_epoch_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        self._start(ctx)
        self._settle()
        cur = self._current
        self.epochs[str(ctx.epoch + 1)] = {
            **cur,
            "nstep": {str(k): v for k, v in sorted(cur["nstep"].items())},
            "skipped_steps_total": ctx.skipped,
        }
        if ctx.dist.is_main:
            out = Path(ctx.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            append_csv(out / STATS_FILE, self.rows, STATS_FIELDS)
            hist = {"residual_log10_edges": RESIDUAL_LOG_EDGES, "epochs": self.epochs}
            (out / HIST_FILE).write_text(json.dumps(hist, indent=1))
        self.rows = []
        self._current = self._empty()


__all__ = ["RunRecorder", "STATS_FILE", "HIST_FILE", "RESIDUAL_LOG_EDGES", "STATS_FIELDS"]
