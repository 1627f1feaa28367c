"""Jacobian regularisation (Bai, Koltun, Kolter 2021) on every task: the Hutchinson estimator against
the dense ||J||_F^2 in float64, and the trainer's keys changing the run on the image and graph tasks."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch.autograd.functional import jacobian

import phantomgrad as pg
from conftest import TanhLayer, TupleLayer, tiny_overrides
from phantomgrad.train.config import ConfigError, TrainConfig
from phantomgrad.train.jacreg import PenaltyHook, with_jacobian_penalty
from phantomgrad.train.tasks import StepResult, Task
from phantomgrad.train.trainer import train


def _flat_jacobians(f, z, x) -> torch.Tensor:
    """Per-sample dense Jacobians dF/dz (B, D, D) of a tensor or tuple state, by autograd.functional."""
    if isinstance(z, tuple):
        sizes = [t[0].numel() for t in z]

        def flat_f(flat, xi):
            parts = torch.split(flat, sizes)
            out = f(tuple(p.reshape(1, *t.shape[1:]) for p, t in zip(parts, z)), xi)
            return torch.cat([o.reshape(-1) for o in out])

        flats = torch.cat([t.reshape(t.shape[0], -1) for t in z], dim=1)
    else:

        def flat_f(flat, xi):
            return f(flat.reshape(1, *z.shape[1:]), xi).reshape(-1)

        flats = z.reshape(z.shape[0], -1)
    return torch.stack(
        [jacobian(lambda v, i=i: flat_f(v, x[i : i + 1]), flats[i], create_graph=True) for i in range(len(flats))]
    )


@pytest.mark.parametrize("layer", ["tensor", "tuple"])
def test_hutchinson_estimate_matches_the_dense_frobenius_norm(layer):
    f = TanhLayer() if layer == "tensor" else TupleLayer()
    x = torch.randn(3, 4, dtype=torch.float64)
    zeros = [torch.zeros(3, d, dtype=torch.float64) for d in (4, 3)]
    z0 = torch.zeros(3, 6, dtype=torch.float64) if layer == "tensor" else tuple(zeros)
    z, _ = pg.DEQ(f, solver=pg.Anderson(max_iter=60, tol=1e-12))(x, z0)
    z = tuple(t.detach() for t in z) if isinstance(z, tuple) else z.detach()
    J = _flat_jacobians(f, z, x).detach()
    dense = J.pow(2).sum() / J.shape[0] / J.shape[1]  # ||J||_F^2 / D, batch mean
    n = 3000
    estimate = pg.jacobian_penalty(f, z, x, n_samples=n).detach()
    # Var(eps^T A eps) = 2 ||A||_F^2 for A = J J^T, eps ~ N(0, I); the estimate averages n probes of the batch
    a = J @ J.transpose(1, 2)
    std = math.sqrt(2 * float(a.pow(2).sum()) / n) / (J.shape[0] * J.shape[1])
    assert abs(float(estimate) - float(dense)) < 5 * std
    assert std < 0.05 * float(dense)  # the check is sharp enough to catch a wrong normalisation


def test_penalty_gradient_is_the_gradient_of_the_dense_form_for_the_same_probe():
    f = TanhLayer()
    x = torch.randn(3, 4, dtype=torch.float64)
    z, _ = pg.DEQ(f, solver=pg.Anderson(max_iter=60, tol=1e-12))(x, torch.zeros(3, 6, dtype=torch.float64))
    z = z.detach()
    params = list(f.parameters())
    torch.manual_seed(7)
    penalty = pg.jacobian_penalty(f, z, x)
    got = torch.autograd.grad(penalty, params)
    torch.manual_seed(7)
    eps = torch.randn(3, 6, dtype=torch.float64)  # the probe jacobian_penalty drew
    J = _flat_jacobians(f, z, x)
    dense = torch.einsum("bi,bij->bj", eps, J).pow(2).sum() / eps.numel()
    assert float(penalty.detach()) == pytest.approx(float(dense.detach()), rel=1e-12)
    want = torch.autograd.grad(dense, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_the_hook_takes_the_penalty_of_each_deq_layer_at_the_state_it_returned():
    f = TupleLayer()
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=60, tol=1e-12), backward=pg.UPG(k=3, damping=0.5))
    x = torch.randn(3, 4, dtype=torch.float64)
    z0 = (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    hook = PenaltyHook(deq)
    hook.armed = True
    torch.manual_seed(3)
    z, _ = deq(x, z0)
    (penalty,) = hook.penalties
    torch.manual_seed(3)
    with torch.no_grad():
        deq(x, z0)  # the same draws up to the hook's probe (none: the hook skips no_grad)
    want = pg.jacobian_penalty(f, tuple(t.detach() for t in z), x)
    assert float(penalty.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    hook.penalties.clear()
    deq.eval()
    deq(x, z0)
    assert hook.penalties == []  # eval mode: no penalty
    hook.remove()


def test_a_model_without_a_deq_layer_refuses_the_keys():
    model = torch.nn.Linear(2, 2)
    task = Task("x", model, [], {}, lambda *a: StepResult(torch.zeros(()), {}, 1), lambda s, c: {})
    cfg = TrainConfig(jac_reg_freq=0.5, jac_reg_weight=1.0)
    with pytest.raises(ConfigError, match="no DEQ layer.*jac_reg_freq=0"):
        with_jacobian_penalty(task, cfg)
    assert with_jacobian_penalty(task, TrainConfig()) is task


def _rows(out_dir):
    return list(csv.DictReader((out_dir / "metrics.csv").open()))


@pytest.mark.parametrize(
    "task",
    [
        tiny_overrides(train_subset=128) + ["epochs=1"],
        ["task=graph", "dataset=chains", "epochs=2", "progress=false", "threads=1"],
    ],
    ids=["image", "graph"],
)
def test_the_keys_change_the_run_on_every_task(task, tmp_path):
    base = train(TrainConfig.from_sources(None, task + [f"out_dir={tmp_path / 'base'}"]))
    reg = train(
        TrainConfig.from_sources(None, task + ["jac_reg_weight=2", "jac_reg_freq=1", f"out_dir={tmp_path / 'reg'}"])
    )
    measured = train(
        TrainConfig.from_sources(None, task + ["jac_reg_weight=0", "jac_reg_freq=1", f"out_dir={tmp_path / 'm'}"])
    )
    assert reg["final_metrics"]["train_loss"] != base["final_metrics"]["train_loss"]
    # weight 0 measures without regularising: the same run as without the keys
    assert measured["final_metrics"]["train_loss"] == base["final_metrics"]["train_loss"]
    rows = _rows(tmp_path / "reg")
    steps_per_epoch = reg["steps"] / reg["epochs"]
    assert all(float(r["train_jac_steps"]) == steps_per_epoch for r in rows)
    assert all(float(r["train_jac_penalty"]) > 0 for r in rows)
    assert "train_jac_penalty" not in _rows(tmp_path / "base")[0]
