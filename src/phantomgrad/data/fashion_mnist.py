"""Fashion-MNIST: 60,000 train / 10,000 test 28x28 greyscale clothes, 10 classes.

Offline source: the Debian package `dataset-fashion-mnist`, which installs the four
IDX files in /usr/share/datasets/fashion-mnist; `data_dir=` points elsewhere. Files may
be gzip'ed (`*.gz`, as shipped) or not. Images are normalised with mean 0.2860 and
std 0.3530. Train augmentation is a random crop with 2 pixels of black padding only,
no mirroring: every test image is in the canonical pose (e.g. shoes point left), so
flips would spend capacity on views the test set never shows.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .images import ImageSpec, RandomCropFlip, TensorImageDataset, check_split, normalise

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPEC = ImageSpec(channels=1, size=28, num_classes=10, mean=(0.2860,), std=(0.3530,))
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08
_REINSTALL = "reinstall it (apt-get install --reinstall dataset-fashion-mnist) or replace the file"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip'ed if the name ends in .gz) as a uint8 array.

    The header is checked: two zero bytes, type code 0x08 (ubyte), the number of
    dimensions, then one big-endian uint32 per dimension; the payload must hold exactly
    their product of bytes. A file that fails any check raises ValueError naming it.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is corrupted or truncated ({e}); {_REINSTALL}") from e

    def bad(what: str) -> ValueError:
        return ValueError(f"{path} is not a valid IDX file: {what}; {_REINSTALL}")

    if len(raw) < 4:
        raise bad(f"only {len(raw)} bytes")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _UBYTE or ndim == 0:
        raise bad(f"magic number 0x{raw[:4].hex()} is not 0x000008NN (unsigned bytes, NN dims)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad(f"header cut short ({len(raw)} bytes, {ndim} dimensions need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise bad(f"dimensions {dims} need {expected} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}; install the data with "
        f"`apt-get install dataset-fashion-mnist` (it goes to {DEFAULT_DIR}) or pass "
        f"data_dir= the folder that holds the IDX files"
    )


@lru_cache(maxsize=4)
def _decode(images_path: Path, labels_path: Path, _stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded (images (N, 1, 28, 28) uint8, labels (N,) int64), cached per process.
    `_stamp` (size and mtime of both files) makes a replaced file miss the cache."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path} holds shape {images.shape}, expected (N, 28, 28); {_REINSTALL}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{labels_path} holds shape {labels.shape}, expected ({len(images)},) to match {images_path}; {_REINSTALL}"
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"{labels_path} has label {labels.max()} >= {len(CLASSES)}; {_REINSTALL}")
    # Copies: np.frombuffer arrays are read-only, which torch tensors cannot express.
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(
    split: str,
    data_dir: str | Path | None = None,
    augment: bool = False,
) -> tuple[TensorImageDataset, ImageSpec]:
    """One split of Fashion-MNIST as `(1, 28, 28)` normalised images.

    data_dir: the folder with the IDX files; None means /usr/share/datasets/fashion-mnist.
    augment: random crop with padding 2 on each read (no flip).
    Decoded files are cached in memory per process, so a second call is fast.
    """
    check_split(split)
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DIR
    images_path, labels_path = (_find(directory, stem) for stem in _FILES[split])
    stamp = tuple((s.st_size, s.st_mtime_ns) for s in map(os.stat, (images_path, labels_path)))
    images, labels = _decode(images_path.resolve(), labels_path.resolve(), stamp)
    log.debug("fashion-mnist %s: %d images from %s", split, len(images), directory)
    transform = RandomCropFlip(padding=2, flip=False, fill=SPEC.black) if augment else None
    # normalise() and clone() copy, so callers never share the cached tensors.
    return TensorImageDataset(normalise(images, SPEC), labels.clone(), transform), SPEC
