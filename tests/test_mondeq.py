"""monDEQ (Winston & Kolter 2020): the splittings reach the unique equilibrium, which matches the dense
solution of the monotone inclusion; Implicit through monDEQ is the dense gradient; every backward mode works."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import phantomgrad as pg
from conftest import forward_solver
from phantomgrad.models import MonDEQ
from phantomgrad.models.mondeq import build_classifier
from phantomgrad.modes import BACKWARD_MODES

SPLITTINGS = ["forward_backward", "peaceman_rachford"]


def _layer(splitting: str, hidden: int = 5, in_features: int = 3, scale: float = 1.0, **kw) -> MonDEQ:
    layer = MonDEQ(in_features, hidden, m=0.3, splitting=splitting, **kw).double()
    with torch.no_grad():  # a W whose equilibria have both active and inactive units
        layer.linear.A.mul_(scale)
        layer.linear.B.mul_(scale)
    return layer


def _dense_equilibrium(W: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """z = relu(W z + u) by enumerating the active sets S: z_S = (I - W_SS)^{-1} u_S, z_rest = 0, with
    z_S > 0 and (W z + u)_rest <= 0. Built differentiably from W and u (the gradient of the solution)."""
    n = W.shape[0]
    found = None
    for mask in itertools.product([False, True], repeat=n):
        s = torch.tensor(mask)
        z = torch.zeros(n, dtype=W.dtype)
        if s.any():
            idx = s.nonzero().flatten()
            z_s = torch.linalg.solve(torch.eye(len(idx), dtype=W.dtype) - W[idx][:, idx], u[idx])
            z = torch.zeros(n, dtype=W.dtype).index_put((idx,), z_s)
        pre = W @ z + u
        if (z[s] > -1e-12).all() and (pre[~s] <= 1e-12).all():
            assert found is None, "two equilibria: the monotone inclusion has a unique solution"
            found = z
    assert found is not None
    return found


def _dense_batch(layer: MonDEQ, x: torch.Tensor) -> torch.Tensor:
    W, u = layer.weight(), layer.inject(x)
    return torch.stack([_dense_equilibrium(W, u[i]) for i in range(len(x))])


def test_w_is_strongly_monotone_for_any_a_and_b():
    layer = _layer("peaceman_rachford", hidden=7, scale=5.0)
    M = torch.eye(7, dtype=torch.float64) - layer.weight().detach()
    assert float(torch.linalg.eigvalsh((M + M.T) / 2).min()) >= 0.3 - 1e-10


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_both_splittings_reach_the_dense_equilibrium(solver):
    torch.manual_seed(1)
    x = torch.randn(6, 3, dtype=torch.float64)
    results = []
    for splitting in SPLITTINGS:
        torch.manual_seed(0)  # the same weights for both splittings
        make = (
            pg.FixedPoint(max_iter=4000, tol=1e-13) if solver == "fixed_point" else pg.Anderson(max_iter=300, tol=1e-13)
        )
        layer = _layer(splitting, alpha=0.4 if splitting == "forward_backward" else None, solver=make)
        with torch.no_grad():
            z, info = layer(x)
        assert bool(info.converged.all())
        results.append(z)
        dense = _dense_batch(layer, x)
        torch.testing.assert_close(z, dense, rtol=1e-9, atol=1e-10)
        assert 0 < int((dense > 0).sum()) < dense.numel()  # both active and inactive units: a real ReLU case
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-10)


def test_default_forward_backward_step_is_the_guaranteed_one():
    torch.manual_seed(0)
    layer = _layer("forward_backward", solver=pg.FixedPoint(max_iter=20000, tol=1e-12))
    M = torch.eye(5, dtype=torch.float64) - layer.weight().detach()
    u = torch.zeros(1, 5, dtype=torch.float64)
    assert float(layer.step_size(u)) == pytest.approx(0.3 / float(torch.linalg.matrix_norm(M, ord=2)) ** 2)
    x = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        z, info = layer(x)
    assert bool(info.converged.all())
    torch.testing.assert_close(z, _dense_batch(layer, x), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("splitting", SPLITTINGS)
def test_implicit_through_mondeq_equals_the_dense_gradient(splitting):
    torch.manual_seed(0)
    layer = _layer(
        splitting,
        alpha=0.4 if splitting == "forward_backward" else None,
        solver=pg.Anderson(max_iter=300, tol=1e-13),
        backward=pg.Implicit(pg.Broyden(max_iter=200, tol=1e-13)),
    )
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 5, dtype=torch.float64)
    params = [x, *layer.parameters()]
    z, _ = layer(x)
    got = torch.autograd.grad((z * weights).sum(), params)
    want = torch.autograd.grad((_dense_batch(layer, x) * weights).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", sorted(BACKWARD_MODES))
def test_every_backward_mode_gives_a_gradient_through_mondeq(name):
    torch.manual_seed(0)
    mode = BACKWARD_MODES[name]()
    layer = _layer("peaceman_rachford", solver=forward_solver(mode, 100, 1e-10), backward=mode)
    x = torch.randn(4, 3, dtype=torch.float64)
    z, _ = layer(x)
    grads = torch.autograd.grad(z.pow(2).sum(), list(layer.parameters()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)


def test_convolutional_form_reaches_its_equilibrium():
    torch.manual_seed(0)
    layer = MonDEQ(
        2, 4, m=0.5, splitting="forward_backward", form="conv", solver=pg.Anderson(max_iter=200, tol=1e-10)
    ).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        z, info = layer(x)
        residual = z - torch.relu(layer.linear(z) + layer.inject(x))
    assert bool(info.converged.all())
    assert float(residual.abs().max()) < 1e-8
    # the adjoint convolutions are adjoints: <W v, w> = <v, W^T w>
    from phantomgrad.models.mondeq import _adjoint

    v, w = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert float((layer.linear(v) * w).sum()) == pytest.approx(float((v * _adjoint(layer.linear, w)).sum()))
        # and I - W is strongly monotone: <v, (I - W) v> >= m ||v||^2
        assert float((v * (v - layer.linear(v))).sum()) >= 0.5 * float(v.pow(2).sum()) - 1e-9


def test_bad_arguments_are_refused_with_one_line():
    with pytest.raises(ValueError, match="peaceman_rachford.*use splitting='forward_backward' with form='conv'"):
        MonDEQ(2, 4, form="conv")
    with pytest.raises(ValueError, match="splitting must be one of"):
        MonDEQ(2, 4, splitting="douglas")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="m must be in"):
        MonDEQ(2, 4, m=0.0)
    with pytest.raises(ValueError, match="unknown arch keys"):
        build_classifier("mondeq", 1, (8, 8), 10, {"channels": [8]})


def test_the_image_task_trains_a_mondeq(tmp_path, caplog):
    from conftest import tiny_overrides
    from phantomgrad.train.config import TrainConfig
    from phantomgrad.train.trainer import train

    base = [o for o in tiny_overrides(train_subset=128) if not o.startswith("arch.")]
    with caplog.at_level(logging.INFO):
        summary = train(
            TrainConfig.from_sources(
                None, base + ["model=mondeq", "arch.hidden=16", "solver_max_iter=40", "epochs=1", f"out_dir={tmp_path}"]
            )
        )
    assert summary["model"] == "mondeq"
    assert 0 <= summary["test_accuracy"] <= 1
    assert summary["final_metrics"]["train_converged"] > 0.5  # a monDEQ reaches its equilibrium


@pytest.mark.parametrize("splitting", SPLITTINGS)
def test_start_state_and_trajectory_states(splitting):
    torch.manual_seed(0)
    layer = _layer(splitting, alpha=0.4 if splitting == "forward_backward" else None)
    layer.deq.solver = pg.Anderson(max_iter=300, tol=1e-12)
    x = torch.randn(3, 3, dtype=torch.float64)
    with torch.no_grad():
        z, info = layer(x)
        # the trajectory: the states after 2 and 5 steps, then exactly the final state
        zs, _ = layer(x, states=(2, 5))
        assert len(zs) == 3 and all((t >= 0).all() for t in zs)
        torch.testing.assert_close(zs[-1], z)
        assert float((zs[0] - z).abs().max()) > float((zs[1] - z).abs().max())
        # a start provider: started at the solve's own solution (the auxiliary state for PR) it stops at once
        calls = []
        u = layer.inject(x)
        alpha = layer.step_size(u)
        if splitting == "forward_backward":
            state = z
        else:
            eye = torch.eye(5, dtype=torch.float64)
            V = torch.linalg.inv(eye + alpha * (eye - layer.weight()))
            state, _ = layer.deq((u, alpha, V), torch.zeros_like(u))
        z2, info2 = layer(x, z0=lambda zeros: calls.append(zeros.shape) or state)
    assert calls == [(3, 5)] and int(info2.nstep.max()) <= 1 < int(info.nstep.min())
    torch.testing.assert_close(z2, z)
