"""GDEQ: JFB preconditioned by the forward Broyden solve's inverse-Jacobian estimate (float64 identities)."""

from __future__ import annotations

import pytest
import torch

import phantomgrad as pg
from conftest import TanhLayer

D = torch.float64


def _problem(seed=0):
    torch.manual_seed(seed)
    layer = TanhLayer(dim=6, lipschitz=0.8)
    return layer, torch.randn(4, 4, dtype=D), torch.zeros(4, 6, dtype=D), torch.randn(4, 6, dtype=D)


def _grads(layer, mode, x, z0, w, solver=None):
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    solver = solver or pg.Broyden(max_iter=12, tol=1e-10)
    z, info = pg.DEQ(layer, solver=solver, backward=mode, warn_not_converged=False)(xr, z0)
    (z * w).sum().backward()
    return torch.cat([p.grad.flatten() for p in layer.parameters()] + [xr.grad.flatten()]), z, info


def test_gradient_is_j_theta_transpose_times_minus_h_transpose_w_from_the_dense_estimate():
    """u = -H^T w with H rebuilt densely from the estimate, then J_theta^T u through autograd."""
    layer, x, z0, w = _problem()
    got, z, info = _grads(layer, pg.GDEQ(), x, z0, w)
    h = info.inverse_jacobian.to_dense()  # (B, D, D)
    u = -torch.einsum("bij,bi->bj", h, w)  # -H^T w per sample
    xr = x.clone().requires_grad_()
    fz = layer(z.detach(), xr)
    want = torch.autograd.grad((fz * u).sum(), [*layer.parameters(), xr])
    torch.testing.assert_close(got, torch.cat([g.flatten() for g in want]), rtol=1e-10, atol=1e-12)
    jfb, _, _ = _grads(layer, pg.JFB(), x, z0, w)
    assert not torch.allclose(got, jfb, rtol=1e-3)  # the preconditioner changed the gradient


def test_equals_shine_without_its_fallback_guard_and_refinement():
    layer, x, z0, w = _problem(seed=1)
    solver = pg.Broyden(max_iter=4, tol=1e-12)  # not converged: SHINE's default would fall back to JFB
    gdeq, _, info = _grads(layer, pg.GDEQ(), x, z0, w, solver)
    assert not info.converged.all()
    shine, _, _ = _grads(layer, pg.SHINE(fallback="none", max_gain=None), x, z0, w, solver)
    torch.testing.assert_close(gdeq, shine, rtol=0, atol=0)


def test_closer_to_the_implicit_gradient_than_jfb():
    layer, x, z0, w = _problem(seed=2)
    exact, _, _ = _grads(layer, pg.Implicit(pg.Broyden(max_iter=60, tol=1e-12)), x, z0, w)
    gdeq, _, _ = _grads(layer, pg.GDEQ(), x, z0, w)
    jfb, _, _ = _grads(layer, pg.JFB(), x, z0, w)
    cos = torch.nn.functional.cosine_similarity
    assert cos(gdeq, exact, dim=0) > cos(jfb, exact, dim=0)


def test_layer_refuses_a_solver_without_an_estimate_and_second_order():
    layer, x, z0, w = _problem()
    with pytest.raises(ValueError, match=r"GDEQ\(\) needs solver=pg.Broyden"):
        pg.DEQ(layer, solver=pg.Anderson(), backward=pg.GDEQ())
    z, _ = pg.DEQ(layer, solver=pg.Broyden(max_iter=30, tol=1e-10), backward=pg.GDEQ())(x, z0)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad((z * w).sum(), list(layer.parameters()), create_graph=True)


def test_registered_and_built_by_name():
    assert pg.BACKWARD_MODES["gdeq"] is pg.GDEQ and not pg.GDEQ.exact
    assert repr(pg.make_backward("gdeq")) == "GDEQ()"
