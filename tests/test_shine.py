"""SHINE: the gradient from Broyden's inverse-Jacobian estimate (float64 identities)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import phantomgrad as pg
from conftest import TanhLayer
from phantomgrad.shine import SHINE

D = torch.float64


class Linear(nn.Module):
    """F(z, x) = W z + U x + b, ||W||_2 = 0.5: its Jacobian is W everywhere."""

    def __init__(self, dim=5, in_dim=3):
        super().__init__()
        w = torch.randn(dim, dim, dtype=D)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(dim, in_dim, dtype=D))
        self.b = nn.Parameter(torch.randn(dim, dtype=D))

    def forward(self, z, x):
        return z @ self.W.T + x @ self.U.T + self.b


def _solve(layer, x, solver):
    """The forward solve as the layer runs it, keeping the estimate; returns (fn, z*, info)."""
    fn = lambda z: layer(z, x)  # noqa: E731
    with torch.no_grad():
        z_star, info = solver.solve(fn, torch.zeros(x.shape[0], layer.W.shape[0], dtype=D), keep_inverse=True)
    return fn, z_star, info


def _mode_grads(mode, layer, x, solver, w):
    fn, z_star, info = _solve(layer, x, solver)
    out = mode.attach(fn, z_star, info)
    assert torch.equal(out.detach(), z_star)  # the value is h*
    return torch.autograd.grad((out * w).sum(), [*layer.parameters(), x]), info


def _dense_estimate(est) -> Tensor:
    """H rebuilt from the raw ring buffer, sample by sample, as the product of its rank-one factors:
    H = -(I + c a b^T)_newest ... (I + c a b^T)_oldest, b the stored steps oldest first, a the step
    after each (the tail for the newest)."""
    batch, mem, dim = est.steps.shape
    out = []
    for i in range(batch):
        n = int(est.count[i])
        q = min(n, mem)
        slots = [(n - q + t) % mem for t in range(q)]
        bs = [est.steps[i, s] for s in slots]
        as_ = bs[1:] + [est.tail[i]]
        h = torch.eye(dim, dtype=est.steps.dtype)
        for a, b, s in zip(as_, bs, slots):
            h = (torch.eye(dim, dtype=h.dtype) + est.coef[i, s] * torch.outer(a, b)) @ h
        out.append(-h)
    return torch.stack(out)


def _implicit_exact(layer, x, w):
    """The exact implicit gradient of the linear layer: u = (I - W^T)^{-1} w, then J_theta^T u."""
    with torch.no_grad():
        dim = layer.W.shape[0]
        z = torch.linalg.solve(torch.eye(dim, dtype=D) - layer.W, (x @ layer.U.T + layer.b).T).T
        u = torch.linalg.solve(torch.eye(dim, dtype=D) - layer.W.T, w.T).T
    return torch.autograd.grad((layer(z, x) * u).sum(), [*layer.parameters(), x])


def _rel(got, want):
    return max(float((g - r).norm() / r.norm()) for g, r in zip(got, want))


@pytest.mark.parametrize(
    "make", [lambda: (TanhLayer(), 4), lambda: (Linear(dim=6, in_dim=4), 4)], ids=["tanh", "linear"]
)
def test_gradient_equals_dense_formula_from_the_estimate(make):
    layer, in_dim = make()
    x = torch.randn(3, in_dim, dtype=D, requires_grad=True)
    w = torch.randn(3, 6, dtype=D)
    solver = pg.Broyden(memory=4, max_iter=12, tol=1e-10)  # the ring wraps: old factors are forgotten
    got, info = _mode_grads(SHINE(fallback="none"), layer, x, solver, w)
    est = info.inverse_jacobian
    assert int(est.count.max()) > est.memory
    fn, z_star, _ = _solve(layer, x, solver)
    u = -torch.einsum("bij,bi->bj", _dense_estimate(est), w)  # -H^T w
    z_req = z_star.clone().requires_grad_()
    ref = torch.autograd.grad((fn(z_req) * u).sum(), [*layer.parameters(), x])
    assert _rel(got, ref) < 1e-10


def test_estimate_matches_the_secant_condition():
    """The rebuilt H maps the last change of the residual to the last step (H dg = s): the test's
    reading of the factors is the solver's."""
    layer = Linear()
    x = torch.randn(2, 3, dtype=D)
    fn = lambda z: layer(z, x)  # noqa: E731
    with torch.no_grad():
        _, info = pg.Broyden(memory=10, max_iter=4, tol=1e-30).solve(fn, torch.zeros(2, 5, dtype=D), keep_inverse=True)
        est = info.inverse_jacobian
        h = _dense_estimate(est)
        q = int(est.count[0])
        s = est.steps[:, (q - 1) % est.memory]  # the newest stored step
        dg = s @ (layer.W - torch.eye(5, dtype=D)).T  # g is affine: dg = (W - I) s
        assert torch.allclose(torch.einsum("bij,bj->bi", h, dg), s, rtol=1e-10, atol=1e-12)
        assert torch.allclose(est.rmatvec(dg), torch.einsum("bji,bj->bi", h, dg), rtol=1e-10, atol=1e-12)


class _Perturbed:
    """An estimate H = (W - I)^{-1} + eps E with only SHINE's interface (rmatvec(v) = H^T v)."""

    def __init__(self, w, eps, e):
        self.h = torch.linalg.inv(w.detach() - torch.eye(w.shape[0], dtype=D)) + eps * e

    def rmatvec(self, v):
        return v @ self.h


def test_approaches_the_implicit_gradient_as_the_estimate_becomes_exact():
    """The error of SHINE is linear in the error of the estimate and vanishes with it."""
    layer = Linear(dim=5)
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    w = torch.randn(2, 5, dtype=D)
    exact = _implicit_exact(layer, x, w)
    fn, z_star, info = _solve(layer, x, pg.Broyden(max_iter=30, tol=1e-12))
    e = torch.randn(5, 5, dtype=D)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3, 0.0):
        info.inverse_jacobian = _Perturbed(layer.W, eps, e)
        out = SHINE(fallback="none").attach(fn, z_star, info)
        errors.append(_rel(torch.autograd.grad((out * w).sum(), [*layer.parameters(), x]), exact))
    assert errors[3] < 1e-12
    assert 8 < errors[0] / errors[1] < 12 and 8 < errors[1] / errors[2] < 12


def test_equals_the_implicit_gradient_where_broyden_learns_the_exact_inverse():
    """In one dimension a single secant update makes Broyden's estimate of a linear map exact."""
    layer = Linear(dim=1, in_dim=2)
    x = torch.randn(4, 2, dtype=D, requires_grad=True)
    w = torch.randn(4, 1, dtype=D)
    got, info = _mode_grads(SHINE(fallback="none"), layer, x, pg.Broyden(max_iter=3, tol=1e-30), w)
    assert _rel(got, _implicit_exact(layer, x, w)) < 1e-12
    # while the start, H_0 = -I (no update yet), gives JFB's gradient, not the implicit one
    first, _ = _mode_grads(SHINE(fallback="none"), layer, x, pg.Broyden(max_iter=1, tol=1e-30), w)
    assert _rel(first, _implicit_exact(layer, x, w)) > 1e-2


def test_refinement_with_enough_steps_equals_implicit():
    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    w = torch.randn(3, 6, dtype=D)
    solver = pg.Broyden(memory=5, max_iter=30, tol=1e-10)
    implicit = pg.Implicit(pg.Broyden(max_iter=60, tol=1e-12, stop="rel"))
    ref, _ = _mode_grads(implicit, layer, x, solver, w)
    plain, _ = _mode_grads(SHINE(), layer, x, solver, w)
    refined, info = _mode_grads(SHINE(refine=60, refine_tol=1e-12), layer, x, solver, w)
    assert info.backward.all_converged
    assert _rel(refined, ref) < 1e-9 < _rel(plain, ref)


def test_fallback_when_the_forward_did_not_converge():
    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    w = torch.randn(3, 6, dtype=D)
    short = pg.Broyden(max_iter=3, tol=1e-12)
    jfb_ref = torch.autograd.grad((pg.JFB().attach(*_solve(layer, x, short)) * w).sum(), [*layer.parameters(), x])
    fell, info = _mode_grads(SHINE(fallback="jfb"), layer, x, short, w)
    assert not info.all_converged
    assert _rel(fell, jfb_ref) < 1e-12
    shine, _ = _mode_grads(SHINE(fallback="none"), layer, x, short, w)
    assert _rel(shine, jfb_ref) > 1e-3  # without the fallback the gradient is SHINE's own
    # a converged forward does not fall back
    conv, _ = _mode_grads(SHINE(fallback="jfb"), layer, x, pg.Broyden(max_iter=40, tol=1e-10), w)
    ref, _ = _mode_grads(SHINE(fallback="none"), layer, x, pg.Broyden(max_iter=40, tol=1e-10), w)
    assert _rel(conv, ref) < 1e-14


def test_fallback_when_the_layer_re_solved_some_sample():
    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    fn, z_star, info = _solve(layer, x, pg.Broyden(max_iter=40, tol=1e-10))
    assert info.all_converged
    info.fallback = torch.tensor([False, True, False])  # as the layer's fallback solver marks it
    out = SHINE(fallback="jfb").attach(fn, z_star, info)
    w = torch.randn(3, 6, dtype=D)
    jfb = torch.autograd.grad((pg.JFB().attach(fn, z_star, info) * w).sum(), [*layer.parameters(), x])
    assert _rel(torch.autograd.grad((out * w).sum(), [*layer.parameters(), x]), jfb) < 1e-12


class _Blown:
    """The exact inverse for sample 0, a broken (huge or NaN) one for samples 1 and 2."""

    def __init__(self, w):
        self.h = torch.linalg.inv(w.detach() - torch.eye(w.shape[0], dtype=D))

    def rmatvec(self, v):
        return (v @ self.h) * torch.tensor([1.0, 1e5, float("nan")], dtype=D)[:, None]


def test_max_gain_gives_a_broken_sample_jfbs_direction():
    layer = Linear()
    x = torch.randn(3, 3, dtype=D, requires_grad=True)
    w = torch.randn(3, 5, dtype=D)
    fn, z_star, info = _solve(layer, x, pg.Broyden(max_iter=30, tol=1e-12))
    info.inverse_jacobian = _Blown(layer.W)
    out = SHINE(fallback="none").attach(fn, z_star, info)
    got = torch.autograd.grad((out * w).sum(), [*layer.parameters(), x])
    exact0 = _implicit_exact(layer, x, w * torch.tensor([1.0, 0, 0], dtype=D)[:, None])
    mask12 = torch.tensor([0, 1.0, 1], dtype=D)[:, None]
    jfb12 = torch.autograd.grad((pg.JFB().attach(fn, z_star, info) * w * mask12).sum(), [*layer.parameters(), x])
    assert _rel(got, [a + b for a, b in zip(exact0, jfb12)]) < 1e-12
    out = SHINE(fallback="none", max_gain=None).attach(fn, z_star, info)
    assert not torch.isfinite(torch.autograd.grad((out * w).sum(), layer.W)[0]).all()  # unguarded: the NaN passes


def test_missing_estimate_and_wrong_solver_are_one_line_errors():
    layer = TanhLayer()
    x = torch.randn(2, 4, dtype=D)
    fn = lambda z: layer(z, x)  # noqa: E731
    z_star, info = pg.Anderson(max_iter=20).solve(fn, torch.zeros(2, 6, dtype=D))
    with pytest.raises(ValueError, match="inverse-Jacobian estimate"):
        SHINE().attach(fn, z_star, info)
    with pytest.raises(ValueError, match="needs solver=pg.Broyden"):
        SHINE().check_solver(pg.Anderson())
    SHINE().check_solver(pg.Broyden())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(refine=-1),
        dict(refine=True),
        dict(refine=1.5),
        dict(refine_tol=0),
        dict(fallback="upg"),
        dict(fallback=pg.Backprop()),
        dict(fallback=3),
        dict(max_gain=0),
        dict(max_gain=float("nan")),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SHINE(**kwargs)


def test_layer_refuses_a_non_broyden_solver_and_trains_with_broyden():
    layer = TanhLayer()
    with pytest.raises(ValueError, match="needs solver=pg.Broyden"):
        pg.DEQ(layer, solver=pg.Anderson(), backward=SHINE())
    x = torch.randn(2, 4, dtype=D)
    out, _ = pg.DEQ(layer, solver=pg.Broyden(max_iter=30, tol=1e-8), backward=SHINE())(x, torch.zeros(2, 6, dtype=D))
    out.sum().backward()
    assert layer.W.grad is not None
