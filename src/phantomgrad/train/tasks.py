"""What the trainer needs from a kind of problem (images, language, graphs).

A :class:`Task` owns its data and model and knows how to turn one batch into a loss and
metric sums; the trainer owns everything else (optimisation, logging, checkpoints). New
tasks register a builder in :data:`phantomgrad.train.registry.TASKS`: ``build(cfg) -> Task``;
:func:`phantomgrad.train.builders.build_task` builds one with the step wrappers a config asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, cast

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


class SizedDataset(Protocol):
    """A map-style dataset: a length and indexing, all the trainer's DataLoaders, samplers and
    ``Subset`` use (a torch ``Dataset`` with ``__len__``, or a plain list of samples)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


def as_dataset(data: SizedDataset) -> Dataset:
    """``data`` as torch's stubs type the input of DataLoader, samplers and Subset: they only index
    map-style data and take its length, so a plain list of samples serves as well as a Dataset."""
    return cast(Dataset, data)


@dataclass
class StepResult:
    """One batch: the loss to backpropagate, metric sums over the batch, and the solver info."""

    loss: Tensor
    # e.g. {"loss": sum of losses, "correct": n correct}; tensors stay on the device until the Meter reads them
    sums: dict[str, float | Tensor]
    count: int  # samples (or tokens) the sums run over
    info: Any = None


@dataclass
class Task:
    """Data, model and per-batch loss of one problem.

    ``eval_sets`` maps split names to datasets; metrics are prefixed with the split name.
    ``step(model, batch, device, global_step)`` returns a :class:`StepResult`; global_step is
    the index of the optimiser step the batch is for, or None in evaluation;
    ``finalize(sums, count)`` turns the epoch's sums into metrics (mean loss, accuracy,
    perplexity...). A model may define ``after_optimizer_step()`` (e.g. a projection that
    keeps it well-posed); the trainer calls it after every optimiser step.
    """

    name: str
    model: nn.Module
    train_set: SizedDataset
    eval_sets: Mapping[str, SizedDataset]
    step: Callable[[nn.Module, Any, torch.device, int | None], StepResult]
    finalize: Callable[[dict[str, float], int], dict[str, float]]
    collate: Callable | None = None
    progress_keys: tuple[str, ...] = ("loss",)
    extra: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)  # the trainer adds them to its own (e.g. the warm start)


def mean_loss_accuracy(sums: dict[str, float], count: int) -> dict[str, float]:
    """Classification metrics from sums of losses and of correct predictions."""
    n = max(count, 1)
    return {"loss": sums.get("loss", 0.0) / n, "accuracy": sums.get("correct", 0.0) / n}


def classification_step(loss: Tensor, logits: Tensor, target: Tensor, info: Any) -> StepResult:
    """The :class:`StepResult` of a classification batch: the summed loss and the count of correct
    predictions as device tensors (no host sync; the :class:`~phantomgrad.train.meter.Meter`
    reads them once per logging interval). The loss sum is formed in float64, as the product of
    the host float ``float(loss) * n`` would be, so the sums do not depend on where they are read."""
    n = len(target)
    correct = (logits.argmax(1) == target).sum()
    return StepResult(loss, {"loss": loss.detach().double() * n, "correct": correct}, n, info)
