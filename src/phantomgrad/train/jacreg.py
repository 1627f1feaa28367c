"""Jacobian regularisation for every task and model (``jac_reg_weight``, ``jac_reg_freq``).

Bai, Koltun and Kolter (2021), "Stabilizing Equilibrium Models by Jacobian Regularization",
add ``w * ||dF/dz||_F^2 / D`` at the fixed point z* to the loss, estimated by Hutchinson's
trick with one Gaussian probe (:func:`phantomgrad.jacobian_penalty`). Here it is added in one
place for every task: :func:`with_jacobian_penalty` wraps a task's step, and a forward hook on
every :class:`~phantomgrad.DEQ` layer of the model evaluates the penalty on the layer's own
``f(z, x)`` at the state the layer returned (detached: the penalty's gradient reaches the
parameters of F and the injection x, never z*). Tensor and tuple states (MDEQ's resolutions)
alike; a model with several DEQ layers gets the sum of their penalties.

On a training step (after ``pretrain_steps``) the penalty is added with probability
``jac_reg_freq``, decided by a draw seeded by ``(seed, step)`` so that a resumed run makes the same
draws. The training metrics gain ``jac_penalty`` (mean over the steps that drew it, NaN in an
epoch without one) and ``jac_steps``; ``jac_reg_weight=0`` with ``jac_reg_freq > 0`` measures
the penalty without regularising. A task that adds the penalty itself (the language-model task,
through :meth:`~phantomgrad.models.DEQTransformer.jacobian_penalty`) says so with
``task.extra["jacobian_penalty"] = "task"`` and is left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from phantomgrad.monitor import deq_modules
from phantomgrad.regularize import jacobian_penalty

from .config import ConfigError, TrainConfig
from .tasks import StepResult, Task

log = logging.getLogger(__name__)

SUM_KEYS = ("jac_steps", "jac_penalty")


def draw(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends on (seed, step) only (a CPU generator: no device sync)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return float(torch.rand((), generator=gen))


class PenaltyHook:
    """Forward hooks on a model's DEQ layers that, while :attr:`armed`, evaluate the Jacobian
    penalty of each layer's F at the state it returned and keep it in :attr:`penalties`.

    Only in training mode with autograd recording (an evaluation or a ``no_grad`` forward adds
    nothing). Under trajectory supervision (a list of states) the penalty is taken at the final one.
    """

    def __init__(self, model: nn.Module, n_samples: int = 1):
        self.layers = deq_modules(model)
        self.n_samples = n_samples
        self.armed = False
        self.penalties: list[Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook, with_kwargs=True) for layer in self.layers]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not self.armed or not module.training or not torch.is_grad_enabled():
            return
        x = args[0] if args else kwargs["x"]
        z = output[0]
        if isinstance(z, list):  # trajectory states: [z_t1, ..., z_final]
            z = z[-1]
        z = tuple(t.detach() for t in z) if isinstance(z, tuple) else z.detach()
        self.penalties.append(jacobian_penalty(module.f, z, x, n_samples=self.n_samples))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def with_jacobian_penalty(task: "Task", cfg: TrainConfig) -> "Task":
    """``task`` with the Jacobian penalty of ``cfg`` added to its training loss (see the module
    docstring); ``task`` itself when ``jac_reg_freq`` is 0 or the task adds the penalty itself.

    Raises:
        ConfigError: ``jac_reg_freq > 0`` but the model has no DEQ layer to regularise.
    """
    if task.extra.get("jacobian_penalty") == "task":
        return task
    if cfg.jac_reg_weight > 0 and cfg.jac_reg_freq == 0:
        log.warning(
            "jac_reg_weight=%g but jac_reg_freq=0: no Jacobian penalty will be added; set jac_reg_freq > 0",
            cfg.jac_reg_weight,
        )
    if cfg.jac_reg_freq == 0:
        return task
    hook = PenaltyHook(task.model)
    if not hook.layers:
        hook.remove()
        raise ConfigError(
            f"jac_reg_freq={cfg.jac_reg_freq:g}: model {cfg.model!r} has no DEQ layer whose Jacobian could be "
            "regularised; set jac_reg_freq=0"
        )
    inner_step, inner_finalize = task.step, task.finalize

    def step(model: nn.Module, batch: Any, device: torch.device, global_step: int | None) -> "StepResult":
        training = global_step is not None
        hook.armed = (
            global_step is not None
            and global_step >= cfg.pretrain_steps
            and draw(cfg.seed, global_step) < cfg.jac_reg_freq
        )
        hook.penalties.clear()
        try:
            result = inner_step(model, batch, device, global_step)
        finally:
            armed, hook.armed = hook.armed, False
        if not training:
            return result
        result.sums.update(jac_steps=0.0, jac_penalty=0.0)  # every training step: every epoch has the columns
        if armed and hook.penalties:
            penalty = torch.stack(hook.penalties).sum()
            hook.penalties.clear()  # the graph of the penalty lives on in the loss only
            if cfg.jac_reg_weight > 0:
                result.loss = result.loss + cfg.jac_reg_weight * penalty
            result.sums.update(jac_steps=1.0, jac_penalty=penalty.detach())
        return result

    def finalize(sums: dict[str, float], count: int) -> dict[str, float]:
        own = {k: sums[k] for k in SUM_KEYS if k in sums}
        out = inner_finalize({k: v for k, v in sums.items() if k not in own}, count)
        if own:
            steps = own.get("jac_steps", 0.0)
            out["jac_penalty"] = own.get("jac_penalty", 0.0) / steps if steps else math.nan
            out["jac_steps"] = steps
        return out

    return dataclasses.replace(task, step=step, finalize=finalize)


__all__ = ["with_jacobian_penalty", "PenaltyHook", "draw"]
