"""Sync-free solving: ``check_every`` changes when the host looks, never the result, and with
``check_every=None`` a solve traces under ``torch.compile(fullgraph=True)``."""

import math

import pytest
import torch

import phantomgrad as pg
from catalogue import PER_SAMPLE, SOLVER_ENTRIES
from conftest import TanhLayer
from phantomgrad.solvers import SOLVERS, default_check_every

F64 = torch.float64

MAKERS = {
    "fixed_point": lambda **kw: pg.FixedPoint(**kw),
    "fixed_point_damped": lambda **kw: pg.FixedPoint(damping=0.7, **kw),
    "anderson": lambda **kw: pg.Anderson(m=3, **kw),
    "broyden": lambda **kw: pg.Broyden(memory=4, **kw),
}
# and, with its defaults, every other registered forward solver that stops per sample (the catalogue's;
# GMRES, linear-only, is tested on affine maps in tests/test_gmres.py)
MAKERS.update({e.name: e.make for e in PER_SAMPLE if e.name not in MAKERS})


def _problem(batch: int):
    """A batch whose samples stop at different steps: sample 0 starts at its fixed point, sample 1
    never converges (F(z) = z + 1), sample 2 turns non-finite after a few steps, the others converge
    at their own pace."""
    layer = TanhLayer(dim=7, lipschitz=0.9)
    x = torch.randn(batch, 4, dtype=F64) * torch.linspace(0.2, 3.0, batch, dtype=F64)[:, None]
    with torch.no_grad():
        z_star = pg.FixedPoint(max_iter=2000, tol=1e-14).solve(lambda z: layer(z, x), torch.zeros(batch, 7, dtype=F64))[
            0
        ]
    oscillating = torch.zeros(batch, 1, dtype=torch.bool)
    diverging = torch.zeros(batch, 1, dtype=torch.bool)
    if batch > 1:
        oscillating[1] = True
    if batch > 2:
        diverging[2] = True

    def fn(z):
        out = layer(z, x)
        out = torch.where(oscillating, z + 1.0, out)
        return torch.where(diverging, z + 1.0 + 0.0 * torch.log(4.5 - z), out)  # NaN once z > 4.5

    z0 = torch.zeros(batch, 7, dtype=F64)
    z0[0] = z_star[0]
    return fn, z0


def _equal(a, b) -> bool:
    """Bit for bit, NaN equal to NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _assert_same(a, b, check_every):
    (za, ia), (zb, ib) = a, b
    assert torch.equal(za, zb)
    for name in ("abs_residual", "rel_residual", "nstep", "converged", "nonfinite", "fallback"):
        assert torch.equal(getattr(ia, name), getattr(ib, name)), name
    for sa, sb in zip(ia.states, ib.states, strict=True):
        assert torch.equal(sa, sb)
    if check_every is None:  # one entry per step run; NaN once every sample stopped
        assert len(ib.trace) >= len(ia.trace)
        assert all(torch.isnan(t).all() for t in ib.trace[len(ia.trace) :])
        trace_b = ib.trace[: len(ia.trace)]
    else:
        trace_b = ib.trace
    assert len(ia.trace) == len(trace_b)
    for ta, tb in zip(ia.trace, trace_b):
        assert _equal(ta, tb)
    if ia.inverse_jacobian is not None:
        for fa, fb in zip(ia.inverse_jacobian.factors(), ib.inverse_jacobian.factors()):
            assert _equal(fa, fb)


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("check_every", [2, 3, None])
def test_check_every_changes_nothing_but_the_steps_run(name, batch, check_every):
    fn, z0 = _problem(batch)
    kw = dict(max_iter=40, tol=1e-9, trace=True)
    with torch.no_grad():
        ref = MAKERS[name](check_every=1, **kw).solve(fn, z0, keep=(1, 5, 13, 40), keep_inverse=True)
        other = MAKERS[name](check_every=check_every, **kw).solve(fn, z0, keep=(1, 5, 13, 40), keep_inverse=True)
    _assert_same(ref, other, check_every)
    if name == "broyden":  # holding the factors of stopped samples changes nothing else
        with torch.no_grad():
            plain = MAKERS[name](check_every=check_every, **kw).solve(fn, z0, keep=(1, 5, 13, 40))
        plain[1].inverse_jacobian = other[1].inverse_jacobian
        _assert_same(other, plain, 1)
    info = ref[1]
    if batch >= 3:  # the problem covers what it claims
        assert info.nstep[0] == 1 and info.nstep[1] == 40 and info.nonfinite[2] and not info.converged[1]
        assert info.converged[3:].all() and not info.nonfinite[[0, 1]].any()


def test_without_checks_the_solve_runs_max_iter_steps():
    fn, z0 = _problem(4)
    calls = []

    def counted(z):
        calls.append(1)
        return fn(z)

    with torch.no_grad():
        pg.Anderson(max_iter=30, tol=1e-6, check_every=None).solve(counted, z0)
        n_none = len(calls)
        calls.clear()
        fn, z0 = _problem(1)
        pg.Anderson(max_iter=30, tol=1e-6, check_every=7).solve(counted, z0)
    assert n_none == 30
    assert len(calls) == 7  # sample 0 stops after one evaluation; the host notices at the first check


def test_check_every_default_depends_on_the_device():
    assert pg.Anderson().check_every == "auto"
    assert default_check_every(torch.device("cpu")) == 1
    assert default_check_every(torch.device("cuda")) is None
    assert pg.Broyden(check_every=None).check_every is None


def test_no_host_sync_without_checks(monkeypatch):
    """With check_every=None the solvers never read a tensor on the host (no .tolist/.item/bool)."""
    fn, z0 = _problem(3)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside a solve with check_every=None")

    with torch.no_grad():
        for make in MAKERS.values():
            solver = make(max_iter=12, tol=1e-9, check_every=None)
            for method in ("tolist", "item", "__bool__"):
                monkeypatch.setattr(torch.Tensor, method, refuse)
            try:
                solver.solve(fn, z0, keep=(3,), keep_inverse=True)
            finally:
                monkeypatch.undo()


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("differentiable", [False, True], ids=["no_grad", "backprop"])
def test_backprop_through_a_sync_free_solve_matches(name, differentiable):
    layer = TanhLayer(dim=5, lipschitz=0.8)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    z0 = torch.zeros(3, 5, dtype=F64)
    grads = []
    for check_every in (1, None):
        with torch.set_grad_enabled(differentiable):
            z, _ = MAKERS[name](max_iter=25, tol=1e-6, check_every=check_every).solve(lambda z: layer(z, x), z0)
        if differentiable:
            grads.append(torch.autograd.grad(z.sum(), (x, *layer.parameters())))
        else:
            grads.append((z,))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- torch.compile(fullgraph=True)


def _compile_case(name, max_iter=12):
    torch.manual_seed(3)
    layer = TanhLayer(dim=6, lipschitz=0.8, dtype=torch.float32)
    x = torch.randn(4, 4)
    solver = MAKERS[name](max_iter=max_iter, tol=1e-5, check_every=None)

    def run(x, z0):
        z, info = solver.solve(lambda z: layer(z, x), z0, keep=(4,), keep_inverse=True)
        inverse = info.inverse_jacobian.rmatvec(z) if info.inverse_jacobian is not None else z
        return (
            z,
            info.abs_residual,
            info.rel_residual,
            info.nstep,
            info.converged,
            info.nonfinite,
            info.fallback,
            info.states[0],
            inverse,
        )

    return run, x, torch.zeros(4, 6)


@pytest.mark.parametrize("name", MAKERS)
def test_sync_free_solve_compiles_with_fullgraph(name):
    run, x, z0 = _compile_case(name)
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, got = run(x, z0), compiled(x, z0)
    for a, b in zip(eager, got):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)


def test_sync_free_anderson_compiles_with_inductor():
    run, x, z0 = _compile_case("anderson", max_iter=4)  # few steps: inductor compiles every one of them
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)
    with torch.no_grad():
        eager, got = run(x, z0), compiled(x, z0)
    assert torch.allclose(eager[0], got[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(eager[3], got[3])
    assert math.isfinite(float(got[1].max()))


@pytest.mark.parametrize("make", [pg.Broyden, pg.Anderson, pg.FixedPoint])
def test_implicit_backward_solve_honours_check_every(make):
    """pg.Implicit hands its solver the backward fixed point g = J^T g + dL/dh: check_every=None
    gives the same gradient and backward info as check_every=1, in exactly max_iter steps."""
    layer = TanhLayer(dim=6, lipschitz=0.8)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    results = []
    for check_every in (1, None):
        deq = pg.DEQ(
            layer,
            solver=pg.Anderson(max_iter=60, tol=1e-10),
            backward=pg.Implicit(make(max_iter=40, tol=1e-8, check_every=check_every)),
        )
        z, info = deq(x, torch.zeros(3, 6, dtype=F64))
        grads = torch.autograd.grad(z.square().sum(), (x, *layer.parameters()))
        results.append((grads, info.backward))
    (g1, b1), (g2, b2) = results
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    assert torch.equal(b1.nstep, b2.nstep) and torch.equal(b1.rel_residual, b2.rel_residual)
    assert b1.converged.all() and (b1.nstep < 40).all()


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("check_every", [1, None])
@pytest.mark.parametrize("keep_inverse", [False, True])
def test_stopped_samples_are_never_moved(name, check_every, keep_inverse):
    """Once a sample stops, F only ever sees it at the state where it stopped (also when it is the
    first to stop, so that the host still believed every sample iterates)."""
    fn, z0 = _problem(5)
    z0 = torch.zeros_like(z0)
    calls = []

    def recorded(z):
        calls.append(z.clone())
        return fn(z)

    with torch.no_grad():
        z, info = MAKERS[name](max_iter=30, tol=1e-9, check_every=check_every).solve(
            recorded, z0, keep_inverse=keep_inverse
        )
    for i in range(5):
        n = int(info.nstep[i])
        for later in calls[n:]:
            assert _equal(later[i], calls[n - 1][i]), (i, n)


@pytest.mark.parametrize("entry", SOLVER_ENTRIES, ids=repr)
def test_a_solve_being_compiled_is_sync_free_with_no_graph_break(entry):
    """Under torch.compile the solve takes the check_every=None path by itself (the default "auto"
    would read the host on CPU): torch._dynamo.explain finds no graph break, for every solver."""
    torch.manual_seed(0)
    f = TanhLayer(dim=6, lipschitz=0.6, dtype=torch.float32)
    x = torch.randn(3, 4)
    solver = entry.make(max_iter=6, tol=1e-5)  # check_every left at its default
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda z: solver.solve(lambda h: f(h, x), z)[0])(torch.zeros(3, 6))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_a_compiled_solve_does_not_recompile_per_call(name):
    torch.manual_seed(0)
    f = TanhLayer(dim=6, lipschitz=0.6, dtype=torch.float32)
    solver = SOLVERS[name](max_iter=8, tol=1e-5)
    torch._dynamo.reset()
    solve = torch.compile(lambda z, x: solver.solve(lambda h: f(h, x), z), backend="eager", fullgraph=True)
    eager = []
    for call in range(4):
        x = torch.randn(3, 4)
        if call == 1:  # from the second call on, a recompile is an error
            torch._dynamo.config.error_on_recompile = True
        try:
            z, info = solve(torch.zeros(3, 6), x)
        finally:
            torch._dynamo.config.error_on_recompile = False
        eager.append(solver.solve(lambda h: f(h, x), torch.zeros(3, 6), keep=()))
        z_eager, info_eager = eager[-1]
        assert torch.allclose(z, z_eager, atol=1e-6) and torch.equal(info.converged, info_eager.converged)
