"""NPG, Implicit, SHINE and GDEQ under torch.compile(fullgraph=True) without any Dynamo option: their
backward takes its vector-Jacobian products with torch.func.vjp, which Dynamo traces as it is (with
torch.autograd.grad it needed torch._dynamo.config.trace_autograd_ops=True). Float64 outputs and
gradients equal the eager layer's."""

import pytest
import torch

import phantomgrad as pg
from phantomgrad.models.toy import TanhMap

F64 = torch.float64

MODES = {
    "npg": (lambda: pg.Anderson(m=3, max_iter=6, tol=1e-10, check_every=None), lambda: pg.NPG(k=3, damping=0.5)),
    "implicit": (
        lambda: pg.Anderson(m=3, max_iter=6, tol=1e-10, check_every=None),
        lambda: pg.Implicit(pg.Broyden(max_iter=8, tol=1e-10, check_every=None)),
    ),
    "gdeq": (lambda: pg.Broyden(max_iter=8, tol=1e-10, check_every=None), pg.GDEQ),
}


def _step(layer_call, f, x, z0):
    f.zero_grad()
    xr = x.clone().requires_grad_()
    z, _ = layer_call(xr, z0)
    w = torch.randn(z.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    (z * w).sum().backward()
    return [z.detach(), *(p.grad.clone() for p in f.parameters()), xr.grad.clone()]


@pytest.mark.parametrize("name", sorted(MODES))
def test_modes_with_vjps_in_backward_compile_fullgraph_with_no_dynamo_option(name):
    assert not torch._dynamo.config.trace_autograd_ops  # the default: nothing set by the user or by import
    f = TanhMap(dim=6, in_dim=4, lipschitz=0.6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    z0 = torch.zeros(3, 6, dtype=F64)
    solver, mode = MODES[name]
    deq = pg.DEQ(f, solver=solver(), backward=mode())
    eager = _step(deq, f, x, z0)
    torch._dynamo.reset()
    compiled = _step(torch.compile(deq, backend="aot_eager", fullgraph=True), f, x, z0)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_repeated_vjps_through_a_compiled_map_need_no_process_wide_setting():
    """A separately compiled F (the docs' recipe) in a UPG step, then NPG's and spectral_radius's repeated
    VJPs through it: the eager results, while torch._functorch.config.donated_buffer stays as the user left
    it (phantomgrad sets it only around its own calls of F and its backward passes)."""
    import torch._functorch.config as aot_config

    before = aot_config.donated_buffer
    f = TanhMap(dim=6, in_dim=4, lipschitz=0.6, generator=torch.Generator().manual_seed(0))
    fc = torch.compile(f, backend="aot_eager")
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    z0 = torch.zeros(3, 6, dtype=F64)
    torch._dynamo.reset()
    for mode in (pg.UPG(k=3, damping=0.5), pg.NPG(k=3, damping=0.5)):
        solver = pg.Anderson(max_iter=40, tol=1e-12)
        eager = _step(pg.DEQ(f, solver=solver, backward=mode), f, x, z0)
        compiled = _step(pg.DEQ(fc, solver=solver, backward=mode), f, x, z0)
        for a, b in zip(eager, compiled, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    z = eager[0]
    torch.manual_seed(2)
    radius_eager = pg.spectral_radius(f, z, x)
    torch.manual_seed(2)
    torch.testing.assert_close(pg.spectral_radius(fc, z, x), radius_eager, rtol=1e-9, atol=1e-12)
    assert aot_config.donated_buffer == before
