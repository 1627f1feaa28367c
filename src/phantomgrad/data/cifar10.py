"""CIFAR-10: 50,000 train / 10,000 test 32x32 colour images, 10 classes.

Not installable offline here, and nothing is downloaded: put the standard python
release (the folder `cifar-10-batches-py` from cifar-10-python.tar.gz) somewhere and
pass `data_dir=` that folder or its parent. The folder holds `data_batch_1` .. `_5`
and `test_batch`, each a pickle of a dict with b"data", an (N, 3072) uint8 array
(1024 red, 1024 green, 1024 blue values, rows of 32), and b"labels", N ints.

Normalisation uses the usual mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435,
0.2616); train augmentation is a random 32x32 crop from the image padded with 4 black
pixels, then a horizontal flip with probability 1/2.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from .images import ImageSpec, RandomCropFlip, TensorImageDataset, check_split, normalise

log = logging.getLogger(__name__)

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SPEC = ImageSpec(
    channels=3,
    size=32,
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)

# The only globals a CIFAR-10 pickle refers to (numpy arrays, and _codecs.encode, which
# Python 3 protocol-2 pickles use for bytes); anything else is refused rather than run,
# since unpickling can execute arbitrary code.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a numpy array")
        return super().find_class(module, name)


def find_batches_dir(data_dir: str | Path | None) -> Path:
    """The `cifar-10-batches-py` folder: `data_dir` itself or `data_dir/cifar-10-batches-py`."""
    if data_dir is None:
        raise FileNotFoundError(
            f"CIFAR-10 has no default location (nothing is downloaded): extract "
            f"cifar-10-python.tar.gz and pass data_dir= the {FOLDER} folder or its parent"
        )
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / FOLDER):
        if (candidate / TEST_BATCHES[0]).is_file() or (candidate / TRAIN_BATCHES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {data_dir} or {data_dir / FOLDER}: put the python release "
        f"there ({FOLDER}/data_batch_1..5 and test_batch, from cifar-10-python.tar.gz) "
        f"or pass data_dir= the folder that holds it"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch {path} is missing; re-extract cifar-10-python.tar.gz")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:  # bad bytes make the unpickler raise almost anything (OverflowError, RecursionError ...)
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {str(e).strip()[:200]}); "
            "re-extract cifar-10-python.tar.gz"
        ) from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(
            f"{path}: data {data.shape} and labels {labels.shape} should be (N, 3072) and (N,); "
            f"re-extract cifar-10-python.tar.gz"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{path}: labels outside 0..9; re-extract cifar-10-python.tar.gz")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    split: str,
    data_dir: str | Path | None = None,
    augment: bool = False,
) -> tuple[TensorImageDataset, ImageSpec]:
    """One split of CIFAR-10 as `(3, 32, 32)` normalised images.

    data_dir: the `cifar-10-batches-py` folder or its parent (required).
    augment: random crop (padding 4) and horizontal flip on each read.
    """
    check_split(split)
    directory = find_batches_dir(data_dir)
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    batches = [_read_batch(directory / name) for name in names]
    data = np.concatenate([d for d, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    log.debug("cifar10 %s: %d images from %s", split, len(data), directory)
    images = normalise(torch.from_numpy(data), SPEC)
    transform = RandomCropFlip(padding=4, flip=True, fill=SPEC.black) if augment else None
    return TensorImageDataset(images, torch.from_numpy(labels), transform), SPEC


def write_fixture(directory: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """Write a small random CIFAR-10 in the python release format; return its folder.

    Creates `directory/cifar-10-batches-py/` with `data_batch_1..5` (the `n_train`
    images spread over them), `test_batch` and `batches.meta`. Pixels and labels are
    uniform random from `numpy.random.default_rng(seed)`.
    """
    rng = np.random.default_rng(seed)
    out = Path(directory) / FOLDER
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, n: int) -> None:
        batch = {
            b"batch_label": f"fixture {name}".encode(),
            b"data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            b"labels": rng.integers(0, len(CLASSES), size=n).tolist(),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(out / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for name, part in zip(TRAIN_BATCHES, np.array_split(np.arange(n_train), len(TRAIN_BATCHES))):
        write(name, len(part))
    write(TEST_BATCHES[0], n_test)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": -(-n_train // 5)}
    with open(out / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return out
