"""``fused=True``: a solver's per-step bookkeeping runs as one compiled function and gives the same
solve as the unfused code (float64, up to the rounding of the norms' sums), with and without host
checks, under autograd, and inside a layer that is itself compiled with ``fullgraph=True``."""

import pytest
import torch

import phantomgrad as pg
from conftest import TanhLayer
from test_solver_sync import MAKERS, _problem

F64 = torch.float64


def _close(a, b):
    """Equal up to float64 rounding (NaN equal to NaN)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("check_every", [1, 3, None])
def test_fused_solve_matches_unfused(name, check_every):
    fn, z0 = _problem(6)  # samples that converge, start converged, never converge, turn non-finite
    keep_inverse = name == "broyden"
    runs = [
        MAKERS[name](max_iter=25, tol=1e-8, check_every=check_every, trace=True, fused=fused).solve(
            fn, z0, keep=(3, 10), keep_inverse=keep_inverse
        )
        for fused in (False, True)
    ]
    (za, ia), (zb, ib) = runs
    assert _close(za, zb)
    for key in ("nstep", "converged", "nonfinite", "fallback"):
        assert torch.equal(getattr(ia, key), getattr(ib, key)), key
    assert bool(ia.nonfinite.any()) and bool(ia.converged.any()) and not bool(ia.converged.all())
    for key in ("abs_residual", "rel_residual"):
        assert _close(getattr(ia, key), getattr(ib, key)), key
    assert len(ia.trace) == len(ib.trace)
    assert all(_close(a, b) for a, b in zip(ia.trace, ib.trace))
    assert all(_close(a, b) for a, b in zip(ia.states, ib.states, strict=True))
    if keep_inverse:
        assert all(_close(a, b) for a, b in zip(ia.inverse_jacobian.factors(), ib.inverse_jacobian.factors()))


@pytest.mark.parametrize("name", ["fixed_point", "anderson"])
def test_backprop_through_a_fused_solve_matches(name):
    """Autograd through the compiled bookkeeping (the residual and the best iterate carry the graph)."""
    torch.manual_seed(0)
    layer = TanhLayer(dim=5, lipschitz=0.8)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    z0 = torch.zeros(3, 5, dtype=F64)
    grads = []
    for fused in (False, True):
        z, _ = MAKERS[name](max_iter=15, tol=1e-6, fused=fused).solve(lambda z: layer(z, x), z0)
        grads.append(torch.autograd.grad(z.square().sum(), (x, *layer.parameters())))
    for a, b in zip(*grads):
        assert _close(a, b)


def test_fused_layer_compiles_with_fullgraph():
    """Inside a compiled caller the fused step is traced inline: no nested compile, no graph break."""
    torch.manual_seed(1)
    f = TanhLayer(dim=6, lipschitz=0.8, dtype=torch.float32)
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=10, tol=1e-5, check_every=None, fused=True), backward=pg.UPG(k=3))
    x = torch.randn(4, 4)
    z0 = torch.zeros(4, 6)
    torch._dynamo.reset()
    compiled = torch.compile(deq, fullgraph=True, backend="aot_eager")
    outs = []
    for run in (deq, compiled):
        z, _ = run(x, z0)
        outs.append((z, *torch.autograd.grad(z.square().sum(), tuple(f.parameters()))))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_must_be_a_bool():
    with pytest.raises(ValueError, match="fused"):
        pg.Anderson(fused="yes")
    assert pg.Broyden(fused=True).fused is True
    assert pg.FixedPoint().fused is False
