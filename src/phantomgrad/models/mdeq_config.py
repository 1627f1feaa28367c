"""The architecture of an MDEQ as plain data: the presets of the phantom-gradient paper's
experiments and :class:`MDEQConfig` (see :mod:`phantomgrad.models.mdeq` for the model)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The phantom-gradient paper's MDEQ-Tiny ablation model (its code's "mdeq_SMALL" CIFAR config);
    # 159K parameters at 3x32x32 and 10 classes (the paper says about 170K).
    "mdeq-tiny": dict(
        channels=(24, 24),
        head_channels=(8, 16),
        final_channels=200,
        expansion=5,
        num_groups=8,
        dropout=0.0,
        downsample_times=0,
        pretrain_depth=10,
    ),
    # MDEQ-Tiny adapted to 28x28 grey images (Fashion-MNIST): one stride-2 conv in the stem, so the
    # branches run at 14x14 and 7x7, with 16 and 32 channels; 167K parameters (its step time: BENCHMARKS.md).
    "mdeq-tiny-28": dict(
        channels=(16, 32),
        head_channels=(8, 16),
        final_channels=200,
        expansion=5,
        num_groups=8,
        dropout=0.0,
        downsample_times=1,
        pretrain_depth=10,
    ),
    # The larger CIFAR-10 model (MDEQ's "LARGE" CIFAR config; 11.1M parameters, the paper says about 10M).
    "mdeq-cifar": dict(
        channels=(32, 64, 128, 256),
        head_channels=(14, 28, 56, 112),
        final_channels=1680,
        expansion=5,
        num_groups=8,
        dropout=0.0,
        downsample_times=0,
        pretrain_depth=10,
    ),
    # MDEQ-Small for ImageNet (17.0M parameters at 224x224 and 1000 classes; the MDEQ paper says 18M).
    "mdeq-imagenet": dict(
        channels=(32, 64, 128, 256),
        head_channels=(28, 56, 112, 224),
        final_channels=2048,
        expansion=4,
        num_groups=8,
        dropout=0.0,
        downsample_times=2,
        pretrain_depth=5,
    ),
}


@dataclass(frozen=True)
class MDEQConfig:
    """Architecture of an :class:`MDEQ` (plain data; build one with :meth:`named`).

    Args:
        in_channels: channels of the input images.
        image_size: (H, W) of the input images (an int means square); checked in forward.
        num_classes: outputs of the classifier.
        channels: channels c_i of each resolution branch, highest resolution first.
        head_channels: width of each branch's bottleneck in the head (it outputs 4x that).
        final_channels: channels of the head's last 1x1 conv, before pooling.
        expansion: the residual block's inner width is ``expansion * c_i``.
        num_groups: GroupNorm groups in F (the post-fuse norm uses half as many).
        dropout: variational dropout probability in the residual blocks.
        downsample_times: stride-2 convs in the stem (0, 1 or 2).
        weight_norm: weight-normalise the residual-block and post-fuse convs.
        pretrain_depth: layers of the weight-tied stack for pretraining (``pg.pretraining(model, depth)``).
        outer_norm: normalisation in the stem and head (outside F): ``"batch"`` (MDEQ's) or
            ``"group"`` (GroupNorm: per sample, so results do not depend on how a batch is split
            over processes; used for exact one-process/many-process comparisons).
        init_head: give the DEQ a learned initial state (:class:`~phantomgrad.models.mdeq.MDEQInitHead`,
            two convs from the injection): the solve starts at its guess of z*, and
            ``info.init_loss`` trains it (the trainer's ``warm_start=learned`` turns this on).
    """

    in_channels: int
    image_size: tuple[int, int]
    num_classes: int
    channels: tuple[int, ...]
    head_channels: tuple[int, ...]
    final_channels: int
    expansion: int = 5
    num_groups: int = 8
    dropout: float = 0.0
    downsample_times: int = 0
    weight_norm: bool = True
    pretrain_depth: int = 10
    outer_norm: str = "batch"
    init_head: bool = False

    def __post_init__(self) -> None:
        given: Any = self.image_size  # an int is accepted for a square image
        size = (given, given) if isinstance(given, int) else tuple(given)
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "head_channels", tuple(self.head_channels))
        for name in ("in_channels", "num_classes", "final_channels", "expansion", "num_groups", "pretrain_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MDEQConfig.{name} must be an integer >= 1, got {value!r}")
        if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
            raise ValueError(
                f"MDEQConfig.image_size must be an int or (H, W) of positive ints, got {self.image_size!r}"
            )
        if not self.channels or not all(isinstance(c, int) and c >= 1 for c in self.channels):
            raise ValueError(
                f"MDEQConfig.channels must be a non-empty sequence of positive ints, got {self.channels!r}"
            )
        if len(self.head_channels) != len(self.channels):
            raise ValueError(
                f"MDEQConfig.head_channels needs one entry per branch: {len(self.channels)} branches "
                f"(channels={self.channels}) but head_channels={self.head_channels}"
            )
        bad = [c for c in self.channels if c % self.num_groups]
        if bad:
            raise ValueError(
                f"MDEQConfig.channels {self.channels} must all be divisible by num_groups={self.num_groups} "
                f"(GroupNorm); {bad} are not"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"MDEQConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.outer_norm not in ("batch", "group"):
            raise ValueError(f"MDEQConfig.outer_norm must be 'batch' or 'group', got {self.outer_norm!r}")
        if not isinstance(self.init_head, bool):
            raise ValueError(f"MDEQConfig.init_head must be true or false, got {self.init_head!r}")
        if self.downsample_times not in (0, 1, 2):
            raise ValueError(f"MDEQConfig.downsample_times must be 0, 1 or 2, got {self.downsample_times!r}")

    @property
    def num_branches(self) -> int:
        return len(self.channels)

    def branch_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every branch for inputs of ``image_size``."""
        h, w = self.image_size
        for _ in range(self.downsample_times):
            h, w = half_size(h), half_size(w)
        sizes = [(h, w)]
        for _ in range(1, self.num_branches):
            h, w = half_size(h), half_size(w)
            sizes.append((h, w))
        return sizes

    @classmethod
    def named(
        cls,
        name: str,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        num_classes: int = 10,
        **overrides: Any,
    ) -> "MDEQConfig":
        """A preset (``mdeq-tiny``, ``mdeq-cifar``, ``mdeq-imagenet``) adapted to the data.

        Any preset field can be overridden by keyword, e.g. ``dropout=0.25``; an unknown
        keyword raises TypeError (as a dataclass would), a bad value ValueError.
        """
        try:
            preset = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown MDEQ config {name!r}; choose one of {sorted(PRESETS)}") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown MDEQConfig field(s) {unknown}; valid fields are {sorted(fields)}")
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        return cls(in_channels=in_channels, image_size=size, num_classes=num_classes, **{**preset, **overrides})


def half_size(size: int) -> int:
    """Output size of a stride-2, padding-1 3x3 conv: ceil(size / 2)."""
    return (size + 1) // 2


__all__ = ["PRESETS", "MDEQConfig"]
