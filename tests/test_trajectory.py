"""Trajectory supervision: states along the solver's path, each with its own phantom gradient, in float64
against independent computations (by-hand iterations and autograd, dense implicit formulas)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

import phantomgrad as pg
from conftest import TanhLayer, TupleLayer

F64 = torch.float64
STEPS = (4, 8)
MAX_ITER = 12


def _setup():
    layer = TanhLayer(dim=6, in_dim=4, lipschitz=0.8)
    x = torch.randn(3, 4, dtype=F64)
    z0 = torch.zeros(3, 6, dtype=F64)
    weights = [torch.randn(3, 6, dtype=F64) for _ in range(len(STEPS) + 1)]
    return layer, x, z0, weights


def _solver():
    return pg.FixedPoint(max_iter=MAX_ITER, tol=1e-30)  # never stops early: the state after t steps is F^t(z0)


def _by_hand_points(layer, x, z0, deq):
    """z_4 = F^4(z0), z_8 = F^8(z0) by a plain loop, and the final state the solve returns."""
    with torch.no_grad():
        z, points = z0, []
        for t in range(1, max(STEPS) + 1):
            z = layer(z, x)
            if t in STEPS:
                points.append(z)
        final, _ = deq(x, z0, states=())
    return points + [final]


def _flat_grads(layer, x):
    return torch.cat([p.grad.flatten() for p in layer.parameters()] + [x.grad.flatten()])


def _layer_grads(deq, layer, x, z0, weights, **call):
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    zs, info = deq(xr, z0, **call)
    assert isinstance(zs, list) and len(zs) == len(weights)
    sum((z * w).sum() for z, w in zip(zs, weights)).backward()
    return zs, _flat_grads(layer, xr), info


@pytest.mark.parametrize("k, lam", [(1, 1.0), (3, 0.5)])
def test_upg_gradient_of_every_state_is_backprop_through_its_own_damped_steps(k, lam):
    layer, x, z0, weights = _setup()
    deq = pg.DEQ(layer, solver=_solver(), backward=pg.UPG(k=k, damping=lam), return_states=STEPS)
    zs, grads, _ = _layer_grads(deq, layer, x, z0, weights)
    points = _by_hand_points(layer, x, z0, deq)
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    loss, unrolled = 0.0, []
    for point, w in zip(points, weights):
        h = point.detach()
        for _ in range(k):
            h = lam * layer(h, xr) + (1 - lam) * h
        unrolled.append(h)
        loss = loss + (h * w).sum()
    loss.backward()
    for z, h in zip(zs, unrolled):
        assert torch.allclose(z, h, rtol=1e-12, atol=1e-14)  # training output: the state after k steps
    assert torch.allclose(grads, _flat_grads(layer, xr), rtol=1e-10, atol=1e-12)


def test_implicit_gradient_of_every_state_is_the_dense_formula_at_that_state():
    layer, x, z0, weights = _setup()
    deq = pg.DEQ(layer, solver=_solver(), backward=pg.Implicit(pg.Broyden(max_iter=100, tol=1e-12)))
    zs, grads, _ = _layer_grads(deq, layer, x, z0, weights, states=STEPS)
    points = _by_hand_points(layer, x, z0, deq)
    eye = torch.eye(6, dtype=F64)
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    loss = 0.0
    for point, w, z in zip(points, weights, zs):
        assert torch.equal(z, point)  # Implicit outputs the state itself
        g = torch.stack(
            [torch.linalg.solve((eye - jacobian(lambda s: layer(s, x[i]), point[i])).T, w[i]) for i in range(3)]
        )
        loss = loss + (layer(point, xr) * g).sum()  # J_theta^T (I - J(s))^{-T} w, J_x^T likewise
    loss.backward()
    assert torch.allclose(grads, _flat_grads(layer, xr), rtol=1e-8, atol=1e-11)


def test_backprop_states_carry_the_gradient_of_the_iteration_stored_in_full():
    layer, x, z0, weights = _setup()
    deq = pg.DEQ(layer, solver=pg.FixedPoint(max_iter=MAX_ITER, tol=1e-30), backward=pg.Backprop())
    zs, grads, _ = _layer_grads(deq, layer, x, z0, weights[:2], states=(4,))
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    z, iterates = z0, []
    for _ in range(MAX_ITER):
        iterates.append(z)
        z = layer(z, xr)
    # the state after 4 steps is F^4(z0); the final one is the last evaluated iterate (residuals decrease here)
    residuals = [(layer(i, x) - i).norm(dim=1) for i in iterates]
    assert all(bool((a > b).all()) for a, b in zip(residuals, residuals[1:]))
    ((iterates[4] * weights[0]).sum() + (iterates[-1] * weights[1]).sum()).backward()
    assert torch.allclose(grads, _flat_grads(layer, xr), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "mode",
    [cls() for cls in pg.BACKWARD_MODES.values() if not cls.needs_inverse_jacobian],
    ids=lambda m: type(m).__name__,
)
def test_every_mode_returns_the_states_with_gradients_and_h_star_values_in_eval(mode):
    layer, x, z0, weights = _setup()
    deq = pg.DEQ(layer, solver=_solver(), backward=mode, return_states=STEPS)
    points = _by_hand_points(layer, x, z0, deq)
    with torch.no_grad():
        plain, _ = deq(x, z0)
    assert all(torch.allclose(a, b, rtol=1e-13, atol=1e-15) for a, b in zip(plain, points))
    assert not any(z.requires_grad for z in plain)
    zs, grads, _ = _layer_grads(deq.eval(), layer, x, z0, weights)
    assert all(torch.allclose(a, b, rtol=1e-13, atol=1e-15) for a, b in zip(zs, points))  # values: the states
    assert grads.abs().sum() > 0


def test_tuple_states_come_back_as_a_list_of_tuples():
    layer = TupleLayer()
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    z0 = (torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64))
    zs, info = pg.DEQ(layer, solver=_solver(), backward=pg.UPG(k=2, damping=0.5))(x, z0, states=(3,))
    assert len(zs) == 2 and all(isinstance(z, tuple) and [p.shape for p in z] == [(2, 4), (2, 3)] for z in zs)
    sum(p.sum() for z in zs for p in z).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert len(info.states) == 1 and info.states[0].shape == (2, 7)  # the solver's flat states, for reference


def test_states_are_checked_where_they_enter():
    layer = TanhLayer()
    with pytest.raises(ValueError, match="max_iter=12"):
        pg.DEQ(layer, solver=_solver(), return_states=(4, 13))
    with pytest.raises(TypeError, match="sequence of solver steps"):
        pg.DEQ(layer, solver=_solver(), return_states=4)
    deq = pg.DEQ(layer, solver=_solver())
    with pytest.raises(ValueError, match="states"):
        deq(torch.randn(2, 4, dtype=F64), torch.zeros(2, 6, dtype=F64), states=(0,))
    with_states = pg.DEQ(layer, solver=_solver(), return_states=(2,))
    z, _ = with_states(torch.randn(2, 4, dtype=F64), torch.zeros(2, 6, dtype=F64), states=())
    assert isinstance(z, torch.Tensor)  # the call's states=() overrides the layer's


def test_a_mode_whose_gradient_belongs_to_h_star_refuses_states():
    with pytest.raises(ValueError, match="belongs to h"):
        pg.DEQ(TanhLayer(), solver=pg.Broyden(max_iter=12), backward=pg.SHINE(), return_states=(4,))


def test_the_trainer_puts_a_loss_on_each_trajectory_state(tmp_path):
    """trajectory_states=[2, 4]: the image task's loss is CE(final) + weight * (CE(z_2) + CE(z_4)), and
    the gradient of that sum reaches the weights (checked against the model's own list of logits)."""
    import torch.nn.functional as F

    from phantomgrad.train.builders import build_task
    from phantomgrad.train.config import ConfigError, TrainConfig

    small = ["arch.channels=[8,8]", "arch.head_channels=[4,4]", "arch.final_channels=16", "solver_max_iter=6"]
    cfg = TrainConfig.from_sources(None, small + ["trajectory_states=[2, 4]", "trajectory_weight=0.5", "seed=0"])
    task = build_task(cfg)
    x, y = torch.stack([task.train_set[i][0] for i in range(8)]), torch.tensor([task.train_set[i][1] for i in range(8)])
    torch.manual_seed(1)
    result = task.step(task.model.train(), (x, y), torch.device("cpu"), 0)
    torch.manual_seed(1)
    logits, _ = task.model(x, states=(2, 4))
    assert len(logits) == 3
    expected = F.cross_entropy(logits[2], y) + 0.5 * (F.cross_entropy(logits[0], y) + F.cross_entropy(logits[1], y))
    assert torch.allclose(result.loss, expected)
    params = [p for p in task.model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(result.loss, params, allow_unused=True)
    g2 = torch.autograd.grad(expected, params, allow_unused=True)
    assert all((a is None and b is None) or torch.allclose(a, b) for a, b in zip(g1, g2))
    for bad in ("trajectory_states=[4, 2]", "trajectory_states=[7]", "trajectory_states=[0]"):
        with pytest.raises(ConfigError, match="trajectory_states"):
            TrainConfig.from_sources(None, small + [bad])
