"""pg.Reversible: the RevDEQ coupled iteration, differentiated by reversal (float64 identities)."""

from __future__ import annotations

import pytest
import torch

import phantomgrad as pg
from conftest import TanhLayer, TupleLayer
from phantomgrad.solvers.reversible import MIN_GAP, Reversible

D = torch.float64


def _coupled(f, x, z0, beta, steps):
    """The coupled iteration with autograd storing every step: the reference."""
    y = z = z0
    for _ in range(steps):
        y = (1 - beta) * y + beta * f(z, x)
        z = (1 - beta) * z + beta * f(y, x)
    return y


def _grads(out, w, tensors):
    return torch.autograd.grad((out * w).sum(), tensors)


def _assert_close(got, want, rtol):
    for g, r in zip(got, want):
        assert float((g - r).norm() / r.norm()) < rtol


# The supported range (docs/methods.md): 1e-8 relative in float64 for beta in [0.2, 0.7] over 20
# steps and for beta in [1.2, 1.5] over 10; nearer 1 the reversal amplifies rounding further.
@pytest.mark.parametrize("beta, steps", [(0.2, 20), (0.5, 20), (0.7, 20), (1.2, 10), (1.5, 10)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_equals_autograd_through_stored_iteration(beta, steps, seed):
    torch.manual_seed(seed)
    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    z0, w = torch.zeros(3, 6, dtype=D), torch.randn(3, 6, dtype=D)
    deq = pg.DEQ(layer, solver=Reversible(beta=beta, max_iter=2 * steps, tol=1e-30), backward=pg.Backprop())
    out, info = deq(x, z0)
    assert int(info.nstep[0]) == 2 * steps  # tol=1e-30: every step runs
    tensors = [*layer.parameters(), x]
    ref = _coupled(layer, x, z0, beta, steps)
    assert torch.equal(out, ref)  # the same arithmetic, bit for bit
    _assert_close(_grads(out, w, tensors), _grads(ref, w, tensors), 1e-8)


def test_gradient_with_tuple_state_and_early_stop():
    layer = TupleLayer()
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    z0 = (torch.zeros(2, 4, dtype=D), torch.zeros(2, 3, dtype=D))
    w = (torch.randn(2, 4, dtype=D), torch.randn(2, 3, dtype=D))
    deq = pg.DEQ(layer, solver=Reversible(beta=0.7, max_iter=200, tol=1e-6), backward=pg.Backprop())
    (a, b), info = deq(x, z0)
    assert info.all_converged and int(info.nstep[0]) < 200  # stopped early, every sample at the same step
    steps = int(info.nstep[0]) // 2
    # the reference on the flat state, with the same number of steps
    flat = lambda s, x: torch.cat(layer((s[:, :4], s[:, 4:]), x), 1)  # noqa: E731
    ref = _coupled(flat, x, torch.zeros(2, 7, dtype=D), 0.7, steps)
    tensors = [*layer.parameters(), x]
    got = torch.autograd.grad((a * w[0]).sum() + (b * w[1]).sum(), tensors)
    _assert_close(got, _grads(ref, torch.cat(w, 1), tensors), 1e-8)


def _saved_bytes(max_iter: int, solver_cls=Reversible, **kw) -> int:
    layer = TanhLayer(dim=32, in_dim=8)
    x = torch.randn(4, 8, dtype=D, requires_grad=True)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    deq = pg.DEQ(layer, solver=solver_cls(max_iter=max_iter, tol=1e-30, **kw), backward=pg.Backprop())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = deq(x, torch.zeros(4, 32, dtype=D))
    out.sum().backward()
    return total


def test_saved_memory_does_not_grow_with_max_iter():
    assert _saved_bytes(10) == _saved_bytes(80) > 0
    # the counter sees growth where there is some: FixedPoint stores every step
    assert _saved_bytes(80, pg.FixedPoint) > 4 * _saved_bytes(10, pg.FixedPoint)


@pytest.mark.parametrize("beta", [0.0, 2.0, -0.5, 1.0, 1 + MIN_GAP / 2, 1 - MIN_GAP / 2, True, "0.5"])
def test_refuses_beta_outside_supported_range(beta):
    with pytest.raises(ValueError, match="beta"):
        Reversible(beta=beta)


def test_refuses_max_iter_below_one_step_and_kept_states():
    with pytest.raises(ValueError, match="max_iter"):
        Reversible(max_iter=1)
    with pytest.raises(ValueError, match="keep"):
        Reversible().solve(lambda z: z * 0.5, torch.zeros(2, 3, dtype=D), keep=(2,))


def test_check_every_none_runs_every_step():
    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=D)
    fn = lambda z: layer(z, x)  # noqa: E731
    with torch.no_grad():
        _, early = Reversible(max_iter=100, tol=1e-6).solve(fn, torch.zeros(3, 6, dtype=D))
        z, full = Reversible(max_iter=100, tol=1e-6, check_every=None).solve(fn, torch.zeros(3, 6, dtype=D))
    assert int(early.nstep[0]) < 100 == int(full.nstep[0])
    assert full.all_converged


def test_plain_solver_without_backprop_and_under_no_grad():
    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=D)
    solver = Reversible(beta=0.8, max_iter=200, tol=1e-12)
    with torch.no_grad():
        z, info = pg.DEQ(layer, solver=solver)(x, torch.zeros(3, 6, dtype=D))
    assert info.all_converged
    assert torch.allclose(z, layer(z, x), atol=1e-10)
    # with Implicit the reversible solve is only the forward; the gradient is the implicit one
    deq = pg.DEQ(layer, solver=solver, backward=pg.Implicit())
    out, _ = deq(x, torch.zeros(3, 6, dtype=D))
    out.sum().backward()
    assert layer.W.grad is not None


def test_tensor_read_past_torch_functions_is_an_error():
    """A leaf F reads without a torch call the probe sees would lose its gradient: refuse."""
    v = torch.randn(6, dtype=D, requires_grad=True)

    def f(z, x):
        with torch._C.DisableTorchFunction():  # reads v with the probe switched off
            s = z * v
        return torch.tanh(s + x)

    deq = pg.DEQ(f, solver=Reversible(beta=0.5, max_iter=10), backward=pg.Backprop())
    with pytest.raises(RuntimeError, match="could not see"):
        deq(torch.randn(2, 6, dtype=D), torch.zeros(2, 6, dtype=D))


class _NormAtZero(torch.nn.Module):
    """F(z, x) = tanh(W n(z) + x) with n(z) = z / sqrt(mean(z^2) + 1e-24), like a group norm: its
    Jacobian at z = 0 is 1e12, so a rounding error in a rebuilt z_0 = 0 would be amplified."""

    def __init__(self):
        super().__init__()
        w = torch.randn(6, 6, dtype=D)
        self.W = torch.nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))

    def forward(self, z, x):
        return torch.tanh(z / (z.pow(2).mean(1, keepdim=True) + 1e-24).sqrt() @ self.W.T + x)


def test_the_start_is_not_rebuilt():
    layer = _NormAtZero()
    x = torch.randn(3, 6, dtype=D, requires_grad=True)
    z0, w = torch.zeros(3, 6, dtype=D), torch.randn(3, 6, dtype=D)
    out, _ = pg.DEQ(layer, solver=Reversible(beta=0.5, max_iter=8, tol=1e-30), backward=pg.Backprop())(x, z0)
    ref = _coupled(layer, x, z0, 0.5, 4)
    _assert_close(_grads(out, w, [layer.W, x]), _grads(ref, w, [layer.W, x]), 1e-8)


class _Stored(Reversible):
    """The same coupled iteration with autograd storing every step (the reference for a model)."""

    def solve(self, fn, z0, *, keep=(), keep_inverse=False):
        b = self.beta
        y = z = z0
        for _ in range(self.max_iter // 2):
            y = (1 - b) * y + b * fn(z)
            z = (1 - b) * z + b * fn(y)
        with torch.no_grad():
            return y, super().solve(fn, z0)[1]


def test_mdeq_with_weight_norm_group_norm_dropout_and_a_tuple_state():
    from phantomgrad.models.mdeq import MDEQ, MDEQConfig

    cfg = MDEQConfig.named("mdeq-tiny", in_channels=1, image_size=8, dropout=0.2)

    def grads(solver):
        torch.manual_seed(1)
        model = MDEQ(cfg, solver=solver, backward=pg.Backprop()).double().train()
        torch.manual_seed(2)  # the same dropout masks
        out, _ = model(torch.randn(2, 1, 8, 8, dtype=D))
        out.sum().backward()
        return [p.grad for p in model.parameters()]

    got, want = grads(Reversible(beta=0.7, max_iter=12, tol=1e-30)), grads(_Stored(beta=0.7, max_iter=12, tol=1e-30))
    assert all(g is not None for g in got)
    _assert_close([torch.cat([g.flatten() for g in got])], [torch.cat([g.flatten() for g in want])], 1e-8)


def test_inside_torch_compile_autograd_stores_the_steps_and_gives_the_same_gradient():
    """Dynamo cannot trace the probe of F's inputs (a TorchFunctionMode): inside torch.compile the
    coupled iteration is recorded by autograd instead, the same gradient up to rounding."""
    torch.manual_seed(0)
    f = TanhLayer(dim=6, lipschitz=0.5)
    x = torch.randn(3, 4, dtype=D)
    solver = Reversible(beta=0.6, max_iter=20, tol=1e-30, check_every=None)

    def loss():
        z, _ = solver.solve(lambda h: f(h, x), torch.zeros(3, 6, dtype=D))
        return z.square().sum()

    eager = torch.autograd.grad(loss(), tuple(f.parameters()))
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(loss, backend="eager", fullgraph=True)(), tuple(f.parameters()))
    _assert_close(list(compiled), list(eager), 1e-10)


def test_a_second_order_gradient_is_refused_with_one_line():
    # the reversal rebuilds the states without a graph: create_graph=True would silently give a
    # gradient that does not depend on the inputs (torch's "does not require grad" later); refused now
    torch.manual_seed(0)
    layer = TanhLayer()
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    deq = pg.DEQ(layer, solver=Reversible(max_iter=10), backward=pg.Backprop())
    out, _ = deq(x, torch.zeros(2, 6, dtype=D))
    with pytest.raises(RuntimeError, match="first-order gradient only.*pg.Implicit"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(deq(x, torch.zeros(2, 6, dtype=D))[0].sum(), x)  # first order: as before
    assert torch.isfinite(g).all()
