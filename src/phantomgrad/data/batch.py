"""A batch that knows its samples: ``Batch(inputs, targets, indices)``.

The trainer's data path is

    Indexed(dataset)[i]  ->  the dataset's item with i appended: (image, label, i), (graph, i), ...
    BatchCollate(...)    ->  Batch(inputs, targets, indices)        (indices: (B,) int64, on the CPU)
    task.step(model, batch, device, global_step)

so that whatever keeps per-sample state between visits (:class:`phantomgrad.FixedPointCache`,
the trainer's ``warm_start=reuse``) can key it by the sample's index in the task's dataset, whatever
the order the sampler draws (shuffling, ``DistributedSampler``). ``Batch.start`` is where such a
wrapper puts the initial state of the model's DEQ for this batch (``None``: the model's own
start, zeros or its learned initial state); the tasks pass it to the model as ``z0=batch.start``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate


@dataclass
class Batch:
    """One batch of a task.

    Attributes:
        inputs: what the model reads (images (B, C, H, W); tokens (B, L); a graph task's
            ``(x, adj, node_graph)``; a split name for the transductive Chains task).
        targets: labels or next tokens (None where the task has none of its own).
        indices: (B,) int64 indices of the samples in the task's dataset, on the CPU; None for
            a batch made by hand without them (then nothing per-sample applies).
        start: the initial state the model's DEQ solve starts from, or a start provider
            ``start(default) -> z0`` (e.g. :meth:`phantomgrad.FixedPointCache.start`); None: the
            model's own start. Set by the trainer's warm start, read by the task's step.
    """

    inputs: Any
    targets: Any
    indices: Tensor | None = None
    start: Any = None

    def __len__(self) -> int:
        if self.indices is not None:
            return len(self.indices)
        return len(self.targets) if self.targets is not None else 1


def as_batch(batch: Any) -> Batch:
    """``batch`` as a :class:`Batch`: a Batch unchanged, a pair ``(inputs, targets)`` or a triple
    ``(inputs, targets, indices)`` (what a DataLoader's default collate makes of the items of an
    :class:`Indexed` image or text dataset) wrapped."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return Batch(batch[0], batch[1], batch[2] if len(batch) == 3 else None)
    raise TypeError(
        f"a task's step takes a Batch(inputs, targets, indices) or an (inputs, targets[, indices]) pair, "
        f"got {type(batch).__name__}"
    )


class Indexed(Dataset):
    """``dataset`` whose items carry their index: a tuple item ``(a, b)`` becomes ``(a, b, i)``,
    any other item ``x`` becomes ``(x, i)``; ``i`` is a plain int in ``range(len(dataset))``
    (a negative index is read from the end, as Python does). Item ``[0]`` is unchanged for tuple
    items, so code that reads ``dataset[i][0]`` keeps working. (It forwards no attributes of the
    wrapped dataset: a DataLoader would take the wrapped ``__getitems__`` and lose the indices.)"""

    def __init__(self, dataset: Any):
        self.dataset: Any = dataset.dataset if isinstance(dataset, Indexed) else dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        n = len(self.dataset)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        i %= n
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)


def _pair(collated: Any) -> tuple[Any, Any]:
    return collated[0], collated[1]


@dataclass(frozen=True)
class BatchCollate:
    """The collate function of an :class:`Indexed` dataset: the items without their index go
    through ``inner`` (torch's default collate when None), ``split`` cuts its result into
    ``(inputs, targets)`` (default: its first two entries), and the indices become a (B,)
    int64 tensor."""

    inner: Callable[[list], Any] | None = None
    split: Callable[[Any], tuple[Any, Any]] = _pair

    def __call__(self, items: Sequence[tuple]) -> Batch:
        indices = torch.tensor([item[-1] for item in items], dtype=torch.int64)
        samples = [item[:-1] if len(item) > 2 else item[0] for item in items]
        collated = (self.inner or default_collate)(samples)
        inputs, targets = self.split(collated)
        return Batch(inputs, targets, indices)


__all__ = ["Batch", "Indexed", "BatchCollate", "as_batch"]
