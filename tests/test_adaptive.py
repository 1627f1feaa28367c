"""AdaptivePhantom: the adaptation rule, its bounds, its gradient (UPG's at the current k), its state,
and its life in the trainer (config, monitor, checkpoints)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import phantomgrad as pg
from conftest import TanhLayer, tiny_overrides, train_killed_in_epoch
from phantomgrad.adaptive import AdaptivePhantom
from phantomgrad.train import builders
from phantomgrad.train.config import ConfigError, TrainConfig
from phantomgrad.train.trainer import train

TINY = tiny_overrides()


def test_low_cosines_raise_k_up_to_k_max_and_leave_damping_alone():
    mode = AdaptivePhantom(k=2, damping=0.5, k_min=1, k_max=5, low=0.9, high=0.98)
    ks = []
    for _ in range(6):
        mode.observe(cosine=0.5)
        ks.append(mode.k)
    assert ks == [3, 4, 5, 5, 5, 5] and mode.damping == 0.5
    assert mode.history[0]["action"].startswith("k up") and mode.history[-1]["action"].startswith("at bounds")


def test_high_cosines_lower_k_to_k_min_and_the_band_keeps_it():
    mode = AdaptivePhantom(k=4, k_min=2, k_max=6, low=0.9, high=0.98)
    assert [mode.observe(cosine=0.95) for _ in range(3)] == ["keep"] * 3 and mode.k == 4
    for _ in range(5):
        mode.observe(cosine=0.999)
    assert mode.k == 2
    mode.observe(cosine=0.5)
    assert mode.k == 3
    mode.observe(cosine=math.nan)  # ignored
    assert mode.k == 3 and mode.history[-1]["action"] == "keep"


def test_a_growing_residual_lowers_damping_to_its_floor_then_raises_k():
    mode = AdaptivePhantom(k=3, damping=0.5, residual_growth=2.0, residual_ema=0.0, damping_min=0.3, damping_factor=0.8)
    residual = 0.01
    mode.observe(cosine=0.95, residual=residual)
    for _ in range(4):
        residual *= 3  # grows by more than residual_growth each time
        mode.observe(cosine=0.95, residual=residual)
    assert [h["damping"] for h in mode.history] == pytest.approx([0.5, 0.4, 0.32, 0.3, 0.3])
    assert [h["k"] for h in mode.history] == [3, 3, 3, 3, 4]
    assert "residual" in mode.history[1]["action"] and mode.history[-1]["action"].startswith("k up")
    mode.observe(cosine=0.95, residual=residual * 1.5)  # 1.5 x the last: not growing
    assert (mode.k, mode.damping) == (4, 0.3)


def test_without_adapt_damping_a_growing_residual_raises_k():
    mode = AdaptivePhantom(k=3, adapt_damping=False, residual_ema=0.0)
    mode.observe(residual=0.01)
    mode.observe(residual=0.05)
    assert (mode.k, mode.damping) == (4, 0.5)


def test_the_running_mean_sets_what_growing_means():
    mode = AdaptivePhantom(k=3, residual_growth=2.0, residual_ema=0.5, adapt_damping=False)
    for _ in range(3):
        mode.observe(cosine=0.95, residual=0.01)
    mode.observe(cosine=0.95, residual=0.031)  # above 2 x 0.01
    assert mode.k == 4
    mode.observe(cosine=0.95, residual=0.03)  # below 2 x the running mean 0.5 * 0.01 + 0.5 * 0.031
    assert mode.k == 4


@pytest.mark.parametrize(
    "bad",
    [
        dict(k=11),
        dict(k_min=3, k=2),
        dict(low=0.99, high=0.9),
        dict(damping_min=0.9),
        dict(damping_factor=1.0),
        dict(residual_growth=1.0),
        dict(k_step=0),
        dict(k_max=True),
        dict(adapt_damping=1),
        dict(low=float("nan")),
    ],
)
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        AdaptivePhantom(**bad)


def test_its_gradient_is_upg_at_the_current_k_and_damping():
    torch.manual_seed(0)
    f = TanhLayer(dim=6, in_dim=4, lipschitz=0.9)
    x = torch.randn(5, 4, dtype=torch.float64)
    mode = AdaptivePhantom(k=2, damping=0.5, k_max=8)
    for _ in range(3):
        mode.observe(cosine=0.2)  # k: 2 -> 5
    mode.observe(cosine=0.999)  # k: 5 -> 4
    assert mode.k == 4

    def grads(backward):
        deq = pg.DEQ(f, solver=pg.Anderson(max_iter=60, tol=1e-10), backward=backward)
        f.zero_grad()
        z, _ = deq(x, torch.zeros(5, 6, dtype=torch.float64))
        z.pow(2).sum().backward()
        return [p.grad.clone() for p in f.parameters()]

    adaptive, upg4, upg5 = grads(mode), grads(pg.UPG(k=4, damping=0.5)), grads(pg.UPG(k=5, damping=0.5))
    assert all(torch.equal(a, b) for a, b in zip(adaptive, upg4))
    assert not all(torch.allclose(a, b) for a, b in zip(adaptive, upg5))


def test_state_dict_round_trip_and_bounds():
    mode = AdaptivePhantom(k=2, k_max=6)
    for c in (0.5, 0.5, 0.99):
        mode.observe(cosine=c, residual=0.1)
    state = json.loads(json.dumps(mode.state_dict()))  # JSON-serialisable, as the monitor stores it
    other = AdaptivePhantom(k=2, k_max=6)
    other.load_state_dict(state)
    assert (other.k, other.damping, other.residual_mean, other.history) == (
        mode.k,
        mode.damping,
        mode.residual_mean,
        mode.history,
    )
    with pytest.raises(ValueError, match="bounds"):
        AdaptivePhantom(k=2, k_max=3).load_state_dict({**state, "k": 5})
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"history": []})


def test_config_builds_it_with_its_options():
    cfg = TrainConfig.from_sources(
        None, ["backward=adaptive", "k=2", "damping=0.6", "backward_options={k_max: 7, low: 0.8}"]
    )
    mode = builders.build_backward(cfg)
    assert isinstance(mode, AdaptivePhantom) and (mode.k, mode.damping, mode.k_max, mode.low) == (2, 0.6, 7, 0.8)
    with pytest.raises(ConfigError, match="adaptive"):
        builders.build_backward(TrainConfig.from_sources(None, ["backward=adaptive", "backward_options={k_maxx: 7}"]))


def test_trainer_adapts_k_and_resumes_its_state(tmp_path):
    """With thresholds no phantom gradient can meet (low=0.9999), every measurement raises k; the state
    after epoch 1 comes back when a killed run is resumed."""
    overrides = TINY + [
        "backward=adaptive",
        "k=1",
        "monitor_every=1",
        f"out_dir={tmp_path}",
        "backward_options={k_max: 9, low: 0.9999, high: 0.99999}",
    ]
    train_killed_in_epoch(TrainConfig.from_sources(None, overrides + ["epochs=2"]), epoch=1)
    saved = json.loads((tmp_path / "adaptive_state.json").read_text())
    assert saved["1"][0]["k"] == 4  # 3 steps measured, each raised k
    train(TrainConfig.from_sources(None, overrides + ["epochs=2"]), resume=True)
    trace = list(csv.DictReader((tmp_path / "gradient_quality.csv").open()))
    assert [int(r["step"]) for r in trace] == [0, 1, 2, 3, 4, 5]
    assert [float(r["k"]) for r in trace] == [1, 2, 3, 4, 5, 6]  # the k that made each measured gradient
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [float(r["adaptive_k"]) for r in rows] == [4, 7]
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "forward_stats.csv").open())]
    assert steps == list(range(6))  # the report's per-batch statistics continue without gaps or repeats


def test_adaptive_compare_command_at_a_tiny_budget(tmp_path, capsys):
    from phantomgrad.cli import main

    small = [
        "dataset=digits",
        "model=mdeq-tiny",
        "arch.channels=[8,8]",
        "arch.head_channels=[4,4]",
        "arch.final_channels=16",
        "solver_max_iter=4",
        "backward_max_iter=4",
    ]
    assert main(["adaptive-compare", "--budget", "tiny", "--out", str(tmp_path), *small]) == 0
    result = json.loads((tmp_path / "adaptive.json").read_text())
    rows = result["compare"]["rows"]
    assert [r["row"].split(",")[0].split(" ")[0] for r in rows] == ["UPG", "UPG", "Adaptive", "Adaptive"]
    assert all(0 <= r["accuracy_mean"] <= 1 and r["train_cpu_seconds_mean"] > 0 for r in rows)
    assert (
        rows[2]["runs"][0]["trace"] and rows[0]["runs"][0].get("trace") is None
    )  # only the adaptive runs are monitored
    assert [v["row"] for v in result["compare"]["verdicts"]] == [rows[2]["row"], rows[3]["row"]]
    assert all(
        set(v) >= {"best_fixed", "accuracy_reached", "cpu_time_not_more", "target_met"}
        for v in result["compare"]["verdicts"]
    )
    assert "target met" in (tmp_path / "adaptive.md").read_text() and "target met" in capsys.readouterr().out


def test_adaptive_and_monitor_are_exported_from_the_package_root():
    assert pg.AdaptivePhantom is AdaptivePhantom
    from phantomgrad.monitor import gradient_quality

    assert pg.gradient_quality is gradient_quality
    assert {"AdaptivePhantom", "gradient_quality", "GradientQuality"} <= set(pg.__all__)
