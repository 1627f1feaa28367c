"""The CLI's error contract, shown on a table of bad inputs.

Every failure a user can cause or fix ends with one line ``phantomgrad train: error: ...`` that
names the problem, a documented exit code (2: bad input or environment; 3: diverged; 130/143:
interrupted), and no file or directory left behind when the run never started. Only a bug of
ours shows a traceback, with a line saying so. The cases run in-process through ``cli.main``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

import phantomgrad.train.command as command
from phantomgrad.cli import main
from phantomgrad.train.checkpoint import save_checkpoint
from phantomgrad.train.config import TrainConfig

TINY = [
    "arch.channels=[8,8]",
    "arch.head_channels=[4,8]",
    "arch.final_channels=32",
    "batch_size=128",
    "solver_max_iter=4",
    "progress=false",
    "threads=2",
]


def _unwritable_root() -> Path | None:
    """A directory this process cannot write in, even as root (a read-only mount), or None."""
    for candidate in (Path("/sys"), Path("/proc/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    return None


UNWRITABLE = _unwritable_root()


# ---- fixtures each case may use, made in the working directory before the snapshot ------------


def make_file(root: Path) -> None:
    (root / "a_file").write_text("not a directory\n")


def make_empty_images(root: Path) -> None:
    for split in ("train", "val"):
        (root / "images" / split / "cat").mkdir(parents=True)


def make_broken_images(root: Path) -> None:
    for split in ("train", "val"):
        folder = root / "images" / split / "cat"
        folder.mkdir(parents=True)
        (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def make_bad_yaml(root: Path) -> None:
    (root / "bad.yaml").write_text("epochs: [1,\n")


def make_garbage_checkpoint(root: Path) -> None:
    (root / "run").mkdir()
    (root / "run" / "checkpoint.pt").write_bytes(b"this is not a checkpoint" * 10)


def _checkpoint(root: Path, config: dict, model: dict) -> None:
    save_checkpoint(
        root / "run" / "checkpoint.pt",
        {
            "config": config,
            "epoch": 1,
            "step": 1,
            "model": model,
            "optimizer": {},
            "scheduler": {},
            "rng": torch.get_rng_state(),
            "history": [],
        },
    )


def make_checkpoint_of_another_config(root: Path) -> None:
    cfg = TrainConfig.from_sources(None, TINY + ["arch.channels=[16,16]", f"out_dir={root / 'run'}"])
    _checkpoint(root, cfg.to_dict(), {})


def make_checkpoint_of_another_model(root: Path) -> None:
    """The same config, but weights of some other network."""
    cfg = TrainConfig.from_sources(None, TINY + ["epochs=1", f"out_dir={root / 'run'}"])
    _checkpoint(root, cfg.to_dict(), {"layer.weight": torch.zeros(3, 3)})


def make_finished_run(root: Path) -> None:
    make_checkpoint_of_another_model(root)


def make_run_dir_without_checkpoint(root: Path) -> None:
    (root / "run").mkdir()


def make_json_dir(root: Path) -> None:
    (root / "summary.json").mkdir()


def make_tu_without_graphs(root: Path) -> None:
    d = root / "tu"
    d.mkdir()
    (d / "TOY_A.txt").write_text("1, 2\n2, 1\n")
    (d / "TOY_graph_indicator.txt").write_text("1\n1\n")
    (d / "TOY_graph_labels.txt").write_text("")


def make_bad_bible(root: Path) -> None:
    (root / "text").mkdir()
    (root / "text" / "bible-kjv.txt").write_bytes(b"\xff\xfe\xfa broken" * 20)


# (id, argv after "train", exit code, message fragment, fixture or None, skip reason or None)
CASES = [
    # config
    ("unknown key", ["epoch=3"], 2, "did you mean 'epochs'", None),
    ("wrong type", ["epochs=three"], 2, "epochs must be int", None),
    ("bool for int", ["epochs=true"], 2, "epochs must be int", None),
    ("misspelled choice", ["backward=upgg"], 2, "did you mean 'upg'", None),
    ("unknown task", ["task=vision"], 2, "task must be one of image, lm, graph", None),
    ("dataset of another task", ["dataset=bible"], 2, "dataset must be one of digits", None),
    (
        "model of another task",
        ["model=ignn"],
        2,
        "model 'ignn' is not an MDEQ: task=image trains one of mdeq-tiny",
        None,
    ),
    ("not key=value", ["epochs"], 2, "must look like key=value", None),
    ("missing config file", ["--config", "missing.yaml"], 2, "does not exist", None),
    ("unparsable config file", ["--config", "bad.yaml"], 2, "could not be parsed", make_bad_yaml),
    ("unknown arch key", [*TINY, "arch.nonsense=1"], 2, "bad arch options", None),
    ("unknown data option", [*TINY, "data_options={bogus: 1}"], 2, "data_options ['bogus']", None),
    ("options of another mode", ["backward_options={k_max: 3}"], 2, "not used by backward=upg", None),
    # hyperparameters
    ("infinite lr", ["lr=inf"], 2, "lr must be > 0 and finite, got inf", None),
    ("nan lr", ["lr=.nan"], 2, "lr must be > 0 and finite, got nan", None),
    ("zero lr", ["lr=0"], 2, "lr must be > 0", None),
    ("negative weight decay", ["weight_decay=-1e-4"], 2, "weight_decay must be >= 0", None),
    ("nan weight decay", ["weight_decay=nan"], 2, "weight_decay must be >= 0 and finite, got nan", None),
    ("zero tolerance", ["solver_tol=0"], 2, "solver_tol must be > 0", None),
    ("infinite tolerance", ["backward_tol=inf"], 2, "backward_tol must be > 0 and finite", None),
    ("zero grad clip", ["grad_clip=0"], 2, "grad_clip must be > 0", None),
    ("damping above 1", ["damping=1.5"], 2, "damping must be in (0, 1]", None),
    ("nan damping", ["damping=nan"], 2, "damping must be in (0, 1], got nan", None),
    ("dropout of 1", ["dropout=1"], 2, "dropout must be in [0, 1)", None),
    ("zero batch", ["batch_size=0"], 2, "batch_size must be >= 1", None),
    ("momentum of 1", ["optimizer=sgd", "momentum=1"], 2, "momentum must be in [0, 1)", None),
    ("probability above 1", ["jac_reg_freq=2"], 2, "jac_reg_freq must be in [0, 1]", None),
    ("zero threads", ["threads=0"], 2, "threads must be >= 1", None),
    # data
    ("cifar10 without data_dir", ["dataset=cifar10"], 2, "data_dir", None),
    ("missing image folder", ["dataset=imagefolder", "data_dir=nowhere"], 2, "does not exist", None),
    ("empty image folder", ["dataset=imagefolder", "data_dir=images"], 2, "holds no", make_empty_images),
    (
        "only corrupt images",
        ["dataset=imagefolder", "data_dir=images"],
        2,
        "holds no readable image",
        make_broken_images,
    ),
    ("missing fashion-mnist", ["dataset=fashion-mnist", "data_dir=nowhere"], 2, "dataset-fashion-mnist", None),
    ("corrupt text", ["task=lm", "dataset=bible", "data_dir=text"], 2, "is not UTF-8 text", make_bad_bible),
    (
        "graph file without graphs",
        ["task=graph", "dataset=tu", "data_dir=tu", "data_options={name: TOY}"],
        2,
        "holds no graph labels",
        make_tu_without_graphs,
    ),
    # file system
    ("out_dir is a file", ["out_dir=a_file"], 2, "exists and is not a directory", make_file),
    ("out_dir under a file", ["out_dir=a_file/run"], 2, "a_file is a file", make_file),
    ("--json is a directory", ["--json", "summary.json"], 2, "is a directory", make_json_dir),
    ("--json under a file", ["--json", "a_file/s.json"], 2, "a_file exists and is not a directory", make_file),
    ("out_dir not writable", [f"out_dir={UNWRITABLE}/phantomgrad/run"], 2, "is not writable", None),
    ("--json not writable", ["--json", f"{UNWRITABLE}/summary.json"], 2, "is not writable", None),
    # checkpoints
    ("--resume without out_dir", ["--resume"], 2, "--resume needs out_dir", None),
    (
        "--resume without a checkpoint",
        ["--resume", "out_dir=run"],
        2,
        "no checkpoint.pt in run",
        make_run_dir_without_checkpoint,
    ),
    (
        "garbage checkpoint",
        [*TINY, "--resume", "out_dir=run"],
        2,
        "corrupted or not a phantomgrad checkpoint",
        make_garbage_checkpoint,
    ),
    (
        "checkpoint of another config",
        [*TINY, "--resume", "out_dir=run"],
        2,
        "different config",
        make_checkpoint_of_another_config,
    ),
    (
        "checkpoint of another model",
        [*TINY, "epochs=1", "--resume", "out_dir=run"],
        2,
        "does not fit this model",
        make_checkpoint_of_another_model,
    ),
    ("out_dir holds a run", [*TINY, "out_dir=run"], 2, "already holds a run", make_finished_run),
    # environment
    ("cuda without a GPU", ["device=cuda"], 2, "no CUDA GPU is visible", None),
]

SKIPS = {
    "out_dir not writable": None if UNWRITABLE else "no read-only directory on this machine",
    "--json not writable": None if UNWRITABLE else "no read-only directory on this machine",
    "cuda without a GPU": "a GPU is visible" if torch.cuda.is_available() else None,
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("name, argv, code, message, fixture", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line_and_leaves_nothing(
    name, argv, code, message, fixture, tmp_path, monkeypatch, capsys
):
    if SKIPS.get(name):
        pytest.skip(SKIPS[name])
    monkeypatch.chdir(tmp_path)  # the default out_dir, runs/..., would appear here
    if fixture is not None:
        fixture(tmp_path)
    before = _snapshot(tmp_path)
    assert main(["train", *argv]) == code
    err = capsys.readouterr().err
    assert err.startswith("phantomgrad train: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before  # nothing created, nothing changed


def test_the_table_covers_every_area():
    assert len(CASES) - sum(bool(SKIPS.get(c[0])) for c in CASES) >= 25


# ---- exit codes of errors raised during a run -----------------------------------------------


class _Diverged(RuntimeError):
    exit_code = 3


@pytest.mark.parametrize(
    "error, code, line",
    [
        (_Diverged("training diverged: 5 steps in a row had a non-finite loss"), 3, "training diverged"),
        (
            type("TrainingInterrupted", (RuntimeError,), {"exit_code": 143})(
                "stopped by SIGTERM; resume with --resume"
            ),
            143,
            "stopped by SIGTERM",
        ),
        (KeyboardInterrupt(), 130, "interrupted"),
        (PermissionError(13, "Permission denied", "run/metrics.csv"), 2, "run/metrics.csv"),
        (ImportError("image folders need Pillow: `pip install pillow`"), 2, "pip install pillow"),
    ],
)
def test_errors_with_an_exit_code_are_one_line(error, code, line, monkeypatch, capsys):
    def run(args):
        raise error

    monkeypatch.setattr(command, "run", run)
    assert main(["train"]) == code
    err = capsys.readouterr().err
    assert err.startswith("phantomgrad train: error: ") and err.count("\n") == 1 and line in err, err


def test_the_trainers_divergence_error_exits_3(monkeypatch, capsys):
    from phantomgrad.train.trainer import DivergenceError

    def run(args):
        raise DivergenceError("training diverged: too many non-finite steps")

    monkeypatch.setattr(command, "run", run)
    assert main(["train"]) == 3
    assert capsys.readouterr().err.count("\n") == 1


def test_a_bug_shows_its_traceback_and_says_so(monkeypatch, capsys):
    def run(args):
        return {}["no such key"]

    monkeypatch.setattr(command, "run", run)
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err
    assert "this is a bug in phantomgrad" in err.splitlines()[-1] and "report it" in err.splitlines()[-1]


def test_a_broken_import_of_our_own_is_a_bug(monkeypatch, capsys):
    def run(args):
        raise ImportError("cannot import name 'Nothing' from 'phantomgrad.solvers'", name="phantomgrad.solvers")

    monkeypatch.setattr(command, "run", run)
    assert main(["train"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_preflight_creates_nothing_it_checks(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    command.check_writable_dir(target, "out_dir")
    assert list(tmp_path.iterdir()) == []
    assert os.access(tmp_path, os.W_OK)
