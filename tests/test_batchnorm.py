"""bn_recalibrate: BatchNorm running statistics re-estimated before an evaluation equal the cumulative
average of the batches' own statistics; the trainer and `phantomgrad evaluate` apply it; a model
without BatchNorm refuses the key with one line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import tiny_overrides
from phantomgrad.cli import main
from phantomgrad.train.batchnorm import batchnorm_layers, recalibrate
from phantomgrad.train.config import ConfigError, TrainConfig
from phantomgrad.train.trainer import train

D = torch.float64


def test_recalibrate_gives_the_cumulative_average_of_the_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).to(D).eval()
    bn = model[1]
    bn.running_mean.fill_(7.0)  # stale statistics
    params = [p.detach().clone() for p in model.parameters()]
    batches = [torch.randn(5, 2, 6, 6, dtype=D) * (i + 1) + i for i in range(3)]
    assert recalibrate(model, batches, model) == 3
    with torch.no_grad():
        outs = [model[0](x) for x in batches]  # what the BatchNorm layer saw
    means = torch.stack([o.mean((0, 2, 3)) for o in outs])
    variances = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 0.1 and not model.training  # restored
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert batchnorm_layers(model) == [bn]


def _run(tmp_path, *extra):
    out = tmp_path / "-".join(["run", *extra]).replace("=", "")
    train(TrainConfig.from_sources(None, tiny_overrides(train_subset=128) + ["epochs=1", f"out_dir={out}", *extra]))
    return (
        out,
        torch.load(out / "checkpoint.pt", weights_only=False)["model"],
        json.loads((out / "summary.json").read_text()),
    )


def test_the_trainer_recalibrates_before_evaluating_and_evaluate_can_after_training(tmp_path, capsys):
    plain_dir, plain, _ = _run(tmp_path)
    run_dir, recal, summary = _run(tmp_path, "bn_recalibrate=2")
    stats = [k for k in plain if k.endswith("running_mean")]
    assert stats and all(not torch.equal(plain[k], recal[k]) for k in stats)  # re-estimated
    weights = [k for k in plain if k.endswith("weight") and "running" not in k]
    assert all(torch.equal(plain[k], recal[k]) for k in weights)  # training itself unchanged
    assert all(int(recal[k.replace("running_mean", "num_batches_tracked")]) == 2 for k in stats)
    # the same recalibration from the trained checkpoint: the same statistics, hence the same test accuracy
    out = tmp_path / "eval"
    assert main(["evaluate", str(plain_dir), "solver_max_iter=6", "bn_recalibrate=2", f"out_dir={out}"]) == 0
    doc = json.loads((out / "evaluate.json").read_text())
    assert doc["bn_recalibrate"] == 2
    assert doc["rows"][0]["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert main(["evaluate", str(plain_dir), "bn_recalibrate=-1"]) == 2
    assert "bn_recalibrate=-1: every value must be positive" in capsys.readouterr().err


def test_a_model_without_batchnorm_refuses_the_key(tmp_path):
    base = ["dataset=digits", "model=mondeq", "arch.hidden=8", "epochs=1", "progress=false", "threads=1"]
    cfg = TrainConfig.from_sources(None, [*base, "bn_recalibrate=3", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"bn_recalibrate=3: model mondeq has no BatchNorm layer"):
        train(cfg)
    assert not (tmp_path / "checkpoint.pt").exists()
