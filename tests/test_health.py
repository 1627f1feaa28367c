"""Equilibrium health in every run: converged fractions, residuals, the backward solve's and the spectral
radius per epoch in metrics.csv, the summary and the report; the figures are those of the solves."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import phantomgrad as pg
from conftest import TanhLayer, tiny_overrides
from phantomgrad.train.config import TrainConfig
from phantomgrad.train.health import BACKWARD_KEYS, FORWARD_KEYS, _sums, with_health
from phantomgrad.train.tasks import StepResult, Task
from phantomgrad.train.trainer import train

TINY = tiny_overrides(train_subset=128)


def _rows(out_dir):
    return list(csv.DictReader((out_dir / "metrics.csv").open()))


@pytest.mark.parametrize("backward", ["upg", "implicit"])
def test_health_columns_appear_in_metrics_summary_and_report(backward, tmp_path):
    summary = train(TrainConfig.from_sources(None, TINY + ["epochs=2", f"backward={backward}", f"out_dir={tmp_path}"]))
    rows = _rows(tmp_path)
    for r in rows:
        for key in ("train_converged", "train_residual", "test_converged", "test_residual", "test_nstep"):
            assert 0 <= float(r[key]) and math.isfinite(float(r[key])), key
        assert 0 <= float(r["train_converged"]) <= 1
        assert ("train_bwd_converged" in r) == (backward == "implicit")
    # radius_every=2 (the default): not measured in epoch 1, measured in epoch 2
    # not measured in epoch 1: left blank, as test metrics are on epochs without evaluation (no NaN in the history)
    assert rows[0]["train_spectral_radius"] == "" and float(rows[1]["train_spectral_radius"]) > 0
    if backward == "implicit":
        assert all(0 <= float(r["train_bwd_converged"]) <= 1 and float(r["train_bwd_residual"]) > 0 for r in rows)
        assert all(float(r["train_bwd_fallback"]) == 0 for r in rows)  # no fallback asked for
    assert summary["final_metrics"]["test_converged"] == pytest.approx(float(rows[-1]["test_converged"]))
    md = (tmp_path / "report.md").read_text()
    assert "## Equilibrium health" in md and "train_spectral_radius" in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert "train_converged" in report["epochs"][0]


def test_converged_fraction_follows_the_solver_budget(tmp_path):
    loose = train(
        TrainConfig.from_sources(
            None, TINY + ["solver_max_iter=40", "solver_tol=0.5", "radius_every=0", f"out_dir={tmp_path / 'a'}"]
        )
    )
    tight = train(
        TrainConfig.from_sources(
            None, TINY + ["solver_max_iter=1", "solver_tol=1e-9", "radius_every=0", f"out_dir={tmp_path / 'b'}"]
        )
    )
    assert loose["final_metrics"]["train_converged"] == 1.0 and loose["final_metrics"]["test_converged"] == 1.0
    assert tight["final_metrics"]["train_converged"] == 0.0 and tight["final_metrics"]["test_converged"] == 0.0
    assert tight["final_metrics"]["train_residual"] > loose["final_metrics"]["train_residual"]
    assert "train_spectral_radius" not in _rows(tmp_path / "a")[0]  # radius_every=0: not measured


def test_sums_are_those_of_the_solves():
    f = TanhLayer()
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=3, tol=1e-6), backward=pg.Implicit(pg.Broyden(max_iter=2, tol=1e-12)))
    x = torch.randn(5, 4, dtype=torch.float64)
    z, info = deq(x, torch.zeros(5, 6, dtype=torch.float64))
    z.sum().backward()
    for keys, solve in ((FORWARD_KEYS, info), (BACKWARD_KEYS, info.backward)):
        sums = _sums([solve], keys)
        assert sums is not None
        assert sums[keys[0]] == 5.0
        assert float(sums[keys[1]]) == float(solve.converged.sum())
        assert float(sums[keys[2]]) == pytest.approx(float(solve.rel_residual.sum()))
        assert (keys[3] in sums) == (keys is BACKWARD_KEYS)
    # a task's finalize turns the sums into fractions and means; a step without solver info adds nothing
    task = Task("t", torch.nn.Linear(1, 1), [], {}, lambda *a: StepResult(torch.zeros(()), {}, 1), lambda s, c: {})
    wrapped = with_health(task)
    assert wrapped.step(None, None, torch.device("cpu"), 0).sums == {}
    out = wrapped.finalize({"solve_samples": 4.0, "solve_converged": 1.0, "solve_residual": 2.0}, 4)
    assert out == {"converged": 0.25, "residual": 0.5}


def test_spectral_radius_is_that_of_the_jacobian_at_h_star(tmp_path):
    """The callback's estimate on a linear F z = W z + x is the spectral radius of W."""
    from phantomgrad.train.context import RunContext
    from phantomgrad.train.distributed import DistInfo
    from phantomgrad.train.health import EquilibriumHealth

    w = torch.randn(6, 6, dtype=torch.float64)
    w = 0.7 * w / torch.linalg.eigvals(w).abs().max()
    w = w + w.T  # symmetric: power iteration converges to |lambda|_max
    rho = float(torch.linalg.eigvalsh(w).abs().max())
    w = w * 0.8 / rho

    class Linear(torch.nn.Module):
        def forward(self, z, x):
            return z @ w.T + x

    deq = pg.DEQ(Linear(), solver=pg.Anderson(max_iter=50, tol=1e-10))
    x = torch.randn(4, 6, dtype=torch.float64)

    def recompute(batch):
        z, _ = deq(batch, torch.zeros(4, 6, dtype=torch.float64))
        return z.sum()

    cfg = TrainConfig(epochs=1)
    ctx = RunContext(tmp_path, deq, torch.device("cpu"), cfg, DistInfo(), False, recompute_loss=recompute)
    health = EquilibriumHealth(radius_every=1, radius_iters=200)
    health.last_batch = x
    row: dict = {}
    health.on_epoch_end(ctx, row)
    assert row["train_spectral_radius"] == pytest.approx(0.8, rel=1e-6)


def test_the_radius_batch_is_cut_only_where_that_is_plain():
    from dataclasses import dataclass

    from phantomgrad.train.health import _head

    x, y = torch.randn(40, 3), torch.arange(40)
    cut = _head((x, y), 16)
    assert isinstance(cut, tuple) and cut[0].shape == (16, 3) and cut[1].tolist() == list(range(16))
    assert _head([x, y], 50)[0] is x  # not larger than n: whole
    assert _head((x, torch.arange(7)), 16)[0] is x  # different first dimensions: whole
    assert _head("train", 16) == "train"  # a graph split name: whole

    @dataclass
    class Batch:
        inputs: torch.Tensor
        targets: torch.Tensor
        indices: torch.Tensor | None = None
        start: object = None

    b = _head(Batch(x, y, torch.arange(40)), 16)
    assert b.inputs.shape == (16, 3) and b.indices.tolist() == list(range(16))
    assert _head(Batch(x, y, None), 16).indices is None
    started = Batch(x, y, None, start=lambda zeros: zeros)
    assert _head(started, 16) is started  # a start state belongs to the whole batch


def test_backward_fallback_fraction_is_recorded(tmp_path):
    """Implicit with fallback=upg and a backward solve that cannot converge (one step to 1e-12):
    every sample falls back, and the column says so."""
    overrides = [o for o in TINY if not o.startswith("backward_max_iter")] + [
        "backward=implicit",
        "backward_max_iter=1",
        "backward_tol=1e-12",
        "backward_options.fallback=upg",
        "radius_every=0",
        f"out_dir={tmp_path}",
    ]
    summary = train(TrainConfig.from_sources(None, overrides))
    final = summary["final_metrics"]
    assert final["train_bwd_converged"] == 0.0 and final["train_bwd_fallback"] == 1.0


def test_health_and_jacobian_penalty_add_no_host_read_to_a_sync_free_step(monkeypatch):
    """A sync-free layer (check_every=None) stays sync-free with the health sums and the Jacobian
    penalty wrapped around the step: no .item/.tolist/bool on a tensor in the step, the backward or
    the callback (the trainer's meter reads the sums once per logging interval)."""
    from phantomgrad.train.context import RunContext
    from phantomgrad.train.distributed import DistInfo
    from phantomgrad.train.health import EquilibriumHealth
    from phantomgrad.train.jacreg import with_jacobian_penalty

    f = TanhLayer()
    solver = pg.Anderson(max_iter=6, tol=1e-9, check_every=None)
    backward = pg.Implicit(pg.Broyden(max_iter=4, tol=1e-9, check_every=None))
    model = torch.nn.ModuleDict({"deq": pg.DEQ(f, solver=solver, backward=backward)})

    def step(model, batch, device, global_step):
        x, w = batch
        z, info = model["deq"](x, torch.zeros(len(x), 6, dtype=torch.float64))
        loss = (z * w).sum()
        return StepResult(loss, {"loss": loss.detach()}, len(x), info)

    task = Task("t", model, [], {}, step, lambda s, c: {})
    cfg = TrainConfig(jac_reg_weight=1.0, jac_reg_freq=1.0)
    wrapped = with_health(with_jacobian_penalty(task, cfg))
    ctx = RunContext(None, model, torch.device("cpu"), cfg, DistInfo(), False)  # type: ignore[arg-type]
    batch = (torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64))

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor on the hot path")

    # the layer's own rate-limited warnings read the device on their first call (deq.py): take it here
    first = wrapped.step(model, batch, torch.device("cpu"), 0)
    first.loss.backward()
    for method in ("tolist", "item", "__bool__"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    try:
        result = wrapped.step(model, batch, torch.device("cpu"), 0)
        result.loss.backward()
        EquilibriumHealth().after_backward(ctx, batch, result)
    finally:
        monkeypatch.undo()
    assert {"solve_converged", "bwd_converged", "bwd_fallback", "jac_penalty"} <= set(result.sums)
    assert all(isinstance(result.sums[k], torch.Tensor) for k in ("solve_converged", "bwd_residual", "jac_penalty"))
