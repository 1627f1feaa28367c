"""The solvers' hooks for methods built on top of them: argument checks, kept trajectory states
(``solve(keep=...)``), Broyden's inverse-Jacobian estimate (``keep_inverse``) and ``pg.Unrolled``."""

import math

import pytest
import torch

import phantomgrad as pg
from catalogue import PER_SAMPLE, TO_TOLERANCE
from conftest import TanhLayer
from phantomgrad._checks import ArgumentTypeError, in_range, nonneg_int, positive_float, positive_int
from phantomgrad.solvers import SOLVERS, make_solver

F64 = torch.float64


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: pg.Anderson(m=True), "m"),
        (lambda: pg.Broyden(memory=True), "memory"),
        (lambda: pg.FixedPoint(max_iter=True), "max_iter"),
        (lambda: pg.Anderson(check_every=True), "check_every"),
        (lambda: pg.Unrolled(True), "depth"),
        (lambda: pg.Anderson(m=2.0), "m"),
    ],
)
def test_booleans_and_floats_are_not_integers(make, name):
    with pytest.raises(TypeError, match=name) as err:
        make()
    assert isinstance(err.value, ValueError)  # catchable as either
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: pg.Anderson(tol=math.nan), "tol"),
        (lambda: pg.Broyden(tol=math.inf), "tol"),
        (lambda: pg.Anderson(ridge=math.nan), "ridge"),
        (lambda: pg.FixedPoint(damping=math.nan), "damping"),
        (lambda: pg.Anderson(check_every=0), "check_every"),
        (lambda: pg.Anderson(check_every="never"), "check_every"),
        (lambda: pg.FixedPoint(tol=True), "tol"),
        (lambda: pg.FixedPoint(trace=1), "trace"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_check_helpers():
    assert positive_int("n", 3) == 3 and nonneg_int("n", 0) == 0
    assert positive_float("x", 2) == 2.0 and isinstance(positive_float("x", 2), float)
    assert in_range("x", 1.0, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"x must be in \(0, 1\]"):
        in_range("x", 0.0, 0.0, 1.0)
    with pytest.raises(ArgumentTypeError, match="n must be an integer >= 0"):
        nonneg_int("n", False)


def test_unrolled_is_registered():
    assert SOLVERS["unrolled"] is pg.Unrolled
    assert make_solver("unrolled", depth=3).depth == 3


# ---------------------------------------------------------------- kept states


def _recording(fn):
    calls = []

    def wrapped(z):
        calls.append(z.clone())
        return fn(z)

    return wrapped, calls


@pytest.mark.parametrize("name", [e.name for e in PER_SAMPLE])  # every per-sample forward solver
@pytest.mark.parametrize("check_every", [1, None])
def test_kept_states_are_the_iterates_after_those_steps(name, check_every):
    layer = TanhLayer(dim=8, lipschitz=0.9)
    x = torch.randn(4, 4, dtype=F64)
    with torch.no_grad():
        z_star = pg.FixedPoint(max_iter=800, tol=1e-13).solve(lambda z: layer(z, x), torch.zeros(4, 8, dtype=F64))[0]
        z0 = torch.zeros(4, 8, dtype=F64)
        z0[1] = z_star[1]  # sample 1 stops after its first evaluation
        fn, calls = _recording(lambda z: layer(z, x))
        keep = (6, 1, 3, 20)
        z, info = SOLVERS[name](max_iter=20, tol=1e-9, check_every=check_every).solve(fn, z0, keep=keep)
    assert len(info.states) == len(keep)
    for t, state in zip(keep, info.states):
        if t == 20:  # the last step's state is the returned one
            assert torch.equal(state, z)
            continue
        # the iterate the solve continued from after t evaluations is the input of evaluation t + 1
        moving = info.nstep > t
        assert moving[0] and not moving[1]
        assert torch.equal(state[moving], calls[t][moving])
        assert torch.equal(state[~moving], z[~moving])


def test_kept_states_when_every_sample_stopped_early_are_the_returned_state():
    layer = TanhLayer(dim=6, lipschitz=0.3)
    x = torch.randn(3, 4, dtype=F64)
    with torch.no_grad():
        z, info = pg.Anderson(max_iter=50, tol=1e-6, check_every=1).solve(
            lambda z: layer(z, x), torch.zeros(3, 6, dtype=F64), keep=(40,)
        )
    assert info.nstep.max() < 40
    assert torch.equal(info.states[0], z)


def test_keep_beyond_max_iter_is_refused():
    with pytest.raises(ValueError, match="max_iter"):
        pg.FixedPoint(max_iter=5).solve(lambda z: z, torch.zeros(2, 3), keep=(6,))
    with pytest.raises(TypeError, match="keep"):
        pg.FixedPoint(max_iter=5).solve(lambda z: z, torch.zeros(2, 3), keep=(True,))


# ---------------------------------------------------------------- Broyden's inverse Jacobian


def _dense_broyden(fns, z0, max_iter, tol):
    """Good Broyden with a dense H, one sample at a time (``fns[i]`` maps sample i's state): H_0 = -I,
    z <- z - H g and the Sherman-Morrison update H += (dz - H dg) dz^T H / (dz^T H dg); stops on the
    relative residual."""
    out = []
    for i, fn in enumerate(fns):
        z = z0[i]
        H = -torch.eye(z.numel(), dtype=z.dtype)
        g = fn(z) - z
        steps = 1
        if (g.norm() / (g + z).norm()) > tol:
            for _ in range(max_iter - 1):
                dz = -H @ g
                z = z + dz
                g_new = fn(z) - z
                dg = g_new - g
                h_dg = H @ dg
                H = H + torch.outer(dz - h_dg, dz @ H) / (dz @ h_dg)
                g = g_new
                steps += 1
                if g.norm() / (g + z).norm() <= tol:
                    break
        out.append((H, steps))
    return out


@pytest.mark.parametrize("check_every", [1, 3, None])
def test_broyden_inverse_jacobian_is_the_dense_good_broyden_estimate(check_every):
    dim = 6
    A = torch.randn(dim, dim, dtype=F64)
    A = 0.7 * A / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn(3, dim, dtype=F64)
    b[2] *= 1e-3

    def fn(z):  # a linear map per sample: F(z) = A z + b
        return z @ A.T + b

    z0 = torch.zeros(3, dim, dtype=F64)
    z0[1] = torch.linalg.solve(torch.eye(dim, dtype=F64) - A, b[1]) + 1e-9  # sample 1 stops early
    calls = []

    def recorded(z):
        calls.append(z.clone())
        return fn(z)

    with torch.no_grad():
        _, info = pg.Broyden(memory=30, max_iter=25, tol=1e-10, check_every=check_every).solve(
            recorded, z0, keep_inverse=True
        )
    estimate = info.inverse_jacobian
    dense = estimate.to_dense()
    reference = _dense_broyden([lambda z, i=i: A @ z + b[i] for i in range(3)], z0, 25, 1e-10)
    for i, (H, steps) in enumerate(reference):
        assert info.nstep[i] == steps
        assert torch.allclose(dense[i], H, rtol=1e-5, atol=1e-5), i
    assert info.nstep[1] < info.nstep[0]
    # rmatvec is the transpose of matvec
    v = torch.randn(3, dim, dtype=F64)
    assert torch.allclose(estimate.rmatvec(v), torch.einsum("bij,bi->bj", dense, v))
    # the secant condition of the newest update, H dg = dz, on the last step of sample 0
    evals = int(info.nstep[0])
    z_prev, z_last = calls[evals - 2][0], calls[evals - 1][0]
    dg = (fn(z_last[None]) - z_last - fn(z_prev[None]) + z_prev)[0]
    assert torch.allclose(dense[0] @ dg, z_last - z_prev, rtol=1e-6, atol=1e-14)


def test_broyden_inverse_keeps_the_newest_factors_once_the_ring_is_full():
    layer = TanhLayer(dim=5, lipschitz=0.95)
    x = torch.randn(2, 4, dtype=F64)
    with torch.no_grad():
        _, info = pg.Broyden(memory=3, max_iter=9, tol=1e-30).solve(
            lambda z: layer(z, x), torch.zeros(2, 5, dtype=F64), keep_inverse=True
        )
    est = info.inverse_jacobian
    a, bb, c = est.factors()
    # an independent product of the three kept rank-one factors, newest on the left
    H = -torch.eye(5, dtype=F64).expand(2, 5, 5)
    for t in range(3):
        H = H + c[:, t, None, None] * torch.einsum("bi,bj,bjk->bik", a[:, t], bb[:, t], H)
    assert torch.allclose(est.to_dense(), H)
    assert (est.count == 8).all() and (c != 0).all()


def test_only_broyden_keeps_an_inverse():
    with torch.no_grad():
        _, info = pg.Anderson(max_iter=3).solve(lambda z: 0.5 * z, torch.ones(2, 3), keep_inverse=True)
    assert info.inverse_jacobian is None


# ---------------------------------------------------------------- Unrolled


def test_unrolled_is_a_weight_tied_stack_with_plain_backprop():
    torch.manual_seed(0)
    layer = TanhLayer(dim=6, lipschitz=0.9)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    deq = pg.DEQ(layer, solver=pg.Unrolled(4, tol=1e-3), backward=pg.Backprop())
    z, info = deq(x, torch.zeros(3, 6, dtype=F64))
    z.square().sum().backward()
    got = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]

    layer.zero_grad()
    x.grad = None
    h = torch.zeros(3, 6, dtype=F64)
    for _ in range(4):
        prev, h = h, layer(h, x)
    h.square().sum().backward()
    want = [p.grad for p in layer.parameters()] + [x.grad]
    assert torch.equal(z.detach(), h.detach())
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert (info.nstep == 4).all()
    assert torch.allclose(info.abs_residual, (h - prev).norm(dim=1).detach())


def test_unrolled_keeps_states_and_never_stops():
    calls = []

    def fn(z):
        calls.append(1)
        return 0.5 * z

    with torch.no_grad():
        z, info = pg.Unrolled(5, tol=0.1, stop="abs").solve(fn, torch.ones(2, 3, dtype=F64), keep=(2, 5))
    assert len(calls) == 5
    assert torch.equal(info.states[0], torch.full((2, 3), 0.25, dtype=F64)) and info.states[1] is z
    # the last layer's input z_4 = 1/16 has residual ||F(z_4) - z_4|| = sqrt(3) / 32 < 0.1
    assert torch.allclose(info.abs_residual, torch.full((2,), 3**0.5 / 32, dtype=F64)) and info.converged.all()


# ---------------------------------------------------------------- API shape


@pytest.mark.parametrize("cls", [e.cls for e in TO_TOLERANCE], ids=lambda c: c.__name__)
def test_signatures_show_every_keyword(cls):
    import inspect

    params = inspect.signature(cls).parameters
    assert {"max_iter", "tol", "stop", "trace", "check_every"} <= set(params)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    solver = cls(max_iter=7, check_every=None)
    assert solver.max_iter == 7 and solver.check_every is None and "check_every=None" in repr(solver)


def test_solver_is_an_abstract_base_class():
    with pytest.raises(TypeError, match="abstract"):
        pg.Solver()
    assert set(SOLVERS) == {"fixed_point", "anderson", "broyden", "unrolled", "reversible", "gmres"}
    assert all(issubclass(cls, pg.Solver) for cls in SOLVERS.values())
