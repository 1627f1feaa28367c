"""Image folders (ImageNet layout): `data_dir/train/<class>/*.png|jpg` and
`data_dir/val/<class>/*` (a folder named `test` is accepted instead of `val`).

Images are read lazily with Pillow (`pip install pillow`, or the extra
`phantomgrad[images]`). Class indices are the sorted sub-folder names of `train/`
(of the test folder alone if there is no `train/`); the test folder may hold a subset.
The paper's ImageNet transforms, written with Pillow and torch (no torchvision):
train: RandomResizedCrop(size, scale 0.08-1, ratio 3/4-4/3) + horizontal flip;
test: resize the shorter side to int(size * 256 / 224), centre crop size x size.
Normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

Unreadable files do not stop a run. The scan opens every image and checks its header
(Pillow's ``verify``: the format's structure and, for PNG, every chunk's checksum) and
leaves out files that fail, with a warning naming them; an image that passes the scan but
fails to decode when read (e.g. a truncated JPEG) is replaced by the next readable image of
the folder, with a warning. ``dataset.unreadable`` lists both kinds with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import ImageSpec, check_split

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
_TEST_DIRS = ("val", "test")


def _pil() -> Any:
    """Import Pillow on first use, with an error that says how to get it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "image folders need Pillow: `pip install pillow` (or `pip install 'phantomgrad[images]'`)"
        ) from e
    return Image


@dataclass(frozen=True)
class RandomResizedCrop:
    """Crop a random region covering `scale` of the area with aspect ratio in `ratio`
    (log-uniform), resized to `size` x `size` (bilinear); the sampling of torchvision's
    RandomResizedCrop, with torch's global generator. After 10 failed draws, falls back
    to the largest centred crop with an allowed ratio."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop, drawn at random."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(2).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                return left, top, left + w, top + h
        aspect = width / height
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image) -> Image:
        return image.resize((self.size, self.size), _pil().Resampling.BILINEAR, box=self.box(*image.size))


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Mirror left-right with probability `p` (torch's global generator)."""

    p: float = 0.5

    def __call__(self, image: Image) -> Image:
        if torch.rand(()) < self.p:
            return image.transpose(_pil().Transpose.FLIP_LEFT_RIGHT)
        return image


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Resize the shorter side to `resize` (bilinear, aspect kept), then crop the
    centre `size` x `size`."""

    resize: int
    size: int

    def __call__(self, image: Image) -> Image:
        w, h = image.size
        if w <= h:
            new_w, new_h = self.resize, int(self.resize * h / w)
        else:
            new_w, new_h = int(self.resize * w / h), self.resize
        image = image.resize((new_w, new_h), _pil().Resampling.BILINEAR)
        left = int(round((new_w - self.size) / 2.0))
        top = int(round((new_h - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


@dataclass(frozen=True)
class ToNormalisedTensor:
    """RGB Pillow image -> `(3, H, W)` float32 tensor, `(pixel / 255 - mean) / std`."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, image: Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return pixels.float().div_(255.0).sub_(mean).div_(std).contiguous()


@dataclass(frozen=True)
class Compose:
    """Apply `steps` in order."""

    steps: tuple[Callable[[Any], Any], ...]

    def __call__(self, x: Any) -> Any:
        for step in self.steps:
            x = step(x)
        return x


def train_transform(size: int = DEFAULT_SIZE) -> Compose:
    """The paper's ImageNet train transform at resolution `size`."""
    return Compose((RandomResizedCrop(size), RandomHorizontalFlip(), ToNormalisedTensor()))


def test_transform(size: int = DEFAULT_SIZE) -> Compose:
    """The paper's ImageNet test transform at resolution `size` (224 -> resize 256, crop 224)."""
    return Compose((ResizeCenterCrop(int(size * 256 / 224), size), ToNormalisedTensor()))


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a damaged or foreign file."""
    image_cls = _pil()
    return (OSError, SyntaxError, ValueError, EOFError, image_cls.DecompressionBombError)


def check_image(path: Path) -> str:
    """'' if ``path`` opens as an image whose header and structure verify, else the reason."""
    try:
        with _pil().open(path) as image:
            image.verify()
    except _unreadable_errors() as err:
        return f"{type(err).__name__}: {err}"
    return ""


def _class_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; expected one sub-folder of images per class "
            f"(pass data_dir= the folder that holds train/ and val/)"
        )
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders; put each class's images in {folder}/<class>/")
    return classes


class ImageFolderDataset(Dataset):
    """Images under `root/<class>/`, read from disk on each access.

    `classes` fixes the class order (default: sorted sub-folder names of `root`);
    items are `(transform(RGB image), label)` with `label` a 0-d int64 tensor.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Any], torch.Tensor],
        classes: list[str] | None = None,
    ) -> None:
        _pil()
        root = Path(root)
        found = [p.name for p in _class_dirs(root)]
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{root} has classes {unknown} that the train folder lacks")
        self.samples: list[tuple[Path, int]] = []
        self.unreadable: list[tuple[Path, str]] = []  # files left out (scan) or replaced (read), with the reason
        for index, name in enumerate(self.classes):
            if name not in found:
                continue
            files = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
            if not files:
                raise ValueError(f"{root / name} holds no {'/'.join(EXTENSIONS)} images")
            readable = []
            for path in files:
                reason = check_image(path)
                if reason:
                    self.unreadable.append((path, reason))
                else:
                    readable.append(path)
            if not readable:
                raise ValueError(
                    f"{root / name} holds no readable image: all {len(files)} files failed to open "
                    f"(first: {files[0].name}: {check_image(files[0])}); replace or remove them"
                )
            self.samples += [(p, index) for p in readable]
        if self.unreadable:
            shown = "; ".join(f"{path} ({reason})" for path, reason in self.unreadable[:5])
            more = f" and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
            log.warning("%s: left out %d unreadable image file(s): %s%s", root, len(self.unreadable), shown, more)
        self.root = root
        self.transform = transform
        self._bad: set[int] = set()  # indices that passed the scan but failed to decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image at ``index``; one that fails to decode is replaced by the next readable one."""
        errors = _unreadable_errors()
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                with _pil().open(path) as image:
                    image = image.convert("RGB")
            except errors as err:
                self._bad.add(i)
                self.unreadable.append((path, f"{type(err).__name__}: {err}"))
                log.warning(
                    "%s could not be decoded (%s: %s); using the next readable image instead",
                    path,
                    type(err).__name__,
                    err,
                )
                continue
            return self.transform(image), torch.tensor(label, dtype=torch.int64)
        raise ValueError(f"no image of {self.root} could be decoded; check the files")


def _split_dir(data_dir: Path, split: str) -> Path:
    if split == "train":
        return data_dir / "train"
    for name in _TEST_DIRS:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise FileNotFoundError(f"no test images in {data_dir}: expected {data_dir}/val/<class>/ (or test/<class>/)")


def load_imagefolder(
    split: str,
    data_dir: str | Path | None = None,
    augment: bool = False,
    size: int = DEFAULT_SIZE,
) -> tuple[ImageFolderDataset, ImageSpec]:
    """One split of an image folder as `(3, size, size)` normalised images.

    data_dir: the folder holding `train/` and `val/` (or `test/`); required.
    augment: the train transform (random resized crop + flip) instead of the test one
        (resize + centre crop).
    size: the output resolution (224 for ImageNet).
    """
    check_split(split)
    if data_dir is None:
        raise FileNotFoundError(
            "image folders have no default location: pass data_dir= the folder with train/ and val/"
        )
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    data_dir = Path(data_dir)
    train_dir = data_dir / "train"
    classes = [p.name for p in _class_dirs(train_dir)] if split == "train" or train_dir.is_dir() else None
    transform = train_transform(size) if augment else test_transform(size)
    dataset = ImageFolderDataset(_split_dir(data_dir, split), transform, classes)
    log.debug("imagefolder %s: %d images, %d classes in %s", split, len(dataset), len(dataset.classes), dataset.root)
    spec = ImageSpec(channels=3, size=size, num_classes=len(dataset.classes), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return dataset, spec


def write_fixture(directory: str | Path, classes: int = 3, per_class: int = 4, size: int = 16, seed: int = 0) -> Path:
    """Write tiny random RGB PNGs as `directory/{train,val}/class_<i>/<j>.png`; return `directory`.

    Each class has its own base colour plus noise, so a model can tell them apart.
    """
    image_cls = _pil()
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    for split in ("train", "val"):
        for c in range(classes):
            folder = directory / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, size=3)
            for j in range(per_class):
                noise = rng.integers(-40, 41, size=(size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                image_cls.fromarray(pixels).save(folder / f"{j}.png")
    return directory
