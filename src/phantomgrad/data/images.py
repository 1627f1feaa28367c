"""Shared pieces of the image datasets: the spec, an in-memory dataset, crop/flip
augmentation, and `load_image_dataset`, which picks the module for a dataset name.

Every dataset is read offline from local files or installed packages; see docs/data.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

# name -> (module inside phantomgrad.data, loader function). Imported on demand so that
# e.g. the digits never need Pillow and the image folders never need scikit-learn.
_LOADERS: dict[str, tuple[str, str]] = {
    "digits": ("digits", "load_digits"),
    "fashion-mnist": ("fashion_mnist", "load_fashion_mnist"),
    "cifar10": ("cifar10", "load_cifar10"),
    "imagefolder": ("imagefolder", "load_imagefolder"),
}
IMAGE_DATASETS: tuple[str, ...] = tuple(_LOADERS)
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class ImageSpec:
    """What a model needs to know about an image dataset.

    Images are `(channels, size, size)` tensors, normalised per channel as
    `(pixel - mean) / std` with pixels in [0, 1]; labels are in `range(num_classes)`.
    """

    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"ImageSpec needs one mean and one std per channel: channels={self.channels}, "
                f"mean={self.mean}, std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ImageSpec std must be positive, got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one image, `(channels, size, size)`."""
        return (self.channels, self.size, self.size)

    @property
    def black(self) -> tuple[float, ...]:
        """The normalised value of a zero (black) pixel, per channel: used to pad."""
        return tuple(-m / s for m, s in zip(self.mean, self.std))


def check_split(split: str) -> str:
    """Return `split` if it is "train" or "test", else raise ValueError."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def normalise(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Return `(pixel - mean) / std` per channel as a new float32 `(N, C, H, W)` tensor.

    `images` are uint8 pixels 0..255 or floats in [0, 1]; the input is not modified.
    """
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    out = images.to(torch.float32, copy=True).contiguous()
    if images.dtype == torch.uint8:
        out.div_(255.0)
    return out.sub_(mean).div_(std)


@dataclass(frozen=True)
class RandomCropFlip:
    """Per-image augmentation on a `(C, H, W)` tensor: pad by `padding` on every side with
    `fill` (one value per channel, or one for all), take a random H x W crop, then mirror
    left-right with probability 1/2 if `flip`.

    Randomness comes from torch's global generator, so `torch.manual_seed` makes it
    reproducible (DataLoader workers get their own seeds from torch as usual).
    """

    padding: int = 4
    flip: bool = True
    fill: tuple[float, ...] | float = 0.0

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        c, h, w = image.shape
        p = self.padding
        if p > 0:
            fill = torch.as_tensor(self.fill, dtype=image.dtype).reshape(-1, 1, 1)
            canvas = fill.expand(c, h + 2 * p, w + 2 * p).clone()
            canvas[:, p : p + h, p : p + w] = image
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = canvas[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image.contiguous()


class TensorImageDataset(Dataset):
    """Images held in memory: `(N, C, H, W)` float32 normalised images, `(N,)` int64 labels.

    `transform`, if given, is applied to each image as it is read (e.g. `RandomCropFlip`);
    items are `(image, label)` with `label` a 0-d int64 tensor.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.ndim != 4 or images.dtype != torch.float32:
            raise ValueError(
                f"images must be a (N, C, H, W) float32 tensor, got shape {tuple(images.shape)} dtype {images.dtype}"
            )
        if labels.ndim != 1 or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be a (N,) int64 tensor, got shape {tuple(labels.shape)} dtype {labels.dtype}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def load_image_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    augment: bool | None = None,
    **options: object,
) -> tuple[Dataset, ImageSpec]:
    """Load one split of an image dataset, offline.

    name: one of "digits", "fashion-mnist", "cifar10", "imagefolder".
    split: "train" or "test".
    data_dir: where the files are; None means the dataset's default location
        (see docs/data.md; cifar10 and imagefolder have none).
    augment: random augmentation on each read; None means True for train, False for test.
    options: keywords only some datasets take (imagefolder: `size`); an unknown one
        raises TypeError.

    Returns the dataset, whose items are `(image, label)`, and its `ImageSpec`.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown image dataset {name!r}; valid names: {', '.join(IMAGE_DATASETS)}")
    check_split(split)
    if augment is None:
        augment = split == "train"
    module_name, function_name = _LOADERS[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    loader = getattr(module, function_name)
    return loader(split, data_dir=data_dir, augment=augment, **options)
