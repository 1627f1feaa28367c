"""The run as a training callback sees it (see :mod:`phantomgrad.train.callbacks`)."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from .distributed import DistInfo

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass
class RunContext:
    """The run as a callback sees it. The trainer keeps ``step``, ``epoch``, ``skipped`` and
    ``step_code`` current before every call.

    Attributes:
        out_dir: the run directory (rank 0 writes files there).
        model: the model being trained (not a DistributedDataParallel wrapper).
        device: where the model lives.
        config: the run's :class:`~phantomgrad.train.config.TrainConfig` (read only).
        dist: rank and number of processes (``dist.is_main``: rank 0).
        resume: whether this run continues a checkpoint.
        autocast: a function returning the context the training forward runs under (bf16 or nothing).
        recompute_loss: ``recompute_loss(batch)`` is the training loss of ``batch`` at this step
            (the task's forward under ``autocast``), e.g. to compare gradients on the same batch. It
            runs under :func:`recomputing`: a task's step leaves the run as it was (the warm start
            neither stores fixed points nor starts the batch elsewhere than its training step did).
        step: index of the current training step (0-based, counts every batch of the run).
        epoch: epochs completed (the current epoch is ``epoch + 1``).
        skipped: steps the divergence guard has skipped so far (as far as the host has seen).
        step_code: this step's guard code on the device (0: the step will be applied); reading it
            is a host sync, see :mod:`phantomgrad.train.guard`.
    """

    out_dir: Path
    model: nn.Module
    device: torch.device
    config: "TrainConfig"
    dist: DistInfo
    resume: bool
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    recompute_loss: Callable[[Any], Tensor] | None = None
    step: int = 0
    epoch: int = 0
    skipped: int = 0
    step_code: Tensor | None = None

    def step_applied(self) -> bool:
        """Whether this step passed the guard so far (a host sync; call it on rare steps only)."""
        return self.step_code is None or int(self.step_code) == 0


_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("phantomgrad_recomputing", default=False)


@contextlib.contextmanager
def recomputing():
    """Marks a callback's recomputation of a training step's loss (``RunContext.recompute_loss``): what a
    task's step does to the run's state (e.g. the warm start's fixed-point cache) is skipped inside it."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def is_recomputing() -> bool:
    """Whether the running task step is a callback's recomputation (see :func:`recomputing`)."""
    return _RECOMPUTING.get()


__all__ = ["RunContext", "recomputing", "is_recomputing"]
