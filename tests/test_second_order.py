"""Second-order gradients (create_graph=True) through every backward mode, in float64.

Implicit is exact (to third order here): checked against autograd through a long stored forward iteration (FixedPoint +
Backprop, which converges to the same function) and against finite differences of its own exact
first-order gradient. UPG and JFB are exact for their own graphs (checked against the same steps
written out by hand). NPG and SHINE refuse create_graph=True with a one-line error.
"""

import subprocess
import sys

import pytest
import torch

import phantomgrad as pg
from phantomgrad.models.toy import TanhMap

F64 = torch.float64


def _problem(seed=0, lipschitz=0.6, batch=3, dim=6, in_dim=4):
    f = TanhMap(dim=dim, in_dim=in_dim, lipschitz=lipschitz, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, in_dim, dtype=F64, generator=gen)
    w = torch.randn(batch, dim, dtype=F64, generator=gen)
    return f, x, torch.zeros(batch, dim, dtype=F64), w


def _exact_deq(f):
    return pg.DEQ(
        f,
        solver=pg.Anderson(max_iter=100, tol=1e-14),
        backward=pg.Implicit(pg.Broyden(max_iter=100, tol=1e-14)),
        warn_not_converged=False,
    )


def _unrolled_deq(f):
    """Autograd through 300 stored fixed-point steps: the reference (the map is a 0.6-contraction)."""
    return pg.DEQ(f, solver=pg.FixedPoint(max_iter=300, tol=1e-300), backward=pg.Backprop(), warn_not_converged=False)


def _loss(z, w):
    return (z * w).sum() + (z**3).sum()


def _penalty_grad(deq, f, x, z0, w):
    """d/dtheta of ||dL/dtheta||^2 (a gradient penalty), theta = F's parameters."""
    params = list(f.parameters())
    z, _ = deq(x, z0)
    grads = torch.autograd.grad(_loss(z, w), params, create_graph=True)
    penalty = sum((g**2).sum() for g in grads)
    return torch.cat([p.flatten() for p in torch.autograd.grad(penalty, params)])


def _close(a, b, rtol=1e-8):
    assert (a - b).abs().max() <= rtol * b.abs().max(), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_implicit_gradient_penalty_matches_autograd_through_a_stored_iteration(train):
    f, x, z0, w = _problem()
    exact = _penalty_grad(_exact_deq(f).train(train), f, x, z0, w)
    unrolled = _penalty_grad(_unrolled_deq(f).train(train), f, x, z0, w)
    _close(exact, unrolled)


def test_implicit_loss_on_the_input_gradient_matches_autograd_through_a_stored_iteration():
    f, x, z0, w = _problem(seed=3)
    results = []
    for deq in (_exact_deq(f), _unrolled_deq(f)):
        xr = x.clone().requires_grad_()
        z, _ = deq(xr, z0)
        (gx,) = torch.autograd.grad(_loss(z, w), xr, create_graph=True)
        loss2 = (gx**2).sum() + (gx * xr).sum()  # a saliency-style loss, also through x itself
        grads = torch.autograd.grad(loss2, [*f.parameters(), xr])
        results.append(torch.cat([g.flatten() for g in grads]))
    _close(*results)


def test_implicit_hessian_vector_product_matches_finite_differences_of_the_first_order_gradient():
    """H d for the bias b, against (g(b + eps d) - g(b - eps d)) / (2 eps), g Implicit's exact gradient."""
    f, x, z0, w = _problem(seed=5)
    deq = _exact_deq(f)
    d = torch.randn(f.b.shape, dtype=F64, generator=torch.Generator().manual_seed(9))

    def grad_b(b):  # F reads b while the first backward re-evaluates it (the second backward does not)
        with torch.nn.utils.stateless._reparametrize_module(f, {"b": b}):
            z, _ = deq(x, z0)
            return torch.autograd.grad(_loss(z, w), b, create_graph=b.requires_grad)[0]

    b = f.b.detach().clone().requires_grad_()
    (hvp,) = torch.autograd.grad(grad_b(b), b, d)
    eps = 1e-5
    fd = (grad_b((b + eps * d).detach().requires_grad_()) - grad_b((b - eps * d).detach().requires_grad_())) / (2 * eps)
    _close(hvp, fd.detach(), rtol=1e-6)
    # torch.autograd.functional.vhp in the input x through the layer agrees with the unrolled reference
    dx = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(10))
    _, h_exact = torch.autograd.functional.vhp(lambda x_: _loss(deq(x_, z0)[0], w), x, dx)
    _, h_unrolled = torch.autograd.functional.vhp(lambda x_: _loss(_unrolled_deq(f)(x_, z0)[0], w), x, dx)
    _close(h_exact, h_unrolled)


def test_a_backward_that_sees_other_tensors_than_the_forward_is_a_one_line_error():
    """The second-order backward evaluates F again: a reparametrisation that ended before it is refused."""
    f, x, z0, w = _problem(seed=6)
    deq = _exact_deq(f)
    b = f.b.detach().clone().requires_grad_()
    with torch.nn.utils.stateless._reparametrize_module(f, {"b": b}):
        z, _ = deq(x, z0)
    with pytest.raises(RuntimeError, match="reads other tensors .* than in the forward") as err:
        torch.autograd.grad(_loss(z, w), b, create_graph=True)
    assert "\n" not in str(err.value)


def _steps_by_hand(f, x, z_star, k, lam):
    h = z_star.detach()
    for _ in range(k):
        h = lam * f(h, x) + (1 - lam) * h
    return h


@pytest.mark.parametrize("mode", [pg.UPG(k=3, damping=0.5), pg.JFB()], ids=repr)
def test_phantom_modes_with_a_graph_are_exact_for_their_own_graph(mode):
    f, x, z0, w = _problem(seed=7)
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=100, tol=1e-14), backward=mode)
    got = _penalty_grad(deq, f, x, z0, w)
    with torch.no_grad():
        z_star, _ = pg.Anderson(max_iter=100, tol=1e-14).solve(lambda z: f(z, x), z0)
    params = list(f.parameters())
    grads = torch.autograd.grad(_loss(_steps_by_hand(f, x, z_star, mode.k, mode.damping), w), params, create_graph=True)
    want = torch.autograd.grad(sum((g**2).sum() for g in grads), params)
    _close(got, torch.cat([p.flatten() for p in want]), rtol=1e-12)


def test_backprop_is_exact_for_the_solvers_steps():
    f, x, z0, w = _problem(seed=8)
    got = _penalty_grad(_unrolled_deq(f), f, x, z0, w)
    params = list(f.parameters())
    z = z0
    for _ in range(300):  # the same 300 steps, by hand
        z = f(z, x)
    grads = torch.autograd.grad(_loss(z, w), params, create_graph=True)
    want = torch.autograd.grad(sum((g**2).sum() for g in grads), params)
    _close(got, torch.cat([p.flatten() for p in want]), rtol=1e-12)


@pytest.mark.parametrize(
    "solver, mode",
    [(pg.Anderson(max_iter=100, tol=1e-12), pg.NPG()), (pg.Broyden(max_iter=100, tol=1e-12), pg.SHINE())],
    ids=["npg", "shine"],
)
def test_first_order_modes_refuse_create_graph_with_one_line(solver, mode):
    f, x, z0, w = _problem()
    z, _ = pg.DEQ(f, solver=solver, backward=mode)(x, z0)
    with pytest.raises(RuntimeError, match=r"first-order gradients only .*use pg.Implicit") as err:
        torch.autograd.grad(_loss(z, w), list(f.parameters()), create_graph=True)
    assert "\n" not in str(err.value)
    # without create_graph they work as before
    z, _ = pg.DEQ(f, solver=solver, backward=mode)(x, z0)
    assert all(g is not None for g in torch.autograd.grad(_loss(z, w), list(f.parameters())))


def test_implicit_third_derivatives_match_autograd_through_a_stored_iteration():
    """d/db of <d/db ||dL/db||^2, r> (a third derivative), and torch.autograd.functional.hvp in x (the
    double-backward trick: three backward passes), against the unrolled reference."""
    f, x, z0, w = _problem(seed=11)
    r = torch.arange(6, dtype=F64)
    dx = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(12))
    results = []
    for deq in (_exact_deq(f), _unrolled_deq(f)):
        z, _ = deq(x, z0)
        (gb,) = torch.autograd.grad(_loss(z, w), f.b, create_graph=True)
        (hb,) = torch.autograd.grad((gb**2).sum(), f.b, create_graph=True)
        (tb,) = torch.autograd.grad((hb * r).sum(), f.b)
        _, hvp = torch.autograd.functional.hvp(lambda x_, deq=deq: _loss(deq(x_, z0)[0], w), x, dx)
        results.append((tb, hvp))
    (tb_exact, hvp_exact), (tb_unrolled, hvp_unrolled) = results
    _close(tb_exact, tb_unrolled)
    _close(hvp_exact, hvp_unrolled)


def test_importing_phantomgrad_changes_no_torch_setting():
    code = (
        "import torch, torch._functorch.config as c; before = c.donated_buffer; import phantomgrad; "
        "assert c.donated_buffer == before, (before, c.donated_buffer); print(before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
