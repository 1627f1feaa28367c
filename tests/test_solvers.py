import inspect
import math

import pytest
import torch

import phantomgrad as pg
from catalogue import BACKWARD_SOLVERS, PER_SAMPLE, SOLVER_ENTRIES, TO_TOLERANCE
from conftest import TanhLayer
from phantomgrad.solvers.loop import Loop

# every registered solver that iterates a nonlinear map to a tolerance (GMRES is linear-only: tests/test_gmres.py)
CONVERGING = [e for e in TO_TOLERANCE if not e.linear_only]


def _flat_map(layer, x):
    return lambda z: layer(z, x)


@pytest.mark.parametrize("entry", CONVERGING, ids=repr)
@pytest.mark.parametrize("stop", ["rel", "abs"])
def test_solver_reaches_tolerance_and_reports_true_residual(entry, stop):
    layer = TanhLayer(dim=10, lipschitz=0.8)
    x = torch.randn(5, 4, dtype=torch.float64)
    fn = _flat_map(layer, x)
    with torch.no_grad():
        z, info = entry.make(max_iter=200, tol=1e-8, stop=stop).solve(fn, torch.zeros(5, 10, dtype=torch.float64))
        true_abs = (fn(z) - z).norm(dim=1)
        true_rel = true_abs / fn(z).norm(dim=1)
    assert info.converged.all()
    assert torch.allclose(info.abs_residual, true_abs.double(), rtol=1e-6, atol=1e-14)
    assert torch.allclose(info.rel_residual, true_rel.double(), rtol=1e-6, atol=1e-14)
    crit = info.rel_residual if stop == "rel" else info.abs_residual
    assert (crit <= 1e-8).all()
    assert (info.nstep >= 1).all() and (info.nstep <= 200).all()


@pytest.mark.parametrize("entry", BACKWARD_SOLVERS, ids=repr)
def test_max_iter_is_honoured_exactly(entry):
    layer = TanhLayer(dim=10, lipschitz=0.95)
    x = torch.randn(3, 4, dtype=torch.float64)
    calls = []

    def fn(z):
        calls.append(1)
        return layer(z, x)

    with torch.no_grad():
        _, info = entry.make(max_iter=7, tol=1e-30).solve(fn, torch.zeros(3, 10, dtype=torch.float64))
    assert len(calls) == 7
    assert (info.nstep == 7).all()
    assert not info.converged.any()


def test_per_sample_stopping_freezes_converged_samples():
    layer = TanhLayer(dim=8, lipschitz=0.5)
    x = torch.randn(4, 4, dtype=torch.float64)
    with torch.no_grad():
        fixed_point = pg.FixedPoint(max_iter=500, tol=1e-12).solve(
            _flat_map(layer, x), torch.zeros(4, 8, dtype=torch.float64)
        )[0]
    # Start sample 0 at its fixed point: it must stop after one step while the others run on.
    z0 = torch.zeros(4, 8, dtype=torch.float64)
    z0[0] = fixed_point[0]
    with torch.no_grad():
        z, info = pg.FixedPoint(max_iter=100, tol=1e-10).solve(_flat_map(layer, x), z0)
    assert info.nstep[0] == 1
    assert (info.nstep[1:] > 5).all()
    assert torch.equal(z[0], fixed_point[0])


def test_lowest_residual_iterate_is_returned():
    # A map that diverges after a few steps: the best (earliest) iterate must be returned.
    def fn(z):
        return 2.0 * z + 1.0

    with torch.no_grad():
        z, info = pg.FixedPoint(max_iter=10, tol=1e-12, stop="abs").solve(fn, torch.zeros(2, 3, dtype=torch.float64))
    # residual of z is ||z + 1||: z0 = 0 gives the smallest one
    assert torch.equal(z, torch.zeros(2, 3, dtype=torch.float64))
    assert torch.allclose(info.abs_residual, torch.full((2,), math.sqrt(3), dtype=torch.float64))
    assert not info.converged.any()


def test_accelerated_solvers_need_fewer_steps_than_fixed_point():
    # A slow contraction (Lipschitz 0.95) where acceleration is expected to pay.
    layer = TanhLayer(dim=30, lipschitz=0.95)
    x = torch.randn(8, 4, dtype=torch.float64)
    z0 = torch.zeros(8, 30, dtype=torch.float64)
    steps = {}
    with torch.no_grad():
        for entry in PER_SAMPLE:
            _, info = entry.make(max_iter=500, tol=1e-8).solve(_flat_map(layer, x), z0)
            assert info.converged.all(), entry.name
            steps[entry.name] = info.nstep.double().mean().item()
    assert steps["anderson"] < steps["fixed_point"]
    assert steps["broyden"] < steps["fixed_point"]


def test_anderson_reaches_1e10_in_float64():
    layer = TanhLayer(dim=40, lipschitz=0.9)
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        _, info = pg.Anderson(max_iter=100, tol=1e-10, ridge=1e-4).solve(
            _flat_map(layer, x), torch.zeros(6, 40, dtype=torch.float64)
        )
    assert info.converged.all(), info.rel_residual
    assert (info.rel_residual <= 1e-10).all()


def test_anderson_survives_a_singular_system():
    # F constant: every residual difference is zero, so the Anderson system is singular.
    def fn(z):
        return torch.ones_like(z)

    with torch.no_grad():
        z, info = pg.Anderson(max_iter=10, tol=1e-12, ridge=0.0).solve(fn, torch.zeros(3, 4, dtype=torch.float64))
    assert torch.isfinite(z).all()
    assert info.converged.all()
    assert torch.allclose(z, torch.ones_like(z))


def test_broyden_memory_does_not_grow_with_max_iter():
    layer = TanhLayer(dim=12, lipschitz=0.9)
    x = torch.randn(2, 4, dtype=torch.float64)
    sizes = []
    orig = torch.Tensor.new_zeros

    def spy(self, *shape, **kw):
        out = orig(self, *shape, **kw)
        sizes.append(out.numel())
        return out

    torch.Tensor.new_zeros = spy
    try:
        with torch.no_grad():
            for max_iter in (10, 200):
                sizes.clear()
                pg.Broyden(memory=4, max_iter=max_iter, tol=1e-30).solve(
                    _flat_map(layer, x), torch.zeros(2, 12, dtype=torch.float64)
                )
                assert max(sizes) == 2 * 4 * 12
    finally:
        torch.Tensor.new_zeros = orig


def test_trace_records_each_step():
    layer = TanhLayer(dim=5)
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        _, info = pg.FixedPoint(max_iter=6, tol=1e-30, trace=True).solve(
            _flat_map(layer, x), torch.zeros(2, 5, dtype=torch.float64)
        )
    assert len(info.trace) == 6
    residuals = torch.stack(info.trace)
    assert (residuals[1:] < residuals[:-1]).all()  # a contraction's residual decreases


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_iter=0), "max_iter"),
        (dict(max_iter=2.5), "max_iter"),
        (dict(tol=0.0), "tol"),
        (dict(tol=-1e-3), "tol"),
        (dict(stop="relative"), "stop"),
    ],
)
@pytest.mark.parametrize("entry", TO_TOLERANCE, ids=repr)
def test_bad_solver_arguments(entry, kwargs, match):
    with pytest.raises(ValueError, match=match):
        entry.cls(**kwargs)


COMMON = {"max_iter": 50, "tol": 1e-4, "stop": "rel", "trace": False, "check_every": "auto", "fused": False}


@pytest.mark.parametrize("entry", SOLVER_ENTRIES, ids=repr)
def test_every_solver_is_init_and_step_on_the_one_loop(entry):
    """No registered solver overrides solve; its signature shows its options and the common
    keywords it takes, keyword-only, with their real defaults; fusable() reads fused from it."""
    assert entry.cls.solve is pg.Solver.solve and entry.cls.step is not pg.Solver.step
    assert "_iterate" not in vars(entry.cls)
    params = inspect.signature(entry.cls).parameters
    common = {k: p for k, p in params.items() if k in COMMON}
    assert {"tol", "stop", "trace"} <= set(common)
    for key, p in common.items():
        assert p.kind is p.KEYWORD_ONLY and p.default == COMMON[key], key
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
    assert entry.fusable == ("fused" in params)
    solver = entry.make(max_iter=4, tol=1e-3)
    assert repr(solver).startswith(f"{entry.cls.__name__}(")


def test_a_new_solver_is_one_class_with_init_and_step():
    """The smallest solver: its own option, the common keywords for free, the loop's bookkeeping."""

    class Halfway(pg.Solver):
        """z <- z + weight (F(z) - z)."""

        weight: float = 0.5

        def step(self, loop: Loop, state, z, fz, g):
            return state, z + self.weight * g

    params = inspect.signature(Halfway).parameters
    assert list(params) == ["weight", *COMMON] and params["weight"].default == 0.5
    layer = TanhLayer(dim=5, lipschitz=0.5)
    x = torch.randn(3, 4, dtype=torch.float64)
    mine = Halfway(max_iter=200, tol=1e-10, check_every=None).solve(_flat_map(layer, x), torch.zeros(3, 5).double())
    same = pg.FixedPoint(damping=0.5, max_iter=200, tol=1e-10).solve(_flat_map(layer, x), torch.zeros(3, 5).double())
    assert torch.equal(mine[0], same[0]) and torch.equal(mine[1].nstep, same[1].nstep)


@pytest.mark.parametrize("damping", [0.0, 1.5, -0.1])
def test_bad_damping(damping):
    with pytest.raises(ValueError, match="damping"):
        pg.FixedPoint(damping=damping)
    with pytest.raises(ValueError, match="mixing"):
        pg.Anderson(mixing=damping)
