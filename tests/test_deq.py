"""The DEQ layer's contract: info, bad input, warnings, regularisers."""

import logging

import pytest
import torch

import phantomgrad as pg
from conftest import TanhLayer, TupleLayer

F64 = torch.float64


def test_info_fields_are_per_sample():
    layer = TanhLayer()
    z, info = pg.DEQ(layer, solver=pg.Anderson(max_iter=40, tol=1e-8))(
        torch.randn(5, 4, dtype=F64), torch.zeros(5, 6, dtype=F64)
    )
    for name in ("abs_residual", "rel_residual", "nstep", "converged", "nonfinite", "fallback"):
        assert getattr(info, name).shape == (5,), name
    assert info.converged.all()
    assert set(info.summary()) >= {"abs_residual", "rel_residual", "nstep", "converged"}


def test_mismatched_z0_names_both_structures():
    deq = pg.DEQ(lambda z, x: torch.tanh(x @ torch.ones(4, 6, dtype=F64)))
    with pytest.raises(ValueError, match=r"f\(z, x\).*\(3, 6\).*\(3, 5\)"):
        deq(torch.randn(3, 4, dtype=F64), torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="tuple"):
        deq(torch.randn(3, 4, dtype=F64), (torch.zeros(3, 6, dtype=F64),))
    pair = pg.DEQ(lambda z, x: (torch.tanh(x), torch.tanh(x[:, :3])))
    with pytest.raises(ValueError, match="tuple"):
        pair(torch.randn(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64))


@pytest.mark.parametrize("where", ["x", "z0"])
def test_non_finite_inputs_are_refused(where):
    x = torch.randn(2, 4, dtype=F64)
    z0 = torch.zeros(2, 6, dtype=F64)
    (x if where == "x" else z0)[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pg.DEQ(TanhLayer())(x, z0)


def test_non_finite_residual_is_flagged_and_not_handed_on(caplog):
    # F blows up to inf after a couple of steps for sample 0 only.
    def f(z, x):
        return z * x + 1.0

    x = torch.tensor([[1e200], [0.5]], dtype=F64)
    with caplog.at_level(logging.WARNING, logger="phantomgrad"):
        with torch.no_grad():
            z, info = pg.DEQ(f, solver=pg.FixedPoint(max_iter=10, tol=1e-12))(x, torch.zeros(2, 1, dtype=F64))
    assert info.nonfinite.tolist() == [True, False]
    assert torch.isfinite(z).all()
    assert not info.converged[0]
    assert "non-finite" in caplog.text


def _slow_layer_args():
    layer = TanhLayer(lipschitz=0.99)
    return layer, (torch.randn(2, 4, dtype=F64), torch.zeros(2, 6, dtype=F64))


def test_not_converged_warning_is_on_by_default_and_rate_limited(caplog):
    layer, args = _slow_layer_args()
    deq = pg.DEQ(layer, solver=pg.FixedPoint(max_iter=2, tol=1e-6), warn_interval=3)
    with caplog.at_level(logging.WARNING, logger="phantomgrad"):
        for _ in range(7):
            _, info = deq(*args)
    assert not info.converged.any()
    warnings = [r for r in caplog.records if "missed its tolerance" in r.getMessage()]
    assert len(warnings) == 3  # calls 0, 3 and 6
    assert "warn_not_converged=False" in warnings[0].getMessage()


def test_not_converged_warning_needs_a_10x_miss_and_can_be_silenced(caplog):
    layer, args = _slow_layer_args()
    with torch.no_grad():
        _, info = pg.DEQ(layer, solver=pg.FixedPoint(max_iter=2, tol=1e-6), warn_not_converged=False)(*args)
    mean = float(info.rel_residual.mean())
    with caplog.at_level(logging.WARNING, logger="phantomgrad"):
        pg.DEQ(layer, solver=pg.FixedPoint(max_iter=2, tol=mean / 9.9))(*args)  # missed, by less than 10x
        pg.DEQ(layer, solver=pg.FixedPoint(max_iter=2, tol=1e-6), warn_not_converged=False)(*args)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="phantomgrad"):
        pg.DEQ(layer, solver=pg.FixedPoint(max_iter=2, tol=mean / 10.1))(*args)
    assert "missed its tolerance" in caplog.text
    with pytest.raises(ValueError, match="warn_interval"):
        pg.DEQ(layer, warn_interval=True)


def test_constructor_rejects_wrong_types():
    with pytest.raises(TypeError, match="solver"):
        pg.DEQ(TanhLayer(), solver="anderson")
    with pytest.raises(TypeError, match="backward"):
        pg.DEQ(TanhLayer(), backward="upg")
    with pytest.raises(TypeError, match="callable"):
        pg.DEQ(3)


def test_parameters_of_f_are_registered():
    layer = TanhLayer()
    deq = pg.DEQ(layer)
    assert {id(p) for p in deq.parameters()} == {id(p) for p in layer.parameters()}


def test_make_by_name():
    assert isinstance(pg.make_solver("broyden", memory=3), pg.Broyden)
    assert isinstance(pg.make_backward("npg", k=2, damping=0.5), pg.NPG)
    with pytest.raises(ValueError, match="choose one of"):
        pg.make_solver("newton")
    with pytest.raises(ValueError, match="choose one of"):
        pg.make_backward("upgg")


def test_spectral_radius_of_a_linear_map():
    # F(z) = z A^T + x with A symmetric: dF/dz = A, spectral radius = max |eigenvalue|.
    A = torch.randn(5, 5, dtype=F64)
    A = (A + A.T) / 2
    expected = torch.linalg.eigvalsh(A).abs().max()
    A = A / expected * 0.8

    def f(z, x):
        return z @ A.T + x

    rho = pg.spectral_radius(f, torch.zeros(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64), iters=300)
    assert rho.shape == (3,)
    assert torch.allclose(rho, torch.full((3,), 0.8, dtype=F64), atol=1e-6)


def test_jacobian_penalty_estimates_frobenius_norm_and_is_differentiable():
    layer = TanhLayer(dim=6)
    x = torch.randn(4, 4, dtype=F64)
    z = torch.randn(4, 6, dtype=F64)
    exact = sum(torch.autograd.functional.jacobian(lambda zi: layer(zi, x[i]), z[i]).pow(2).sum() for i in range(4)) / (
        4 * 6
    )
    estimate = pg.jacobian_penalty(layer, z, x, n_samples=2000)
    assert torch.allclose(estimate, exact, rtol=0.05)
    pg.jacobian_penalty(layer, z, x).backward()
    assert layer.W.grad is not None and layer.W.grad.abs().sum() > 0


def test_fallback_solver_is_used_when_it_helps():
    class Flaky(pg.Solver):
        """A solver that always returns NaN residuals: stands in for a diverging Anderson."""

        def evaluate(self, loop, state, z):
            return torch.full_like(z, float("nan"))

        def step(self, loop, state, z, fz, g):
            return state, z

    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=F64)
    with torch.no_grad():
        z, info = pg.DEQ(layer, solver=Flaky(max_iter=5), fallback=pg.FixedPoint(damping=0.5, max_iter=300, tol=1e-10))(
            x, torch.zeros(3, 6, dtype=F64)
        )
        residual = (layer(z, x) - z).norm(dim=1)
    assert info.fallback.all() and not info.nonfinite.any() and info.converged.all()
    assert (residual < 1e-8).all()


def test_state_stays_float32_when_f_runs_in_bfloat16():
    layer = TanhLayer(dtype=torch.float32)
    x = torch.randn(3, 4)

    def f(z, x):  # what autocast does to F's output
        return layer(z, x).bfloat16()

    with torch.no_grad():
        z, info = pg.DEQ(f, solver=pg.FixedPoint(max_iter=50, tol=1e-2))(x, torch.zeros(3, 6, dtype=torch.bfloat16))
    assert z.dtype == torch.float32
    assert info.converged.all()


def test_sparse_inputs_are_accepted_and_checked():
    adjacency = torch.eye(3, dtype=F64).to_sparse()

    def f(z, x):
        return 0.5 * torch.sparse.mm(x[1], z.T).T + x[0]

    z, info = pg.DEQ(f, solver=pg.FixedPoint(max_iter=100, tol=1e-10))(
        (torch.ones(1, 3, dtype=F64), adjacency), torch.zeros(1, 3, dtype=F64)
    )
    assert info.converged.all() and torch.allclose(z, torch.full((1, 3), 2.0, dtype=F64))
    bad = torch.sparse_coo_tensor([[0], [0]], torch.tensor([float("nan")], dtype=F64), (3, 3), check_invariants=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        pg.DEQ(f)((torch.ones(1, 3, dtype=F64), bad), torch.zeros(1, 3, dtype=F64))


def test_swapped_arguments_name_what_f_received():
    layer = TanhLayer(dim=6, in_dim=4)
    x, z0 = torch.randn(3, 4, dtype=F64), torch.zeros(3, 6, dtype=F64)
    with pytest.raises(RuntimeError) as caught:
        pg.DEQ(layer)(z0, x)  # swapped: f receives x's tensor as z and z0 as x
    message = str(caught.value)
    assert "\n" not in message
    assert "z = Tensor (3, 4) float64" in message and "x = Tensor (3, 6) float64" in message
    assert "deq(x, z0)" in message and "f(z, x)" in message
    assert isinstance(caught.value.__cause__, RuntimeError)  # chained from F's own error
    pair = pg.DEQ(TupleLayer())
    with pytest.raises(RuntimeError, match=r"z = tuple of \[Tensor \(2, 4\) float64, Tensor \(2, 3\) float64\]"):
        pair(torch.randn(2, 5, dtype=F64), (torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64)))


def test_other_errors_of_f_pass_unchanged():
    class Custom(Exception):
        pass

    def f(z, x):
        raise Custom("from f")

    with pytest.raises(Custom, match="^from f$"):
        pg.DEQ(f)(torch.randn(2, 3), torch.zeros(2, 3))


def test_signatures_and_help_show_the_real_arguments():
    import inspect
    import pydoc

    for obj in (pg.DEQ, pg.UPG, pg.NPG, pg.JFB, pg.Implicit, pg.Backprop, pg.AdaptivePhantom):
        params = inspect.signature(obj).parameters.values()
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params), obj
    assert list(inspect.signature(pg.DEQ.forward).parameters) == ["self", "x", "z0", "states"]
    text = pydoc.render_doc(pg.DEQ, renderer=pydoc.plaintext)
    assert "Solve z* = f(z*, x) from ``z0``" in text


@pytest.mark.parametrize("check_every, expected", [(1, 4), (None, 2)])
def test_a_sync_free_layer_reads_its_health_only_every_warn_interval_calls(caplog, check_every, expected):
    """With check_every=None the layer reads residuals and flags on the host once per warn_interval calls
    (calls 0 and 3 of 4 here), not on every call."""

    def f(z, x):
        return z * x + 1.0  # sample 0 overflows to inf

    x = torch.tensor([[1e200], [0.5]], dtype=F64)
    deq = pg.DEQ(
        f,
        solver=pg.FixedPoint(max_iter=10, tol=1e-12, check_every=check_every),
        warn_interval=3,
        warn_not_converged=False,
    )
    with caplog.at_level(logging.WARNING, logger="phantomgrad"), torch.no_grad():
        for _ in range(4):
            _, info = deq(x, torch.zeros(2, 1, dtype=F64))
    assert info.nonfinite.tolist() == [True, False]
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == expected
