"""The gradient-quality monitor as a trainer callback (``monitor_every=N``, ``monitor_rescale=true``).

Every ``every`` optimiser steps, after ``loss.backward()`` and before the optimiser step, the
monitor recomputes the loss on the same batch with the exact gradient
(:func:`phantomgrad.monitor.gradient_quality`) and records

    step, epoch, cosine and norm ratio ||g_phantom|| / ||g_exact|| (all parameters and the
    DEQ maps F alone), rho(dF/dh) at h*, the forward residual, the seconds it took.

It then

* tells every :class:`~phantomgrad.adaptive.AdaptivePhantom` in the model (``observe``) the
  cosine over F's parameters and the forward residual;
* with ``rescale``, multiplies the phantom gradient of F's parameters (``scope="deq"``) or of
  all parameters (``scope="all"``) by s = exp(EMA of clip(-log norm_ratio, log *scale_range*))
  on every step from the first measurement on, so that SGD takes a step of the exact
  gradient's length in the phantom direction (Adam is invariant to such a scale, up to eps);
* adds per-epoch means to the metrics row (``grad_cosine``, ``grad_norm_ratio``,
  ``grad_cosine_deq``, ``grad_norm_ratio_deq``, ``grad_spectral_radius``, ``grad_scale``,
  ``monitor_seconds``, ``monitor_share`` = monitor seconds / training seconds, and
  ``adaptive_k``/``adaptive_damping`` when the model has an AdaptivePhantom);
* on rank 0 writes ``gradient_quality.csv`` (the trace), ``gradient_quality.png`` (the
  paper's Fig. 2: cosine along training) and ``adaptive_state.json`` (the adaptive modes'
  state after every epoch, restored when the run is resumed) in the run directory.

Monitoring leaves the training run as it was (``p.grad``, RNG, buffers, backward modes),
apart from the rescaling when asked for. The dropout masks are the training step's: a forward
pre-hook on the model keeps the RNG state from just before each training forward.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

import phantomgrad as pg
from phantomgrad.adaptive import AdaptivePhantom
from phantomgrad.monitor import GradientQuality, RNGState, capture_rng_state, deq_modules, gradient_quality

from .config import TrainConfig
from .context import RunContext
from .distributed import all_reduce_sum
from .runfiles import json_default, read_csv, write_csv
from .tasks import StepResult

log = logging.getLogger(__name__)

TRACE_FILE = "gradient_quality.csv"
PLOT_FILE = "gradient_quality.png"
ADAPTIVE_FILE = "adaptive_state.json"
DEFAULT_EVERY = 50
TRACE_FIELDS = [
    "step",
    "epoch",
    "cosine",
    "norm_ratio",
    "cosine_deq",
    "norm_ratio_deq",
    "phantom_norm",
    "exact_norm",
    "spectral_radius",
    "reference_converged",
    "reference_residual",
    "forward_residual",
    "forward_nstep",
    "scale",
    "k",
    "damping",
    "action",
    "seconds",
]


class GradientMonitor:
    """Trainer callback measuring phantom-gradient quality every ``every`` steps (see the module docstring).

    Args:
        every: measure on optimiser steps whose index is a multiple of ``every``. Pretraining
            steps are skipped, and so are steps whose forward ran before :meth:`bind` (the trainer
            binds the monitor to its model when it builds it; otherwise the first step binds it).
        rescale: rescale the phantom gradient by the smoothed 1 / norm_ratio.
        reference: the exact backward mode (default: ``pg.Implicit()``; from a config, the
            run's ``backward_solver``, ``backward_max_iter`` and ``backward_tol``).
        radius_iters: power-iteration steps for rho(dF/dh) (0: skip).
        scale_ema: weight of the past in the moving average of log(1 / norm_ratio).
        scale_range: (low, high) bounds on the scale; each measured 1 / norm_ratio is clipped to
            them before it enters the average.
        scope: ``"deq"`` (rescale F's parameters) or ``"all"`` (every parameter).
        plot: draw ``gradient_quality.png`` at the end of every epoch.
    """

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        rescale: bool = False,
        reference: pg.BackwardMode | None = None,
        radius_iters: int = 10,
        scale_ema: float = 0.5,
        scale_range: tuple[float, float] = (0.5, 3.0),
        scope: str = "deq",
        plot: bool = True,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every (monitor interval in steps) must be an integer >= 1, got {every!r}")
        if scope not in ("deq", "all"):
            raise ValueError(f"scope must be 'deq' (rescale the DEQ maps' gradients) or 'all', got {scope!r}")
        low, high = scale_range
        if not 0 < low <= 1 <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= 1 <= high, got {scale_range!r}")
        if not 0 <= scale_ema < 1:
            raise ValueError(f"scale_ema must be in [0, 1), got {scale_ema!r}")
        self.every = every
        self.rescale = rescale
        self.reference = reference
        self.radius_iters = radius_iters
        self.scale_ema = scale_ema
        self.scale_range = (float(low), float(high))
        self.scope = scope
        self.plot = plot
        self.scale = 1.0
        self._log_scale: float | None = None
        self.trace: list[dict[str, Any]] = []
        self._epoch_rows: list[dict[str, Any]] = []
        self._epoch_seconds = 0.0
        self._rng: RNGState | None = None
        self._hooked: torch.nn.Module | None = None
        self._resumed: dict[str, Any] | None = None  # an unfinished epoch's measurements from a checkpoint
        self._started = False

    @classmethod
    def from_config(
        cls, cfg: "TrainConfig", model: torch.nn.Module | None = None, device: torch.device | str | None = None
    ) -> "GradientMonitor":
        """The monitor a config asks for: every ``monitor_every`` steps (``DEFAULT_EVERY`` when the
        config leaves it at 0 but trains with ``backward=adaptive``, which needs measurements),
        against Implicit with the config's backward solver; bound to ``model`` when given."""
        every = cfg.monitor_every
        if not every:
            every = DEFAULT_EVERY
            log.info(
                "backward=adaptive needs gradient measurements: monitoring every %d steps "
                "(set monitor_every to change)",
                every,
            )
        solver = pg.make_solver(cfg.backward_solver, max_iter=cfg.backward_max_iter, tol=cfg.backward_tol, stop="rel")
        monitor = cls(every=every, rescale=cfg.monitor_rescale, reference=pg.Implicit(solver))
        if model is not None:
            monitor.bind(model, device)
        return monitor

    # ---- hooks ------------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module, device: torch.device | str | None = None) -> None:
        """Keep the RNG state from just before each training forward of ``model``, so that a
        measurement replays the training step's dropout masks."""
        if self._hooked is model:
            return

        def keep_rng(module, args):
            if module.training and torch.is_grad_enabled():
                self._rng = capture_rng_state(device)

        model.register_forward_pre_hook(keep_rng)
        self._hooked = model

    def _start(self, ctx: RunContext) -> None:
        """Once per fit: hook the model, and on resume take back the trace and the adaptive state."""
        if self._started:
            return
        self._started = True
        self.bind(ctx.model, ctx.device)
        out = Path(ctx.out_dir)
        if not ctx.resume:
            return
        if (out / TRACE_FILE).exists():
            self.trace = [r for r in read_trace(out / TRACE_FILE) if r["step"] < ctx.step]
            last = [r for r in self.trace if r.get("scale") is not None and math.isfinite(r["scale"])]
            if last and self.rescale:
                self.scale = last[-1]["scale"]
                self._log_scale = math.log(self.scale)
        if (out / ADAPTIVE_FILE).exists():
            saved = json.loads((out / ADAPTIVE_FILE).read_text()).get(str(ctx.epoch))
            modes = _adaptive_modes(ctx.model)
            if saved is not None and len(saved) == len(modes):
                for mode, state in zip(modes, saved):
                    mode.load_state_dict(state)
                log.info("restored the adaptive backward state of epoch %d (k=%s)", ctx.epoch, [m.k for m in modes])
        if self._resumed is not None:  # a checkpoint in the middle of an epoch: its measurements and state
            state, self._resumed = self._resumed, None
            self._epoch_rows = list(state["epoch_rows"])
            self.trace += self._epoch_rows
            self._epoch_seconds = state["epoch_seconds"]
            self.scale, self._log_scale = state["scale"], state["log_scale"]
            for mode, saved in zip(_adaptive_modes(ctx.model), state["adaptive"]):
                mode.load_state_dict(saved)

    def state_dict(self) -> dict[str, Any]:
        """This epoch's measurements, the scale and the adaptive modes' state (for a checkpoint)."""
        modes = _adaptive_modes(self._hooked) if self._hooked is not None else []
        return {
            "epoch_rows": list(self._epoch_rows),
            "epoch_seconds": self._epoch_seconds,
            "scale": self.scale,
            "log_scale": self._log_scale,
            "adaptive": [m.state_dict() for m in modes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed = state

    def after_backward(self, ctx: RunContext, batch: Any, result: "StepResult") -> None:
        self._start(ctx)
        step = ctx.step
        due = step % self.every == 0 and step >= ctx.config.pretrain_steps and self._rng is not None
        if due and ctx.step_applied():  # a host sync on measured steps only: a step the guard skips is not measured
            self._measure(ctx, batch, result)
        if self.rescale and self._log_scale is not None and self.scale != 1.0:
            for p in self._scope_params(ctx.model):
                if p.grad is not None:
                    p.grad.mul_(self.scale)

    def _measure(self, ctx: RunContext, batch: Any, result: "StepResult") -> None:
        t0 = time.perf_counter()
        model = ctx.model

        def loss_fn() -> torch.Tensor:
            assert ctx.recompute_loss is not None, "the monitor needs RunContext.recompute_loss"
            return ctx.recompute_loss(batch)

        reduce = _mean_over_processes(ctx.dist.world_size) if ctx.dist.enabled else None
        q: GradientQuality = gradient_quality(
            model, loss_fn, self.reference, rng_state=self._rng, radius_iters=self.radius_iters, reduce=reduce
        )
        info = result.info
        residual = float(info.rel_residual.double().mean()) if info is not None else math.nan
        nstep = float(info.nstep.float().mean()) if info is not None else math.nan
        if ctx.dist.enabled:
            residual = all_reduce_sum([residual], ctx.dist, ctx.device)[0] / ctx.dist.world_size
        if self.rescale:
            ratio = q.norm_ratio_deq if self.scope == "deq" else q.norm_ratio
            if math.isfinite(ratio) and ratio > 0:
                low, high = self.scale_range
                # clip each measurement before averaging, so one outlier (e.g. at initialisation, where the exact
                # solve diverges and the ratio can be 0.05) moves the average by at most log(high)
                target = min(max(-math.log(ratio), math.log(low)), math.log(high))
                self._log_scale = (
                    target
                    if self._log_scale is None
                    else self.scale_ema * self._log_scale + (1 - self.scale_ema) * target
                )
                self.scale = math.exp(self._log_scale)
        modes = _adaptive_modes(model)
        # the (k, lambda) that made this step's phantom gradient, before observe() moves them
        k_used = float(modes[0].k) if modes else _fixed(model, "k")
        damping_used = modes[0].damping if modes else _fixed(model, "damping")
        actions = [mode.observe(cosine=q.cosine_deq, residual=residual) for mode in modes]
        seconds = time.perf_counter() - t0
        row = {
            "step": ctx.step,
            "epoch": ctx.epoch + 1,
            **{k: getattr(q, k) for k in TRACE_FIELDS if hasattr(q, k)},
            "forward_residual": residual,
            "forward_nstep": nstep,
            "scale": self.scale,
            "k": k_used,
            "damping": damping_used,
            "action": ";".join(actions),
            "seconds": seconds,
        }
        self.trace.append(row)
        self._epoch_rows.append(row)
        self._epoch_seconds += seconds
        log.debug(
            "gradient quality at step %d: cosine %.4f (F: %.4f), norm ratio %.3f (F: %.3f)",
            ctx.step,
            q.cosine,
            q.cosine_deq,
            q.norm_ratio,
            q.norm_ratio_deq,
        )

    def _scope_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        if self.scope == "all":
            return list(model.parameters())
        seen: dict[int, torch.nn.Parameter] = {}
        for layer in deq_modules(model):
            for p in layer.parameters():
                seen[id(p)] = p
        return list(seen.values())

    def on_epoch_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        self._start(ctx)
        rows = self._epoch_rows
        for key in ("cosine", "norm_ratio", "cosine_deq", "norm_ratio_deq", "spectral_radius"):
            row[f"grad_{key}"] = _mean([r[key] for r in rows])
        row["grad_scale"] = self.scale
        row["monitor_seconds"] = self._epoch_seconds
        train_seconds = row.get("train_seconds") or math.nan
        row["monitor_share"] = self._epoch_seconds / train_seconds if train_seconds else math.nan
        modes = _adaptive_modes(ctx.model)
        if modes:
            row["adaptive_k"] = float(modes[0].k)
            row["adaptive_damping"] = modes[0].damping
        self._epoch_rows = []
        self._epoch_seconds = 0.0
        if ctx.dist.is_main:
            self.save(Path(ctx.out_dir), epoch=ctx.epoch + 1, modes=modes)

    # ---- files ------------------------------------------------------------------------------
    def save(self, out_dir: Path, epoch: int, modes: list[AdaptivePhantom]) -> None:
        """Write the trace CSV, the plot and (with adaptive modes) their state after ``epoch``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        write_trace(out_dir / TRACE_FILE, self.trace)
        if modes:
            path = out_dir / ADAPTIVE_FILE
            saved = json.loads(path.read_text()) if path.exists() else {}
            saved = {e: s for e, s in saved.items() if int(e) < epoch}
            saved[str(epoch)] = [m.state_dict() for m in modes]
            path.write_text(json.dumps(saved, indent=1, default=json_default))
        if self.plot and self.trace:
            plot_trace(self.trace, out_dir / PLOT_FILE)


def _adaptive_modes(model: torch.nn.Module) -> list[AdaptivePhantom]:
    return [layer.backward_mode for layer in deq_modules(model) if isinstance(layer.backward_mode, AdaptivePhantom)]


def _fixed(model: torch.nn.Module, name: str) -> float:
    layers = deq_modules(model)
    value = getattr(layers[0].backward_mode, name, None) if layers else None
    return float(value) if isinstance(value, (int, float)) else math.nan


def _mean(values: list[Any]) -> float:
    good = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(good) / len(good) if good else math.nan


def _mean_over_processes(world_size: int):
    import torch.distributed as dist

    def reduce(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        return [part.view_as(g) for part, g in zip(torch.split(flat, [g.numel() for g in grads]), grads)]

    return reduce


def _parse_row(raw: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "action":
            row[key] = value
        elif key in ("step", "epoch"):
            row[key] = int(value)
        else:
            row[key] = float(value) if value not in ("", "None") else math.nan
    return row


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``gradient_quality.csv`` as numbers."""
    return [_parse_row(r) for r in read_csv(path)]


def write_trace(path: Path, trace: list[dict[str, Any]]) -> None:
    write_csv(
        path, ({k: ("" if row.get(k) is None else row.get(k)) for k in TRACE_FIELDS} for row in trace), TRACE_FIELDS
    )


def plot_trace(trace: list[dict[str, Any]], path: Path) -> None:
    """The paper's Fig. 2 for this run: cosine to the exact gradient along training, with the
    norm ratio and (when it moves) k below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in trace]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(steps, [r["cosine"] for r in trace], marker=".", label="all parameters")
    ax1.plot(steps, [r["cosine_deq"] for r in trace], marker=".", label="parameters of F")
    ax1.set(ylabel="cosine(phantom, exact)", title="Gradient quality along training")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(steps, [r["norm_ratio"] for r in trace], marker=".", label="||phantom|| / ||exact||, all")
    ax2.plot(steps, [r["norm_ratio_deq"] for r in trace], marker=".", label="||phantom|| / ||exact||, F")
    if any(math.isfinite(r.get("spectral_radius", math.nan)) for r in trace):
        ax2.plot(steps, [r["spectral_radius"] for r in trace], marker=".", label="rho(dF/dh) at h*")
    ks = [r.get("k", math.nan) for r in trace]
    if len({k for k in ks if math.isfinite(k)}) > 1:
        twin = ax2.twinx()
        twin.step(steps, ks, where="post", color="grey", alpha=0.6, label="k")
        twin.set_ylabel("k")
    ax2.set(xlabel="optimiser step")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["GradientMonitor", "read_trace", "write_trace", "plot_trace", "TRACE_FILE", "PLOT_FILE", "ADAPTIVE_FILE"]
