"""The offline image datasets: shapes, splits, normalisation, augmentation, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from phantomgrad.data import cifar10, fashion_mnist, imagefolder
from phantomgrad.data.images import (
    IMAGE_DATASETS,
    ImageSpec,
    RandomCropFlip,
    TensorImageDataset,
    load_image_dataset,
)

FASHION_DIR = fashion_mnist.DEFAULT_DIR
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)


def stack(dataset, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset) if n is None else n
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    raw = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fashion(directory: Path, n: int = 6, compress: bool = True, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    suffix = ".gz" if compress else ""
    for prefix in ("train", "t10k"):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    return images


# --- dispatch --------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        load_image_dataset("mnist", "train")
    for name in IMAGE_DATASETS:
        assert name in str(e.value)


@pytest.mark.parametrize("split", ["val", "Train", ""])
def test_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        load_image_dataset("digits", split)


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="size"):
        load_image_dataset("digits", "train", size=8)


def test_spec_checks_channels():
    with pytest.raises(ValueError, match="per channel"):
        ImageSpec(channels=3, size=8, num_classes=2, mean=(0.5,), std=(0.5,))


def test_tensor_dataset_checks_inputs():
    with pytest.raises(ValueError, match="float32"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.int64))


# --- digits ----------------------------------------------------------------------------


def test_digits_splits_shapes_and_normalisation():
    train, spec = load_image_dataset("digits", "train")
    test, test_spec = load_image_dataset("digits", "test")
    assert spec == test_spec and spec.shape == (1, 8, 8) and spec.num_classes == 10
    assert len(train) + len(test) == 1797 and len(test) == 360
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(train.images.mean().item()) < 1e-4 and abs(train.images.std().item() - 1) < 1e-3
    # Stratified: every class in both splits, in about the same proportion.
    train_counts = torch.bincount(train.labels, minlength=10).float()
    test_counts = torch.bincount(test.labels, minlength=10).float()
    assert (test_counts > 0).all()
    assert torch.allclose(train_counts / len(train), test_counts / len(test), atol=0.01)
    # The pixels come back: 0..16 scaled to [0, 1].
    raw = train.images * spec.std[0] + spec.mean[0]
    assert raw.min().item() == pytest.approx(0, abs=1e-5) and raw.max().item() == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(raw * 16, (raw * 16).round(), atol=1e-4, rtol=0)


def test_digits_split_is_fixed():
    a, _ = load_image_dataset("digits", "test")
    b, _ = load_image_dataset("digits", "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_digits_augment_is_a_noop():
    train, _ = load_image_dataset("digits", "train", augment=True)
    assert torch.equal(train[3][0], train.images[3])


# --- augmentation ----------------------------------------------------------------------


def test_random_crop_flip_moves_pixels_and_pads_with_fill():
    image = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6) + 100
    aug = RandomCropFlip(padding=2, flip=True, fill=(-1.0, -2.0))
    torch.manual_seed(0)
    outs = [aug(image) for _ in range(50)]
    assert all(o.shape == image.shape for o in outs)
    assert any(not torch.equal(o, image) for o in outs)
    for o in outs:  # every value is either an image value or the channel's fill
        assert torch.isin(o[0], torch.cat([image[0].flatten(), torch.tensor([-1.0])])).all()
        assert torch.isin(o[1], torch.cat([image[1].flatten(), torch.tensor([-2.0])])).all()
    flips = RandomCropFlip(padding=0, flip=True)
    seen = {torch.equal(flips(image), image.flip(-1)) for _ in range(30)}
    assert seen == {True, False}


# --- fashion-mnist ---------------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_installed_splits():
    train, spec = load_image_dataset("fashion-mnist", "train")
    test, _ = load_image_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert spec.shape == (1, 28, 28) and spec.num_classes == 10
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and set(train.labels.unique().tolist()) == set(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # The published mean/std are those of the training pixels.
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1) < 0.01


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_from_data_dir(tmp_path, compress):
    images = write_fashion(tmp_path, n=6, compress=compress)
    test, spec = load_image_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert len(test) == 6 and test.labels.tolist() == [0, 1, 2, 3, 4, 5]
    raw = (test.images * spec.std[0] + spec.mean[0]) * 255
    torch.testing.assert_close(raw.squeeze(1), torch.from_numpy(images).float(), atol=1e-3, rtol=0)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("fashion-mnist", "train", data_dir=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "data_dir=" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate-gz", "truncate-raw", "magic", "dims"])
def test_fashion_mnist_corrupted_file(tmp_path, damage):
    compress = damage == "truncate-gz"
    write_fashion(tmp_path, n=6, compress=compress)
    bad = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))
    raw = bad.read_bytes()
    if damage.startswith("truncate"):
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "magic":
        bad.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])  # type 0x0d = float32
    else:
        write_idx(bad, np.zeros((6, 27, 28)), compress=False)
    with pytest.raises(ValueError) as e:
        load_image_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert str(bad) in str(e.value) and "reinstall" in str(e.value)


def test_fashion_mnist_augment_crops_without_flipping(tmp_path):
    write_fashion(tmp_path, n=4)
    train, spec = load_image_dataset("fashion-mnist", "train", data_dir=tmp_path)
    assert train.transform == RandomCropFlip(padding=2, flip=False, fill=spec.black)


# --- cifar10 ---------------------------------------------------------------------------


def test_cifar10_fixture_round_trip(tmp_path):
    folder = cifar10.write_fixture(tmp_path, n_train=12, n_test=5)
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    for data_dir in (tmp_path, folder):  # the parent or the folder itself
        test, spec = load_image_dataset("cifar10", "test", data_dir=data_dir)
        assert len(test) == 5 and spec.shape == (3, 32, 32) and spec.num_classes == 10
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        raw = (test.images * std + mean) * 255
        expected = torch.from_numpy(batch[b"data"]).view(5, 3, 32, 32).float()
        torch.testing.assert_close(raw, expected, atol=1e-3, rtol=0)
        assert test.labels.tolist() == batch[b"labels"]
    train, _ = load_image_dataset("cifar10", "train", data_dir=tmp_path)
    assert len(train) == 12 and train.labels.min() >= 0 and train.labels.max() < 10


def test_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_image_dataset("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="data_dir="):
        load_image_dataset("cifar10", "train")


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    folder = cifar10.write_fixture(tmp_path, n_train=5, n_test=2)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match="builtins.print"):
        load_image_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar10_augmentation_changes_train_not_test_and_is_seeded(tmp_path):
    cifar10.write_fixture(tmp_path, n_train=10, n_test=10)
    train, _ = load_image_dataset("cifar10", "train", data_dir=tmp_path)
    test, _ = load_image_dataset("cifar10", "test", data_dir=tmp_path)
    torch.manual_seed(1)
    first, _ = stack(train)
    torch.manual_seed(1)
    again, _ = stack(train)
    assert torch.equal(first, again)
    assert not torch.equal(first, train.images)
    assert torch.equal(stack(test)[0], test.images)
    off, _ = load_image_dataset("cifar10", "train", data_dir=tmp_path, augment=False)
    assert torch.equal(stack(off)[0], off.images)


# --- imagefolder -----------------------------------------------------------------------


def test_imagefolder_fixture_tiny_size(tmp_path):
    imagefolder.write_fixture(tmp_path, classes=3, per_class=4, size=16)
    train, spec = load_image_dataset("imagefolder", "train", data_dir=tmp_path, size=8)
    test, test_spec = load_image_dataset("imagefolder", "test", data_dir=tmp_path, size=8)
    assert spec == test_spec and spec.shape == (3, 8, 8) and spec.num_classes == 3
    assert len(train) == len(test) == 12
    x, y = stack(test)
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(stack(test)[0], x)  # the test transform is deterministic
    torch.manual_seed(3)
    a, _ = stack(train)
    torch.manual_seed(3)
    b, _ = stack(train)
    c, _ = stack(train)
    assert a.shape == (12, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_imagefolder_test_transform_is_centre_crop_of_resize():
    from PIL import Image

    pixels = np.arange(20 * 10 * 3, dtype=np.uint8).reshape(20, 10, 3)  # 10 wide, 20 high
    out = imagefolder.ResizeCenterCrop(resize=10, size=6)(Image.fromarray(pixels))
    assert out.size == (6, 6)
    assert np.array_equal(np.asarray(out), pixels[7:13, 2:8])


def test_imagefolder_random_resized_crop_boxes_stay_inside():
    crop = imagefolder.RandomResizedCrop(8)
    for _ in range(200):
        left, top, right, bottom = crop.box(30, 17)
        assert 0 <= left < right <= 30 and 0 <= top < bottom <= 17
        ratio = (right - left) / (bottom - top)
        assert 0.5 < ratio < 2.0


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir="):
        load_image_dataset("imagefolder", "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset("imagefolder", "train", data_dir=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_dataset("imagefolder", "train", data_dir=tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no"):
        load_image_dataset("imagefolder", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="val"):
        load_image_dataset("imagefolder", "test", data_dir=tmp_path)


def test_imagefolder_test_classes_follow_train(tmp_path):
    imagefolder.write_fixture(tmp_path, classes=3, per_class=1, size=8)
    (tmp_path / "val" / "class_0").rename(tmp_path / "test_class_0_moved")
    (tmp_path / "val").rename(tmp_path / "test")  # "test" is accepted for "val"
    test, spec = load_image_dataset("imagefolder", "test", data_dir=tmp_path, size=8)
    assert spec.num_classes == 3 and stack(test)[1].tolist() == [1, 2]
    (tmp_path / "test" / "class_9").mkdir()
    with pytest.raises(ValueError, match="class_9"):
        load_image_dataset("imagefolder", "test", data_dir=tmp_path, size=8)
