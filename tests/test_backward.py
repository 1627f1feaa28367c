"""Gradient identities of every backward mode, in float64, against independent computations."""

import pytest
import torch
from torch.autograd.functional import jacobian

import phantomgrad as pg
from catalogue import BACKWARD_SOLVERS, EXACT, MODE_ENTRIES, PER_SAMPLE
from conftest import TanhLayer, TupleLayer, forward_solver

F64 = torch.float64


def _grads(layer, deq, x, z0, weight=None):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    z, info = deq(x, z0)
    weight = torch.randn_like(z) if weight is None else weight
    (z * weight).sum().backward()
    flat = torch.cat([p.grad.flatten() for p in layer.parameters()] + [x.grad.flatten()])
    return flat, info


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _setup(dim=6, batch=3, lipschitz=0.6):
    layer = TanhLayer(dim=dim, lipschitz=lipschitz)
    x = torch.randn(batch, 4, dtype=F64)
    z0 = torch.zeros(batch, dim, dtype=F64)
    weight = torch.randn(batch, dim, dtype=F64)
    return layer, x, z0, weight


def _tight():
    return pg.FixedPoint(max_iter=300, tol=1e-13)


def _exact():
    """Implicit with a backward solve tight enough for elementwise comparisons."""
    return pg.Implicit(pg.Broyden(max_iter=100, tol=1e-12))


def _fixed_point(layer, x, z0):
    with torch.no_grad():
        return pg.FixedPoint(max_iter=500, tol=1e-14).solve(lambda z: layer(z, x), z0)[0]


def test_implicit_passes_gradcheck():
    layer = TanhLayer(dim=4, in_dim=3, lipschitz=0.5)
    z0 = torch.zeros(2, 4, dtype=F64)
    deq = pg.DEQ(
        layer, solver=pg.FixedPoint(max_iter=200, tol=1e-14), backward=pg.Implicit(pg.Broyden(max_iter=100, tol=1e-13))
    )
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: deq(x, z0)[0], (x,), eps=1e-6, atol=1e-6)
    W = layer.W.detach().clone().requires_grad_()

    def out_of_w(w):
        with torch.nn.utils.stateless._reparametrize_module(layer, {"W": w}):
            return deq(x.detach(), z0)[0]

    assert torch.autograd.gradcheck(out_of_w, (W,), eps=1e-6, atol=1e-6)


def test_implicit_matches_backprop_through_100_iterations():
    layer, x, z0, w = _setup(lipschitz=0.7)
    exact, _ = _grads(
        layer, pg.DEQ(layer, solver=pg.FixedPoint(max_iter=100, tol=1e-30), backward=pg.Backprop()), x, z0, w
    )
    implicit, info = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.Implicit()), x, z0, w)
    assert _cos(exact, implicit) > 0.9999  # the default backward tolerance
    assert info.backward is not None and info.backward.converged.all()
    tight, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=_exact()), x, z0, w)
    assert torch.allclose(exact, tight, rtol=1e-8, atol=1e-11)


def test_implicit_equals_dense_formula():
    layer, x, z0, w = _setup()
    z_star = _fixed_point(layer, x, z0)
    grad, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=_exact()), x, z0, w)
    # dense: per sample, g = (I - J)^{-T} w, then vjp of F w.r.t. params and x.
    g = torch.stack(
        [
            torch.linalg.solve((torch.eye(6, dtype=F64) - jacobian(lambda z: layer(z, x[i]), z_star[i])).T, w[i])
            for i in range(3)
        ]
    )
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    (layer(z_star, xr) * g).sum().backward()
    dense = torch.cat([p.grad.flatten() for p in layer.parameters()] + [xr.grad.flatten()])
    assert torch.allclose(grad, dense, rtol=1e-7, atol=1e-10)


def _dense_implicit(layer, x, z0, w):
    """J_theta^T (I - J_h^T)^{-1} w per sample at the fixed point, for F's parameters and x."""
    z_star = _fixed_point(layer, x, z0)
    eye = torch.eye(z_star.shape[1], dtype=F64)
    g = torch.stack(
        [torch.linalg.solve((eye - jacobian(lambda z: layer(z, x[i]), z_star[i])).T, w[i]) for i in range(len(x))]
    )
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    (layer(z_star, xr) * g).sum().backward()
    return torch.cat([p.grad.flatten() for p in layer.parameters()] + [xr.grad.flatten()])


@pytest.mark.parametrize("entry", BACKWARD_SOLVERS, ids=repr)
def test_implicit_with_every_backward_solver_equals_dense_formula(entry):
    """Every registered solver that iterates to a tolerance (GMRES included) as Implicit's backward solve."""
    layer, x, z0, w = _setup(lipschitz=0.8)
    mode = pg.Implicit(entry.make(max_iter=400, tol=1e-12))
    grad, info = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=mode), x, z0, w)
    assert info.backward.converged.all()
    assert torch.allclose(grad, _dense_implicit(layer, x, z0, w), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("entry", EXACT, ids=repr)
def test_every_exact_mode_gives_the_dense_implicit_gradient(entry):
    """The catalogue's exact group, each built with its defaults, on a converged forward solve:
    Eq. 4 to the default tolerances (Implicit's backward solve stops at 1e-6 relative)."""
    layer, x, z0, w = _setup(lipschitz=0.6)
    solver = pg.FixedPoint(max_iter=300, tol=1e-30) if entry.cls.differentiates_solver else _tight()
    grad, _ = _grads(layer, pg.DEQ(layer, solver=solver, backward=entry.make()), x, z0, w)
    dense = _dense_implicit(layer, x, z0, w)
    assert (grad - dense).norm() <= 1e-5 * dense.norm()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_implicit_is_exact_whatever_the_loss_scale(scale):
    layer, x, z0, w = _setup(lipschitz=0.9)
    ref, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.Implicit()), x, z0, w)
    scaled, info = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.Implicit()), x, z0, w * scale)
    jfb, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.JFB()), x, z0, w)
    assert torch.allclose(scaled / scale, ref, rtol=1e-5, atol=1e-9)
    assert info.backward.nstep.min() > 1  # a real solve, not one step (which would be JFB)
    assert _cos(ref, jfb) < 0.9999  # the check above could tell the two apart


def test_upg_and_npg_with_k1_equal_lambda_times_jfb():
    layer, x, z0, w = _setup()
    jfb, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.JFB()), x, z0, w)
    for lam in (0.3, 0.5, 1.0):
        upg, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.UPG(k=1, damping=lam)), x, z0, w)
        npg, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.NPG(k=1, damping=lam)), x, z0, w)
        assert torch.allclose(upg, lam * jfb, rtol=1e-6, atol=1e-10)
        assert torch.allclose(npg, lam * jfb, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("k, lam", [(2, 0.5), (5, 0.8), (7, 1.0)])
def test_npg_equals_its_dense_formula(k, lam):
    layer, x, z0, w = _setup()
    z_star = _fixed_point(layer, x, z0)
    npg, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.NPG(k=k, damping=lam)), x, z0, w)
    eye = torch.eye(6, dtype=F64)
    g = []
    for i in range(3):
        J = jacobian(lambda z: layer(z, x[i]), z_star[i])
        B = lam * J + (1 - lam) * eye
        series = sum(torch.linalg.matrix_power(B.T, j) for j in range(k))
        g.append(lam * series @ w[i])
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    (layer(z_star, xr) * torch.stack(g)).sum().backward()
    dense = torch.cat([p.grad.flatten() for p in layer.parameters()] + [xr.grad.flatten()])
    assert torch.allclose(npg, dense, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("k, lam", [(3, 0.5), (5, 0.8)])
def test_upg_equals_backprop_through_k_damped_steps(k, lam):
    layer, x, z0, w = _setup()
    upg, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.UPG(k=k, damping=lam)), x, z0, w)
    h = _fixed_point(layer, x, z0)
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    for _ in range(k):
        h = lam * layer(h, xr) + (1 - lam) * h
    (h * w).sum().backward()
    manual = torch.cat([p.grad.flatten() for p in layer.parameters()] + [xr.grad.flatten()])
    assert torch.allclose(upg, manual, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", [pg.UPG, pg.NPG])
def test_phantom_gradients_approach_implicit_as_k_grows(mode):
    layer, x, z0, w = _setup(lipschitz=0.7)
    exact, _ = _grads(layer, pg.DEQ(layer, solver=_tight(), backward=pg.Implicit()), x, z0, w)
    cosines = [
        _cos(_grads(layer, pg.DEQ(layer, solver=_tight(), backward=mode(k=k, damping=0.8)), x, z0, w)[0], exact)
        for k in (1, 5, 60)
    ]
    assert cosines[-1] > 0.999
    assert cosines[0] < cosines[-1]


@pytest.mark.parametrize("mode", MODE_ENTRIES, ids=repr)
@pytest.mark.parametrize("solver", PER_SAMPLE, ids=repr)
def test_tuple_states_with_every_solver_and_mode(mode, solver):
    layer = TupleLayer()
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    z0 = (torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64))
    backward, forward = mode.make(), solver.make(max_iter=100, tol=1e-10)
    try:
        backward.check_solver(forward)
    except ValueError:
        pytest.skip(f"{mode.name} refuses {solver.name} as its forward solver")
    deq = pg.DEQ(layer, solver=forward, backward=backward)
    (a, b), info = deq(x, z0)
    assert a.shape == (2, 4) and b.shape == (2, 3)
    assert info.converged.all()
    ((a**2).sum() + b.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_tuple_state_implicit_matches_backprop():
    layer = TupleLayer()
    x = torch.randn(2, 4, dtype=F64)
    z0 = (torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64))

    def grads(mode, solver):
        layer.zero_grad()
        (a, b), _ = pg.DEQ(layer, solver=solver, backward=mode)(x, z0)
        ((a**2).sum() + (b * 3).sum()).backward()
        return torch.cat([p.grad.flatten() for p in layer.parameters()])

    exact = grads(pg.Backprop(), pg.FixedPoint(max_iter=100, tol=1e-30))
    implicit = grads(_exact(), _tight())
    assert torch.allclose(exact, implicit, rtol=1e-7, atol=1e-10)


# the shared contract tests run on every registered mode (the catalogue), built with its defaults
EVERY_MODE = [entry.make() for entry in MODE_ENTRIES]


@pytest.mark.parametrize("mode", EVERY_MODE, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_graph_and_no_extra_work_under_no_grad(mode, context):
    layer, x, z0, _ = _setup()
    x.requires_grad_()
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    for train in (True, False):
        deq = pg.DEQ(layer, solver=forward_solver(mode, 50, 1e-10), backward=mode).train(train)
        calls.clear()
        with context():
            z, info = deq(x, z0)
        assert not z.requires_grad
        assert len(calls) == int(info.nstep.max())  # the solve only, no extra steps


@pytest.mark.parametrize("mode", EVERY_MODE, ids=lambda m: type(m).__name__)
def test_eval_mode_returns_h_star_with_the_training_gradient(mode):
    """eval() changes dropout and normalisation, not autograd: the value is h*, the gradient the mode's."""
    layer, x, z0, w = _setup()
    deq = pg.DEQ(layer, solver=forward_solver(mode, 50, 1e-12), backward=mode)
    with torch.no_grad():
        h_star, _ = deq(x, z0)
    trained, _ = _grads(layer, deq.train(), x, z0, w)
    xr = x.clone().requires_grad_()
    layer.zero_grad()
    z, _ = deq.eval()(xr, z0)
    assert torch.equal(z, h_star)  # the value is h* exactly, for UPG and JFB too
    (z * w).sum().backward()
    evaluated = torch.cat([p.grad.flatten() for p in layer.parameters()] + [xr.grad.flatten()])
    assert xr.grad.abs().sum() > 0
    assert torch.allclose(evaluated, trained, rtol=1e-10, atol=1e-13)


def test_eval_mode_input_gradient_is_the_exact_one_for_implicit():
    layer, x, z0, w = _setup()
    deq = pg.DEQ(layer, solver=_tight(), backward=_exact())
    grads = []
    for train in (True, False):
        xr = x.clone().requires_grad_()
        z, _ = deq.train(train)(xr, z0)
        grads.append(torch.autograd.grad((z * w).sum(), xr)[0])
    assert torch.equal(grads[0], grads[1])
    # and it is the dense implicit gradient dL/dx = J_x^T (I - J_z)^{-T} w
    z_star = _fixed_point(layer, x, z0)
    eye = torch.eye(6, dtype=F64)
    dense = []
    for i in range(3):
        jz = jacobian(lambda z: layer(z, x[i]), z_star[i])
        jx = jacobian(lambda xi: layer(z_star[i], xi), x[i])
        dense.append(jx.T @ torch.linalg.solve((eye - jz).T, w[i]))
    assert torch.allclose(grads[1], torch.stack(dense), rtol=1e-8, atol=1e-11)


def test_layer_called_twice_in_one_graph():
    layer, x, z0, w = _setup()
    for mode in (pg.Implicit(), pg.UPG(4, 0.5), pg.NPG(4, 0.5), pg.JFB(), pg.Backprop()):
        deq = pg.DEQ(layer, solver=_tight(), backward=mode)
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        z1, _ = deq(xr, z0)
        z2, _ = deq(z1[:, :4], z0)  # the second call's input depends on the first call's output
        (z2 * w).sum().backward()
        assert xr.grad is not None and torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def test_implicit_twice_matches_backprop_twice():
    layer, x, z0, w = _setup()

    def run(mode, solver):
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        deq = pg.DEQ(layer, solver=solver, backward=mode)
        z1, _ = deq(xr, z0)
        z2, _ = deq(torch.tanh(z1[:, :4]), z0)
        (z2 * w).sum().backward()
        return torch.cat([p.grad.flatten() for p in layer.parameters()] + [xr.grad.flatten()])

    assert torch.allclose(
        run(_exact(), _tight()), run(pg.Backprop(), pg.FixedPoint(max_iter=150, tol=1e-30)), rtol=1e-6, atol=1e-9
    )


def test_z0_gets_no_gradient():
    layer, x, z0, w = _setup()
    z0 = z0.clone().requires_grad_()
    for mode in (pg.Implicit(), pg.UPG(2, 0.5), pg.NPG(2, 0.5), pg.Backprop()):
        z, _ = pg.DEQ(layer, solver=_tight(), backward=mode)(x, z0)
        (z * w).sum().backward()
        assert z0.grad is None


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k(k):
    for mode in (pg.UPG, pg.NPG):
        with pytest.raises(ValueError, match="k"):
            mode(k=k)


@pytest.mark.parametrize("damping", [0.0, 1.5])
def test_bad_phantom_damping(damping):
    for mode in (pg.UPG, pg.NPG):
        with pytest.raises(ValueError, match="damping"):
            mode(k=3, damping=damping)
