"""Image classification: an MDEQ on an image dataset, cross-entropy loss, accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ..data.batch import BatchCollate, Indexed, as_batch
from ..swap import pretraining
from . import builders
from .config import ConfigError, TrainConfig
from .tasks import StepResult, Task, classification_step, mean_loss_accuracy
from .warm_start import arch_with_init_head


def build_image_task(cfg: TrainConfig) -> Task:
    from phantomgrad.data.images import load_image_dataset
    from phantomgrad.models.mdeq import MDEQ, MDEQConfig

    options = dict(cfg.data_options)
    subsets = {split: options.pop(f"{split}_subset", None) for split in ("train", "test")}
    if cfg.dataset != "imagefolder" and options:
        raise ConfigError(
            f"data_options {sorted(options)} are not used by dataset {cfg.dataset!r}; "
            "image datasets take train_subset and test_subset (imagefolder also size)"
        )
    try:
        train_set, spec = load_image_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, **options)
        test_set, _ = load_image_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, **options)
    except TypeError as err:
        raise ConfigError(f"bad data_options for {cfg.dataset}: {err}") from None
    folders = [d for d in (train_set, test_set) if hasattr(d, "unreadable")]  # image folders skip unreadable files
    train_set = _subset(train_set, subsets["train"], "train_subset")
    test_set = _subset(test_set, subsets["test"], "test_subset")
    assert cfg.model is not None  # TrainConfig resolves an unset model to the task's default
    try:
        model_cfg = MDEQConfig.named(
            cfg.model,
            in_channels=spec.channels,
            image_size=spec.size,
            num_classes=spec.num_classes,
            dropout=cfg.dropout,
            **arch_with_init_head(cfg, cfg.arch),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad arch options for {cfg.model}: {err}") from None
    model = MDEQ(model_cfg, solver=builders.build_solver(cfg), backward=builders.build_backward(cfg))

    def step(model, batch, device, global_step: int | None) -> StepResult:
        """One :class:`~phantomgrad.data.batch.Batch` (or an (images, labels) pair); global_step is the
        optimiser step about to be taken, or None in evaluation. The solve starts at ``batch.start``
        (None: the model's own start; the warm start sets it)."""
        batch = as_batch(batch)
        x, y, z0 = batch.inputs.to(device), batch.targets.to(device), batch.start
        if global_step is not None and global_step < cfg.pretrain_steps:
            with pretraining(model, cfg.pretrain_depth, cfg.solver_tol, cfg.solver_stop):
                logits, info = model(x)
        elif global_step is not None and cfg.trajectory_states:  # trajectory supervision: a loss on each state
            all_logits, info = model(x, states=tuple(cfg.trajectory_states), z0=z0)
            *earlier, logits = all_logits
            loss = F.cross_entropy(logits, y) + cfg.trajectory_weight * sum(F.cross_entropy(e, y) for e in earlier)
            return classification_step(loss, logits, y, info)
        else:
            logits, info = model(x, z0=z0)
        return classification_step(F.cross_entropy(logits, y), logits, y, info)

    def finalize(sums: dict[str, float], count: int) -> dict[str, float]:
        """Loss and accuracy; plus ``unreadable_files`` (both splits' image files that could not be
        read and were skipped, named in the log) when there are any."""
        metrics = mean_loss_accuracy(sums, count)
        unreadable = sum(len(d.unreadable) for d in folders)
        if unreadable:
            metrics["unreadable_files"] = float(unreadable)
        return metrics

    return Task(
        "image",
        model,
        Indexed(train_set),  # items (image, label, index): every batch knows its samples
        {"test": Indexed(test_set)},
        step,
        finalize,
        collate=BatchCollate(),
        progress_keys=("loss", "accuracy"),
        extra={"warm_start": "reuse"},  # what warm_start=auto means here (measured in docs/convergence.md)
    )


def _subset(dataset, size, key: str):
    """A fixed random subset of ``size`` items (the same for every run: the permutation is
    seeded by the dataset size, not by the run's seed), or the whole dataset for None."""
    if size is None:
        return dataset
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= len(dataset):
        raise ConfigError(f"data_options.{key} must be an integer in [1, {len(dataset)}], got {size!r}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(len(dataset)))
    return Subset(dataset, order[:size].tolist())
