"""pg.Implicit's backward solve reports and recovers: a rate-limited warning when it misses its
tolerance (sync-free under check_every=None), a per-sample fallback to a phantom gradient, what
info.backward records, and the signature that shows the default solver."""

import inspect
import logging

import pytest
import torch

import phantomgrad as pg
from phantomgrad.models.toy import TanhMap

F64 = torch.float64


def _problem(batch=6):
    f = TanhMap(dim=8, in_dim=4, lipschitz=0.95, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    # samples with a large input saturate tanh (small Jacobian: the backward solve converges fast),
    # samples with a small one do not
    scale = torch.tensor([30.0, 0.05, 30.0, 0.05, 30.0, 0.05], dtype=F64)[:batch, None]
    x = scale * torch.randn(batch, 4, dtype=F64, generator=gen)
    return f, x, torch.zeros(batch, 8, dtype=F64), torch.randn(batch, 8, dtype=F64, generator=gen)


def _x_grad(f, mode, x, z0, w):
    xr = x.clone().requires_grad_()
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=200, tol=1e-14), backward=mode, warn_not_converged=False)
    z, info = deq(xr, z0)
    (z * w).sum().backward()
    return xr.grad, info  # row i is sample i's own gradient


@pytest.mark.parametrize("check_every", [1, None], ids=["host-checks", "sync-free"])
@pytest.mark.parametrize("fallback, phantom", [("upg", pg.UPG(k=5, damping=0.5)), ("jfb", pg.JFB())])
def test_fallback_replaces_exactly_the_unconverged_samples(fallback, phantom, check_every):
    f, x, z0, w = _problem()
    solver = pg.FixedPoint(max_iter=6, tol=1e-8, check_every=check_every)
    plain, info_plain = _x_grad(f, pg.Implicit(solver, warn_interval=10**6), x, z0, w)
    mixed, info = _x_grad(f, pg.Implicit(solver, fallback=fallback, warn_interval=10**6), x, z0, w)
    want_phantom, _ = _x_grad(f, phantom, x, z0, w)
    failed = ~info.backward.converged
    assert failed.any() and not failed.all()  # a mixed batch: the test can tell the samples apart
    assert torch.equal(info.backward.fallback, failed)
    assert torch.equal(failed, ~info_plain.backward.converged)
    torch.testing.assert_close(mixed[failed], want_phantom[failed], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mixed[~failed], plain[~failed], rtol=0, atol=0)
    assert not torch.allclose(plain[failed], want_phantom[failed], rtol=1e-3)  # falling back changed them


def test_without_fallback_nothing_is_flagged_and_a_converged_solve_never_falls_back():
    f, x, z0, w = _problem()
    _, info = _x_grad(f, pg.Implicit(pg.Broyden(max_iter=100, tol=1e-12), fallback="upg"), x, z0, w)
    assert info.backward.converged.all() and not info.backward.fallback.any()
    _, info = _x_grad(f, pg.Implicit(pg.FixedPoint(max_iter=6, tol=1e-8), warn_interval=10**6), x, z0, w)
    assert not info.backward.fallback.any()  # fallback=None: nothing replaced
    assert {"converged", "rel_residual", "abs_residual", "nstep", "fallback"} <= set(vars(info.backward))


def _backward_calls(mode, calls, caplog):
    f, x, z0, w = _problem()
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=200, tol=1e-14), backward=mode, warn_not_converged=False)
    z, _ = deq(x, z0)
    with caplog.at_level(logging.WARNING, logger="phantomgrad.backward"):
        for _ in range(calls):
            (z * w).sum().backward(retain_graph=True)
    return [r for r in caplog.records if r.name == "phantomgrad.backward"]


def test_a_backward_solve_that_misses_its_tolerance_warns_once_per_interval(caplog):
    records = _backward_calls(pg.Implicit(pg.FixedPoint(max_iter=2, tol=1e-10), warn_interval=3), 7, caplog)
    assert len(records) == 3  # calls 0, 3 and 6
    message = records[0].getMessage()
    assert "backward solve (pg.Implicit) missed its tolerance" in message and "fallback='upg'" in message
    assert "\n" not in message


def test_the_warnings_advice_can_be_put_in_a_callers_syntax(caplog):
    mode = pg.Implicit(pg.FixedPoint(max_iter=2, tol=1e-10))
    mode.not_converged_hint = "Raise backward_max_iter= or set backward_options.fallback=upg"
    (record,) = _backward_calls(mode, 1, caplog)
    message = record.getMessage()
    assert "not exact. Raise backward_max_iter= or set backward_options.fallback=upg (next warning" in message


def test_a_converged_backward_solve_does_not_warn(caplog):
    assert not _backward_calls(pg.Implicit(pg.Broyden(max_iter=100, tol=1e-12), warn_interval=1), 3, caplog)


def test_a_sync_free_backward_reads_the_device_only_every_interval(caplog, monkeypatch):
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    mode = pg.Implicit(pg.FixedPoint(max_iter=2, tol=1e-10, check_every=None), warn_interval=4)
    f, x, z0, w = _problem()
    deq = pg.DEQ(
        f, solver=pg.Anderson(max_iter=50, tol=1e-14, check_every=None), backward=mode, warn_not_converged=False
    )
    z, _ = deq(x, z0)
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="phantomgrad.backward"):
        for _ in range(8):
            (z * w).sum().backward(retain_graph=True)
    assert len(reads) == 2  # calls 0 and 4
    assert len([r for r in caplog.records if r.name == "phantomgrad.backward"]) == 2


def test_second_order_through_a_fallen_back_sample_is_refused():
    f, x, z0, w = _problem()
    mode = pg.Implicit(pg.FixedPoint(max_iter=6, tol=1e-8), fallback="jfb", warn_interval=10**6)
    z, _ = pg.DEQ(f, solver=pg.Anderson(max_iter=200, tol=1e-14), backward=mode)(x, z0)
    with pytest.raises(RuntimeError, match="fell back to a phantom gradient"):
        torch.autograd.grad((z * w).sum(), list(f.parameters()), create_graph=True)


def test_the_signature_shows_the_default_solver():
    default = inspect.signature(pg.Implicit).parameters["solver"].default
    assert repr(default).startswith("Broyden(max_iter=30, tol=1e-06, stop='rel'")
    a, b = pg.Implicit(), pg.Implicit()
    assert repr(a.solver) == repr(default) and a.solver is not default and a.solver is not b.solver
    assert "solver: 'Solver | None' = Broyden(max_iter=30" in str(inspect.signature(pg.Implicit))


@pytest.mark.parametrize("kwargs", [{"fallback": "npg"}, {"fallback": 1}, {"solver": "broyden"}, {"warn_interval": 0}])
def test_bad_arguments_are_one_line_errors(kwargs):
    with pytest.raises((ValueError, TypeError)) as err:
        pg.Implicit(**kwargs)
    assert "\n" not in str(err.value)
