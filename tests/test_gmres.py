"""pg.GMRES: exact against a dense solve in float64, per-sample stopping, check_every, and as the
backward solver of pg.Implicit the dense implicit gradient J_theta^T (I - J_h^T)^{-1} dL/dh."""

import pytest
import torch
from torch.autograd.functional import jacobian

import phantomgrad as pg
from phantomgrad.models.toy import TanhMap

F64 = torch.float64


def _affine(batch=4, dim=12, scale=0.25, seed=0):
    """fn(z) = A_i z + b_i per sample, with A_i not a contraction for scale 0.25 (||A|| ~ 1.7):
    plain fixed-point iteration diverges on it, GMRES does not care."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, dtype=F64, generator=gen) * scale
    b = torch.randn(batch, dim, dtype=F64, generator=gen)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=F64) - A, b)
    return (lambda z: torch.einsum("bij,bj->bi", A, z) + b), z_star, A


@pytest.mark.parametrize("restart", [40, 6])
@pytest.mark.parametrize("stop", ["rel", "abs"])
def test_gmres_equals_a_dense_solve(restart, stop):
    fn, z_star, A = _affine()
    assert torch.linalg.matrix_norm(A, ord=2).min() > 1  # not a contraction
    z0 = torch.randn(4, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    z, info = pg.GMRES(max_iter=200, tol=1e-12, restart=restart, stop=stop).solve(fn, z0)
    assert info.converged.all() and not info.nonfinite.any()
    assert torch.allclose(z, z_star, rtol=1e-9, atol=1e-10)
    true_abs = (fn(z) - z).norm(dim=1)
    assert torch.allclose(info.abs_residual, true_abs, rtol=1e-3, atol=1e-13)  # measured by linearity
    if restart == 40:  # unrestarted: exact in at most dim steps (+1 evaluation at the start)
        assert (info.nstep <= 13).all()


def test_gmres_stops_per_sample_and_check_every_changes_nothing():
    fn, z_star, _ = _affine(scale=0.15)
    z0 = torch.zeros(4, 12, dtype=F64)
    z0[1] = z_star[1]  # starts at its solution
    runs = [
        pg.GMRES(max_iter=30, tol=1e-10, restart=5, check_every=ce, trace=True).solve(fn, z0, keep=(2, 7))
        for ce in (1, 3, None)
    ]
    (z, info), *others = runs
    assert info.nstep[1] == 1 and info.converged.all()
    assert len(set(info.nstep.tolist())) > 1  # samples stop at their own step
    for z_b, info_b in others:
        assert torch.equal(z, z_b)
        for key in ("abs_residual", "rel_residual", "nstep", "converged", "nonfinite"):
            assert torch.equal(getattr(info, key), getattr(info_b, key)), key
        assert all(torch.equal(a, b) for a, b in zip(info.states, info_b.states))


def test_gmres_honours_max_iter_as_evaluations():
    fn, _, _ = _affine()
    calls = []

    def counted(z):
        calls.append(1)
        return fn(z)

    _, info = pg.GMRES(max_iter=7, tol=1e-30, check_every=1).solve(counted, torch.zeros(4, 12, dtype=F64))
    assert len(calls) == 7 and (info.nstep == 7).all() and not info.converged.any()


def test_gmres_is_linear_only_and_checks_restart():
    assert pg.GMRES.linear_only and not pg.Anderson.linear_only
    assert pg.solvers.SOLVERS["gmres"] is pg.GMRES
    with pytest.raises(ValueError, match="restart"):
        pg.GMRES(restart=0)


@pytest.mark.parametrize("lipschitz", [0.6, 0.95])
def test_implicit_with_gmres_gives_the_dense_implicit_gradient(lipschitz):
    torch.manual_seed(0)
    layer = TanhMap(6, 4, lipschitz, dtype=F64)
    x = torch.randn(3, 4, dtype=F64)
    z0 = torch.zeros(3, 6, dtype=F64)
    w = torch.randn(3, 6, dtype=F64)
    deq = pg.DEQ(
        layer,
        solver=pg.FixedPoint(max_iter=2000, tol=1e-14),
        backward=pg.Implicit(pg.GMRES(max_iter=30, tol=1e-13)),
    )
    z, info = deq(x, z0)
    grads = torch.autograd.grad((z * w).sum(), tuple(layer.parameters()))
    assert info.backward is not None and info.backward.converged.all()
    # dense: dL/dtheta = J_theta^T (I - J_h^T)^{-1} w per sample, summed over the batch
    z_star = z.detach()
    names = [n for n, _ in layer.named_parameters()]
    dense = [torch.zeros_like(p) for p in layer.parameters()]
    for i in range(3):
        jz = jacobian(lambda h: layer(h, x[i]), z_star[i])
        u = torch.linalg.solve((torch.eye(6, dtype=F64) - jz).T, w[i])
        params = {n: p.detach() for n, p in layer.named_parameters()}

        def out(*ps, i=i):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (z_star[i], x[i]))

        for j, jac in enumerate(jacobian(out, tuple(params.values()))):
            dense[j] += torch.tensordot(u, jac, dims=1)
    for got, want in zip(grads, dense):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_gmres_is_differentiable_when_autograd_records():
    """Under autograd (a double backward through Implicit) the basis is kept out of place: the
    solve's gradient is that of the dense solution, d sum(z*)/db = (I - A)^{-T} 1."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(2, 5, 5, dtype=F64, generator=gen) * 0.2
    b = torch.randn(2, 5, dtype=F64, generator=gen, requires_grad=True)

    def fn(z):
        return torch.einsum("bij,bj->bi", A, z) + b

    z, info = pg.GMRES(max_iter=10, tol=1e-14, restart=5).solve(fn, torch.zeros(2, 5, dtype=F64))
    (grad,) = torch.autograd.grad(z.sum(), b)
    with torch.no_grad():
        z_plain, _ = pg.GMRES(max_iter=10, tol=1e-14, restart=5).solve(fn, torch.zeros(2, 5, dtype=F64))
    dense = torch.linalg.solve((torch.eye(5, dtype=F64) - A).mT, torch.ones(2, 5, dtype=F64))
    assert info.converged.all() and torch.allclose(z.detach(), z_plain, rtol=1e-12, atol=1e-13)
    assert torch.allclose(grad, dense, rtol=1e-8, atol=1e-10)


def test_fused_gmres_matches_unfused():
    fn, z_star, _ = _affine(scale=0.15)
    z0 = torch.zeros(4, 12, dtype=F64)
    (za, ia), (zb, ib) = (
        pg.GMRES(max_iter=30, tol=1e-10, restart=5, fused=fused).solve(fn, z0) for fused in (False, True)
    )
    assert torch.allclose(za, zb, rtol=1e-12, atol=1e-14) and torch.equal(ia.nstep, ib.nstep)
    assert torch.allclose(za, z_star, rtol=1e-8, atol=1e-9)
