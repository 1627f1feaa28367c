"""The 8x8 handwritten digits bundled with scikit-learn (1,797 images, 10 classes).

Nothing to install beyond scikit-learn. The split is fixed: a stratified 80/20
train/test split with `random_state=0` (1,437 / 360 images). Pixels 0..16 are scaled
to [0, 1], then normalised with the mean and std of the training pixels.
There is no augmentation: an 8x8 digit has no room to crop, and mirrored digits
(2, 3, 7, ...) are not digits; `augment=True` is accepted and does nothing.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .images import ImageSpec, TensorImageDataset, check_split, normalise

log = logging.getLogger(__name__)

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): pixels in [0, 1] as (N, 8, 8) float32."""
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sklearn_load_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0).reshape(-1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    arrays = (x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))
    for a in arrays:
        a.setflags(write=False)  # shared by every call through the cache
    return arrays


def digits_spec() -> ImageSpec:
    """The spec of the digits; mean and std are those of the training pixels."""
    x_train = _split()[0]
    return ImageSpec(
        channels=1,
        size=8,
        num_classes=10,
        mean=(float(x_train.mean()),),
        std=(float(x_train.std()),),
    )


def load_digits(
    split: str,
    data_dir: str | Path | None = None,
    augment: bool = False,
) -> tuple[TensorImageDataset, ImageSpec]:
    """One split of the scikit-learn digits as `(1, 8, 8)` normalised images.

    `data_dir` is ignored (the data ships inside scikit-learn; a warning is logged if
    one is given); `augment` is a no-op (see the module docstring).
    """
    check_split(split)
    if data_dir is not None:
        log.warning("digits ship with scikit-learn; ignoring data_dir=%s", data_dir)
    x_train, y_train, x_test, y_test = _split()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    spec = digits_spec()
    images = normalise(torch.from_numpy(x.copy()).unsqueeze(1), spec)
    return TensorImageDataset(images, torch.from_numpy(y.copy())), spec
