"""Golden outputs: every registered solver gives, bit for bit, the float64 states and every
:class:`SolverInfo` field (trace, kept states, Broyden's inverse estimate) recorded in
``tests/golden/solvers.pt`` -- and gradients where autograd runs through the solve.

The batch has samples that converge at their own pace, one that starts at its fixed point, one that
never converges (F(z) = z + 1) and one that turns non-finite after a few steps; every case runs with
``check_every`` 1, 3 and None, and fused where the solver takes ``fused=True`` (fused results are
compared to the norms' rounding, as ``tests/test_fused.py`` allows, since the compiled reductions sum
in another order).

The file was written by the solvers as they were before the one-loop refactor (issue 24); a change
that alters any solver's arithmetic fails here. To record new outputs on purpose (a deliberate change
of behaviour, said so in the commit):

    python tests/test_solver_golden.py --regenerate
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import phantomgrad as pg

F64 = torch.float64
GOLDEN = Path(__file__).resolve().parent / "golden" / "solvers.pt"
BATCH, DIM, IN_DIM = 6, 7, 4
MAX_ITER, TOL, KEEP = 25, 1e-8, (3, 10)

# name -> (maker, takes check_every/fused/keep): the solvers and options recorded
SOLVER_CASES: dict[str, Callable[..., Any]] = {
    "fixed_point": lambda **kw: pg.FixedPoint(**kw),
    "fixed_point_damped": lambda **kw: pg.FixedPoint(damping=0.7, **kw),
    "anderson": lambda **kw: pg.Anderson(m=3, **kw),
    "anderson_mixing": lambda **kw: pg.Anderson(m=3, mixing=0.6, ridge=1e-3, **kw),
    "broyden": lambda **kw: pg.Broyden(memory=4, **kw),
    "broyden_inverse": lambda **kw: pg.Broyden(memory=4, **kw),  # solved with keep_inverse=True
    "unrolled": lambda **kw: pg.Unrolled(depth=12, **kw),
    "reversible": lambda **kw: pg.Reversible(beta=0.5, **kw),
    "reversible_over": lambda **kw: pg.Reversible(beta=1.3, **kw),
}
FUSABLE = {"fixed_point", "fixed_point_damped", "anderson", "anderson_mixing", "broyden", "broyden_inverse"}
NO_CHECK = {"unrolled"}  # takes neither check_every nor max_iter
NO_KEEP = {"reversible", "reversible_over"}


def make_problem() -> dict[str, torch.Tensor]:
    """The map's weights, the inputs and the start, drawn once from a seeded generator (stored in the
    golden file, so the test does not depend on torch's random streams)."""
    gen = torch.Generator().manual_seed(2024)
    w = torch.randn(DIM, DIM, dtype=F64, generator=gen)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    u = torch.randn(DIM, IN_DIM, dtype=F64, generator=gen) / IN_DIM**0.5
    b = 0.1 * torch.randn(DIM, dtype=F64, generator=gen)
    x = torch.randn(BATCH, IN_DIM, dtype=F64, generator=gen) * torch.linspace(0.2, 3.0, BATCH, dtype=F64)[:, None]
    z0 = torch.zeros(BATCH, DIM, dtype=F64)
    problem = {"W": w, "U": u, "b": b, "x": x, "z0": z0}
    fn = make_map(problem, requires_grad=False)
    with torch.no_grad():
        z_star = pg.FixedPoint(max_iter=2000, tol=1e-15, check_every=1).solve(fn, z0)[0]
    z0[0] = z_star[0]  # sample 0 starts at its fixed point
    return problem


def make_map(problem: dict[str, torch.Tensor], requires_grad: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """F(z) = tanh(W z + U x + b), except sample 1: F(z) = z + 1 (never converges), and sample 2:
    z + 1 + 0 * log(4.5 - z) (NaN once z > 4.5, after a few steps). With ``requires_grad`` (the
    autograd cases) sample 2 is left out of the special cases: a NaN would reach every gradient."""
    w, u, b, x = (problem[k].clone().requires_grad_(requires_grad) for k in ("W", "U", "b", "x"))
    rows = torch.arange(BATCH)[:, None]
    oscillating, diverging = rows == 1, (rows == 2) & (not requires_grad)

    def fn(z: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(z @ w.T + x @ u.T + b)
        out = torch.where(oscillating, z + 1.0, out)
        return torch.where(diverging, z + 1.0 + 0.0 * torch.log(4.5 - z), out)

    fn.leaves = (w, u, b, x)  # type: ignore[attr-defined]
    return fn


def case_names() -> list[str]:
    names = []
    for solver in SOLVER_CASES:
        for check_every in (None,) if solver in NO_CHECK else (1, 3, None):
            for fused in (False, True) if solver in FUSABLE else (False,):
                names.append(f"{solver}-ce{check_every}-{'fused' if fused else 'plain'}")
        names.append(f"{solver}-abs")  # stop="abs"
        names.append(f"{solver}-grad")  # autograd through the solve (pg.Backprop's path)
    return names


def run_case(name: str, problem: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Solve case ``name`` and return every output as plain tensors and lists."""
    solver_name, variant = name.split("-", 1)
    kw: dict[str, Any] = {"tol": TOL, "trace": True}
    if solver_name not in NO_CHECK:
        kw["max_iter"] = MAX_ITER
    grad = variant == "grad"
    if variant.startswith("ce"):
        ce, fused = variant[2:].split("-")
        if solver_name not in NO_CHECK:
            kw["check_every"] = None if ce == "None" else int(ce)
        if fused == "fused":
            kw["fused"] = True
    elif variant == "abs":
        kw["stop"] = "abs"
        kw["tol"] = 1e-7
        if solver_name not in NO_CHECK:
            kw["check_every"] = 1
    else:  # grad
        if solver_name not in NO_CHECK:
            kw["check_every"] = 1
    solver = SOLVER_CASES[solver_name](**kw)
    fn = make_map(problem, requires_grad=grad)
    keep = () if solver_name in NO_KEEP else KEEP
    keep_inverse = solver_name == "broyden_inverse"
    with torch.set_grad_enabled(grad):
        z, info = solver.solve(fn, problem["z0"].clone(), keep=keep, keep_inverse=keep_inverse)
    out: dict[str, Any] = {"z": z.detach()}
    for field in ("abs_residual", "rel_residual", "nstep", "converged", "nonfinite", "fallback"):
        out[field] = getattr(info, field).detach()
    out["trace"] = None if info.trace is None else [t.detach() for t in info.trace]
    out["states"] = None if info.states is None else [s.detach() for s in info.states]
    inv = info.inverse_jacobian
    out["inverse"] = None if inv is None else [t.detach() for t in (inv.steps, inv.coef, inv.tail, inv.count)]
    if grad:
        loss = z.square().sum()
        leaves = fn.leaves  # type: ignore[attr-defined]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        out["grads"] = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    return out


def regenerate() -> None:
    problem = make_problem()
    golden = {"problem": problem, "cases": {name: run_case(name, problem) for name in case_names()}}
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(golden, GOLDEN)
    print(f"wrote {len(golden['cases'])} cases to {GOLDEN}")


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return torch.load(GOLDEN, weights_only=True)


def _same(a: Any, b: Any, exact: bool) -> bool:
    """Equal bit for bit (NaN equal to NaN), or to float64 rounding where ``exact`` is False."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y, exact) for x, y in zip(a, b))
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if exact or not a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_the_golden_batch_has_every_kind_of_sample(golden):
    """Guards the data: some samples converge, one starts converged, one never converges, one goes NaN."""
    out = golden["cases"]["fixed_point-ce1-plain"]
    assert out["converged"][0] and out["nstep"][0] == 1
    assert not out["converged"][1] and not out["nonfinite"][1]
    assert out["nonfinite"][2] and not out["nonfinite"][3:].any()
    assert out["converged"][3:].all() and len(set(out["nstep"][3:].tolist())) > 1


@pytest.mark.parametrize("name", case_names())
def test_solver_output_equals_the_golden_output(golden, name):
    expected = golden["cases"][name]
    got = run_case(name, golden["problem"])
    exact = "fused" not in name
    assert set(got) == set(expected)
    for key in expected:
        assert _same(got[key], expected[key], exact), key


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_solver_golden.py --regenerate")
    regenerate()
