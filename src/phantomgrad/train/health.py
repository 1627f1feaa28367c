"""Equilibrium health in every run: did the solves converge, and is F still a contraction at h*?

A DEQ is a DEQ only at its equilibrium, so every run records per epoch, for training and for
every evaluation split (``metrics.csv``, the summary and the report):

    <split>_nstep              mean forward steps per sample (the trainer's meter, as before)
    <split>_converged          fraction of samples whose forward solve met its tolerance
    <split>_residual           mean final relative residual ||F(z) - z|| / ||F(z)|| of the forward solve
    train_bwd_converged        Implicit only: fraction of samples whose backward solve met its tolerance
    train_bwd_residual         Implicit only: mean final relative residual of the backward solve
    train_bwd_fallback         Implicit only: fraction of samples flagged in ``info.backward.fallback``
                               (with ``pg.Implicit(fallback=...)``: those whose gradient fell back to the
                               phantom one because their backward solve failed)
    train_spectral_radius      every ``radius_every`` epochs: the power-iteration estimate of
                               rho(dF/dh) at h* (:func:`phantomgrad.spectral_radius`, ``RADIUS_ITERS``
                               steps) on the first ``RADIUS_SAMPLES`` samples of the epoch's last
                               training batch (all of it where the batch cannot be cut, e.g. a
                               graph), in eval mode, mean over the samples (max over the model's
                               DEQ layers); absent from other epochs' rows (blank in metrics.csv)

The forward figures are sums the task's step leaves on the device (:func:`with_health` wraps it),
the backward ones sums the callback adds after ``loss.backward()`` (:class:`EquilibriumHealth`,
the solve has run by then): the trainer's :class:`~phantomgrad.train.meter.Meter` reads them with
its other metrics once per logging interval, leaves out the steps the guard skipped and sums them
over processes, so nothing here waits for the device on the hot path. The spectral radius is the
one host read outside the loop (once per measured epoch, at its end).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from phantomgrad.monitor import deq_modules
from phantomgrad.regularize import spectral_radius

from .context import RunContext
from .tasks import StepResult, Task

RADIUS_ITERS = 20  # power-iteration steps of the spectral-radius estimate
RADIUS_SAMPLES = 16  # samples of the batch it is measured on (where the batch can be cut; its cost is linear in them)
FORWARD_KEYS = ("solve_samples", "solve_converged", "solve_residual", "solve_fallback")
BACKWARD_KEYS = ("bwd_samples", "bwd_converged", "bwd_residual", "bwd_fallback")


def _infos(info: Any) -> list[Any]:
    """The solver infos in a step's ``info`` (one, a list or tuple of them, or none)."""
    if isinstance(info, (list, tuple)):
        return [i for i in info if hasattr(i, "converged")]
    return [info] if hasattr(info, "converged") else []


def _sums(infos: list[Any], keys: tuple[str, ...]) -> dict[str, float | Tensor] | None:
    """Sums of samples (a host number), converged samples and relative residuals (device tensors,
    no host sync); for the backward, also the samples flagged in ``fallback``."""
    if not infos:
        return None
    samples, converged, residual, fallback = keys
    out: dict[str, float | Tensor] = {
        samples: float(sum(i.converged.numel() for i in infos)),
        converged: torch.stack([i.converged.detach().double().sum() for i in infos]).sum(),
        residual: torch.stack([i.rel_residual.detach().double().sum() for i in infos]).sum(),
    }
    if keys is BACKWARD_KEYS:
        out[fallback] = torch.stack([i.fallback.detach().double().sum() for i in infos]).sum()
    return out


def with_health(task: "Task") -> "Task":
    """``task`` whose step also sums its forward solves' convergence and residuals, and whose
    finalize turns every split's sums into ``converged`` and ``residual`` (and ``bwd_converged``,
    ``bwd_residual`` where :class:`EquilibriumHealth` added the backward's)."""
    inner_step, inner_finalize = task.step, task.finalize

    def step(model: nn.Module, batch: Any, device: torch.device, global_step: int | None) -> "StepResult":
        result = inner_step(model, batch, device, global_step)
        sums = _sums(_infos(result.info), FORWARD_KEYS)
        if sums is not None:
            result.sums.update(sums)
        return result

    def finalize(sums: dict[str, float], count: int) -> dict[str, float]:
        own = {k: sums[k] for k in FORWARD_KEYS + BACKWARD_KEYS if k in sums}
        out = inner_finalize({k: v for k, v in sums.items() if k not in own}, count)
        for prefix, (samples, converged, residual, fallback) in (("", FORWARD_KEYS), ("bwd_", BACKWARD_KEYS)):
            n = own.get(samples, 0.0)
            if n:
                out[f"{prefix}converged"] = own.get(converged, 0.0) / n
                out[f"{prefix}residual"] = own.get(residual, 0.0) / n
                if fallback in own:
                    out[f"{prefix}fallback"] = own[fallback] / n
        return out

    return dataclasses.replace(task, step=step, finalize=finalize)


def _head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of ``batch`` where that is plain to see: a tuple or list of dense tensors
    sharing their first dimension, or a dataclass batch (``inputs``, ``targets``, ``indices``) of such
    tensors with no ``start`` state; any other batch whole."""
    if isinstance(batch, (tuple, list)):
        cut = _cut(list(batch), n)
        return batch if cut is None else type(batch)(cut)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type) and getattr(batch, "start", None) is None:
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        tensors = {k: v for k, v in fields.items() if v is not None}
        cut = _cut(list(tensors.values()), n)
        if cut is not None:
            return dataclasses.replace(batch, **dict(zip(tensors, cut)))
    return batch


def _cut(tensors: list[Any], n: int) -> list[Tensor] | None:
    """Each tensor's first ``n`` rows, when all are dense tensors with the same first dimension > n."""
    if not tensors or not all(isinstance(t, Tensor) and t.dim() and not t.is_sparse for t in tensors):
        return None
    if len({t.shape[0] for t in tensors}) != 1 or tensors[0].shape[0] <= n:
        return None
    return [t[:n] for t in tensors]


class _Capture:
    """Forward hooks keeping (F, z*, x) of every DEQ layer call while open."""

    def __init__(self, model: nn.Module):
        self.calls: list[tuple[Any, Any, Any]] = []
        self.handles = [layer.register_forward_hook(self._hook, with_kwargs=True) for layer in deq_modules(model)]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        z = output[0]
        if isinstance(z, list):  # trajectory states: the final one
            z = z[-1]
        self.calls.append((module.f, z, args[0] if args else kwargs["x"]))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.calls = []


class EquilibriumHealth:
    """Training callback: the backward solve's convergence on every step (Implicit), the spectral
    radius of dF/dh at h* every ``radius_every`` epochs (0: never). See the module docstring."""

    def __init__(self, radius_every: int = 2, radius_iters: int = RADIUS_ITERS):
        self.radius_every = radius_every
        self.radius_iters = radius_iters
        self.last_batch: Any = None

    def after_backward(self, ctx: RunContext, batch: Any, result: "StepResult") -> None:
        """Add the backward solves' sums to this step's (device tensors, no host sync)."""
        backward = [i.backward for i in _infos(result.info) if getattr(i, "backward", None) is not None]
        sums = _sums(backward, BACKWARD_KEYS)
        if sums is not None:
            result.sums.update(sums)
        self.last_batch = batch  # a reference only, for the spectral radius at the epoch's end

    def on_epoch_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if not self.radius_every or "train_spectral_radius" in row:  # the lm task measures its own
            return
        due = (ctx.epoch + 1) % self.radius_every == 0 or ctx.epoch + 1 == ctx.config.epochs
        batch, self.last_batch = self.last_batch, None
        if not due or batch is None or ctx.recompute_loss is None or ctx.step < ctx.config.pretrain_steps:
            return
        row["train_spectral_radius"] = self.measure(ctx, _head(batch, RADIUS_SAMPLES))

    def measure(self, ctx: RunContext, batch: Any) -> float:
        """rho(dF/dh) at h* on ``batch`` in eval mode (dropout off, no statistics updated); the RNG
        is left as it was, so the measurement does not change the rest of the run."""
        model = ctx.model
        was_training = model.training
        capture = _Capture(model)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                model.eval()
                assert ctx.recompute_loss is not None  # checked by the caller
                with ctx.autocast():
                    ctx.recompute_loss(batch)
                radii = [spectral_radius(f, z, x, iters=self.radius_iters).float().mean() for f, z, x in capture.calls]
            return float(torch.stack(radii).max()) if radii else math.nan  # host sync, once per measured epoch
        finally:
            capture.close()
            model.train(was_training)


__all__ = ["with_health", "EquilibriumHealth", "RADIUS_ITERS"]
