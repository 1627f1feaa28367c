"""What a training callback sees, and the callbacks every run has.

A callback is any object with some of these methods (all optional):

    after_backward(ctx, batch, result)   after loss.backward(), before the optimiser step; may
                                         change the gradients in p.grad (e.g. rescale them)
    before_evaluate(ctx)                 before the epoch's evaluation (e.g. re-estimate BatchNorm
                                         statistics, :mod:`.batchnorm`)
    on_epoch_end(ctx, row)               after the epoch's evaluation; may add columns to ``row``
    state_dict() / load_state_dict(s)    what a checkpoint keeps of it (a run stopped mid-epoch)

``ctx`` is a :class:`~phantomgrad.train.context.RunContext`; ``result`` is the task's
:class:`~phantomgrad.train.tasks.StepResult` (``result.info`` is the forward solve's info).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from .config import TrainConfig
from .context import RunContext
from .health import EquilibriumHealth
from .monitor_callback import GradientMonitor
from .recorder import RunRecorder
from .tasks import StepResult


class Callback(Protocol):
    """Hooks into the loop; every method is optional (see the module docstring)."""

    def after_backward(self, ctx: RunContext, batch: Any, result: "StepResult") -> None: ...
    def on_epoch_end(self, ctx: RunContext, row: dict[str, Any]) -> None: ...


def default_callbacks(cfg: "TrainConfig", model: nn.Module, device: torch.device) -> list[Any]:
    """The callbacks of every run: the forward-solve recorder for the report, equilibrium health
    (backward convergence, spectral radius; :mod:`.health`), and the gradient-quality
    monitor when ``monitor_every`` is set or the backward mode is adaptive (it needs measurements)."""
    callbacks: list[Any] = [RunRecorder(), EquilibriumHealth(cfg.radius_every)]
    if cfg.monitor_every or cfg.backward == "adaptive":
        callbacks.append(GradientMonitor.from_config(cfg, model, device))
    return callbacks


__all__ = ["RunContext", "Callback", "default_callbacks"]
