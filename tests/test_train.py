"""The train command end to end at a tiny budget (digits, 1-2 epochs, a small MDEQ)."""

import csv
import json

import pytest
import torch

import phantomgrad as pg
from conftest import TRAIN_TINY, train_killed_in_epoch
from phantomgrad.cli import main
from phantomgrad.train.checkpoint import CheckpointError, load_checkpoint
from phantomgrad.train.config import ConfigError, TrainConfig
from phantomgrad.train.trainer import train

TINY = TRAIN_TINY


def _cfg(tmp_path, *extra):
    return TrainConfig.from_sources(None, TINY + [f"out_dir={tmp_path}", *extra])


@pytest.mark.slow
def test_train_command_writes_metrics_checkpoint_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *TINY, "epochs=2", f"out_dir={out}", "--json", str(tmp_path / "s.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy (final epoch)" in printed and "share of step time in backward" in printed
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_accuracy", "test_accuracy", "train_nstep", "lr"} <= set(rows[0])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["epochs"] == 2 and 0 <= summary["test_accuracy"] <= 1
    assert summary["test_accuracy"] == pytest.approx(
        float(rows[-1]["test_accuracy"])
    )  # the final epoch's, not the best
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert (out / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["implicit", "npg", "jfb"])
def test_every_backward_mode_trains(tmp_path, backward):
    summary = train(_cfg(tmp_path, "epochs=1", f"backward={backward}", "backward_max_iter=5"))
    assert summary["test_accuracy"] is not None and summary["train_seconds"] > 0


@pytest.mark.slow
def test_solver_fused_trains_like_the_unfused_solver(tmp_path):
    # the same run with the solvers' bookkeeping compiled: the same losses up to float32 rounding of the norms
    from phantomgrad.train.builders import build_backward, build_solver

    cfg = _cfg(tmp_path / "f", "epochs=1", "solver_fused=true", "backward=implicit", "backward_solver=anderson")
    assert build_solver(cfg).fused and build_backward(cfg).solver.fused
    train(cfg)
    train(_cfg(tmp_path / "p", "epochs=1", "backward=implicit", "backward_solver=anderson"))
    fused, plain = (next(csv.DictReader((tmp_path / d / "metrics.csv").open())) for d in ("f", "p"))
    for key in ("train_loss", "test_loss"):
        assert float(fused[key]) == pytest.approx(float(plain[key]), rel=1e-3)
    with pytest.raises(ConfigError, match="no fused"):
        build_solver(_cfg(tmp_path, "solver=reversible", "solver_fused=true"))


@pytest.mark.slow
def test_learning_happens(tmp_path):
    summary = train(_cfg(tmp_path, "epochs=3", "lr=0.005"))
    assert summary["test_accuracy"] > 0.6  # chance is 0.1


@pytest.mark.slow
def test_pretraining_steps_use_the_unrolled_model(tmp_path, monkeypatch):
    calls = []
    original = pg.Unrolled.solve

    def spy(self, fn, z0, **kwargs):
        calls.append(self.depth)
        return original(self, fn, z0, **kwargs)

    monkeypatch.setattr(pg.Unrolled, "solve", spy)
    train(_cfg(tmp_path, "epochs=1", "pretrain_steps=4", "pretrain_depth=3", "batch_size=256"))
    assert calls == [3, 3, 3, 3]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    straight = train(_cfg(tmp_path / "a", "epochs=2", "dropout=0.1"))
    train_killed_in_epoch(_cfg(tmp_path / "b", "epochs=2", "dropout=0.1"), epoch=1)
    resumed = train(_cfg(tmp_path / "b", "epochs=2", "dropout=0.1"), resume=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = lambda metrics: {k: v for k, v in metrics.items() if "seconds" not in k}  # noqa: E731
    assert timing(resumed["final_metrics"]) == timing(straight["final_metrics"])
    assert len(list(csv.DictReader((tmp_path / "b" / "metrics.csv").open()))) == 2


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path):
    train(_cfg(tmp_path, "epochs=1"))
    with pytest.raises(CheckpointError, match="lr"):
        train(_cfg(tmp_path, "epochs=2", "lr=0.1"), resume=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'epochs'" in err and err.count("\n") == 1
    assert main(["train", "dataset=cifar10", f"out_dir={tmp_path}"]) == 2
    assert "data_dir" in capsys.readouterr().err
