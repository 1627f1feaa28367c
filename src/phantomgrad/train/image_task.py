"""Image classification: an MDEQ on an image dataset, cross-entropy loss, accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ..swap import pretraining
from . import builders
from .config import ConfigError, TrainConfig
from .tasks import StepResult, Task, classification_step, mean_loss_accuracy


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
            **cfg.arch,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad arch options for {cfg.model}: {err}") from None
    model = MDEQ(model_cfg, solver=builders.build_solver(cfg), backward=builders.build_backward(cfg))

    def step(model, batch, device, global_step: int | None) -> StepResult:
        """global_step is the optimiser step about to be taken, or None in evaluation."""
        x, y = batch[0].to(device), batch[1].to(device)
        if global_step is not None and global_step < cfg.pretrain_steps:
            with pretraining(model, cfg.pretrain_depth, cfg.solver_tol, cfg.solver_stop):
                logits, info = model(x)
        elif global_step is not None and cfg.trajectory_states:  # trajectory supervision: a loss on each state
            all_logits, info = model(x, states=tuple(cfg.trajectory_states))
            *earlier, logits = all_logits
            loss = F.cross_entropy(logits, y) + cfg.trajectory_weight * sum(F.cross_entropy(e, y) for e in earlier)
            return classification_step(loss, logits, y, info)
        else:
            logits, info = model(x)
        return classification_step(F.cross_entropy(logits, y), logits, y, info)

    def finalize(sums: dict[str, float], count: int) -> dict[str, float]:
        """Loss and accuracy; plus ``unreadable_files`` (both splits' image files that could not be
        read and were skipped, named in the log) when there are any."""
        metrics = mean_loss_accuracy(sums, count)
        unreadable = sum(len(d.unreadable) for d in folders)
        if unreadable:
            metrics["unreadable_files"] = float(unreadable)
        return metrics

    return Task("image", model, train_set, {"test": test_set}, step, finalize, progress_keys=("loss", "accuracy"))


def _subset(dataset, size, key: str):
    """A fixed random subset of ``size`` items (the same for every run: the permutation is
    seeded by the dataset size, not by the run's seed), or the whole dataset for None."""
    if size is None:
        return dataset
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= len(dataset):
        raise ConfigError(f"data_options.{key} must be an integer in [1, {len(dataset)}], got {size!r}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(len(dataset)))
    return Subset(dataset, order[:size].tolist())
