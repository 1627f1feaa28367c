"""torch.compile on CPU: a training step whose F is compiled (or whose whole DEQ layer is) gives the
eager loss and gradients for UPG, NPG and JFB, and the solvers run on a compiled F.

phantomgrad's solvers are plain Python loops around calls of F. In eager mode the default check_every
(1 on CPU) reads the stopping test on the host every step; under torch.compile the solve and the layer take
the sync-free path by themselves (no host read), so torch.compile(model) with default arguments traces the
layer as one graph for every backward mode but those listed in BREAKS_WITH_DEFAULTS, and with
check_every=None the layer compiles with fullgraph=True too, which is what a CUDA graph needs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import phantomgrad as pg
from conftest import TanhLayer, TupleLayer
from phantomgrad.modes import BACKWARD_MODES
from phantomgrad.solvers import SOLVERS


class MLPMap(nn.Module):
    """F(z, x) = tanh(W2 relu(W1 z) / 2 + U x): small, so that compiling it takes seconds."""

    def __init__(self, dim: int = 16, in_dim: int = 8):
        super().__init__()
        self.w1 = nn.Linear(dim, dim)
        self.w2 = nn.Linear(dim, dim)
        self.u = nn.Linear(in_dim, dim)

    def forward(self, z, x):
        return torch.tanh(0.5 * self.w2(torch.relu(self.w1(z))) + self.u(x))


@pytest.fixture(scope="module")
def compiled_map():
    torch.manual_seed(0)
    f = MLPMap()
    torch._dynamo.reset()
    return f, torch.compile(f)  # the compiled module shares f's parameters


def _step(f, backward, x, y, head):
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=40, tol=1e-6), backward=backward)
    for p in list(deq.parameters()) + list(head.parameters()):
        p.grad = None
    z, info = deq(x, torch.zeros(x.shape[0], 16))
    loss = nn.functional.cross_entropy(head(z), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in deq.parameters()] + [p.grad.clone() for p in head.parameters()], info


@pytest.mark.parametrize("backward", [pg.UPG(k=5, damping=0.5), pg.NPG(k=5, damping=0.5), pg.JFB()], ids=repr)
def test_compiled_map_training_step_matches_eager(compiled_map, backward):
    f, fc = compiled_map
    torch.manual_seed(1)
    head = nn.Linear(16, 3)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    loss_e, grads_e, info_e = _step(f, backward, x, y, head)
    loss_c, grads_c, info_c = _step(fc, backward, x, y, head)
    assert torch.equal(info_e.nstep, info_c.nstep)
    assert torch.allclose(loss_e, loss_c, atol=1e-5)
    for ge, gc in zip(grads_e, grads_c):
        assert torch.allclose(ge, gc, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("solver", [pg.FixedPoint(max_iter=60, tol=1e-5), pg.Broyden(max_iter=40, tol=1e-5)], ids=repr)
def test_solvers_run_on_a_compiled_map(compiled_map, solver):
    f, fc = compiled_map
    x = torch.randn(6, 8)
    with torch.no_grad():
        z_e, info_e = solver.solve(lambda z: f(z, x), torch.zeros(6, 16))
        z_c, info_c = solver.solve(lambda z: fc(z, x), torch.zeros(6, 16))
    assert info_c.all_converged and torch.equal(info_e.nstep, info_c.nstep)
    assert torch.allclose(z_e, z_c, atol=1e-5)


@pytest.mark.slow
def test_whole_layer_compiles_and_matches_eager():
    """torch.compile(DEQ) traces the solver loop too (every max_iter step, no host read); the aot_eager
    backend keeps the test quick while exercising Dynamo and AOTAutograd."""
    torch.manual_seed(2)
    f = MLPMap()
    head = nn.Linear(16, 3)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=40, tol=1e-6), backward=pg.UPG(k=3, damping=0.5))
    torch._dynamo.reset()
    compiled = torch.compile(deq, backend="aot_eager")
    results = []
    for layer in (deq, compiled):
        f.zero_grad()
        head.zero_grad()
        z, _ = layer(x, torch.zeros(12, 16))
        nn.functional.cross_entropy(head(z), y).backward()
        results.append([p.grad.clone() for p in f.parameters()])
    for ge, gc in zip(*results):
        assert torch.allclose(ge, gc, atol=1e-5, rtol=1e-4)


# ---- whole-layer capture: check_every=None, torch.compile(fullgraph=True) -----------------------------------

F64 = torch.float64
SYNC_FREE_MODES = {
    "upg": lambda: pg.UPG(k=3, damping=0.5),
    "npg": lambda: pg.NPG(k=3, damping=0.5),
    "jfb": pg.JFB,
    "implicit": lambda: pg.Implicit(pg.Broyden(max_iter=8, tol=1e-10, check_every=None)),
}


def _problem(tuple_state: bool):
    layer = TupleLayer() if tuple_state else TanhLayer()
    x = torch.randn(3, 4, dtype=F64)
    z0 = (torch.zeros(3, 4, dtype=F64), torch.zeros(3, 3, dtype=F64)) if tuple_state else torch.zeros(3, 6, dtype=F64)
    return layer, x, z0


def _parts(z):
    return list(z) if isinstance(z, tuple) else [z]


def _run(layer_call, layer, x, z0, **kwargs):
    """Outputs, info and the gradients of a weighted loss on every returned state, for params and x."""
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    z, info = layer_call(xr, z0, **kwargs)
    states = z if isinstance(z, list) else [z]
    outs = [p for s in states for p in _parts(s)]
    gen = torch.Generator().manual_seed(5)
    sum((p * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum() for p in outs).backward()
    return [o.detach() for o in outs], info, [p.grad.clone() for p in layer.parameters()] + [xr.grad.clone()]


def _assert_same(eager, compiled):
    (outs_e, info_e, grads_e), (outs_c, info_c, grads_c) = eager, compiled
    for a, b in zip(outs_e + grads_e, outs_c + grads_c, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    for name in ("abs_residual", "rel_residual", "nstep", "converged", "nonfinite"):
        assert torch.equal(getattr(info_e, name), getattr(info_c, name)), name


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("mode", sorted(SYNC_FREE_MODES))
def test_sync_free_layer_compiles_without_graph_breaks(mode, tuple_state):
    """With check_every=None the whole training step of the layer (solve and attach, and the backward mode's
    own backward) is one graph: fullgraph=True refuses any graph break. NPG and Implicit take VJPs inside
    their backward, which Dynamo traces only with trace_autograd_ops."""
    torch.manual_seed(3)
    layer, x, z0 = _problem(tuple_state)
    solver = pg.Anderson(m=3, max_iter=6, tol=1e-10, check_every=None)  # the default solver of the layer
    deq = pg.DEQ(layer, solver=solver, backward=SYNC_FREE_MODES[mode]())
    eager = _run(deq, layer, x, z0)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = _run(torch.compile(deq, backend="aot_eager", fullgraph=True), layer, x, z0)
    _assert_same(eager, compiled)
    if mode == "implicit":
        assert eager[1].backward is not None and compiled[1].backward is None  # no Python runs in a compiled backward


def test_sync_free_layer_compiles_with_trajectory_states_in_eval_mode():
    torch.manual_seed(4)
    layer, x, z0 = _problem(False)
    deq = pg.DEQ(
        layer,
        solver=pg.Broyden(max_iter=6, tol=1e-10, check_every=None),
        backward=pg.UPG(k=2, damping=0.5),
        return_states=(2, 4),
    ).eval()
    eager = _run(deq, layer, x, z0)
    torch._dynamo.reset()
    compiled = _run(torch.compile(deq, backend="aot_eager", fullgraph=True), layer, x, z0)
    assert len(eager[0]) == 3
    _assert_same(eager, compiled)


@pytest.mark.slow
def test_sync_free_layer_compiles_with_inductor():
    torch.manual_seed(6)
    f = MLPMap()
    x, z0 = torch.randn(12, 8), torch.zeros(12, 16)
    deq = pg.DEQ(f, solver=pg.FixedPoint(max_iter=8, tol=1e-6, check_every=None), backward=pg.UPG(k=3, damping=0.5))

    def step(layer):
        f.zero_grad()
        z, info = layer(x, z0)
        z.pow(2).sum().backward()
        return z.detach(), [p.grad.clone() for p in f.parameters()], info

    z_e, grads_e, info_e = step(deq)
    torch._dynamo.reset()
    z_c, grads_c, info_c = step(torch.compile(deq, fullgraph=True))
    assert torch.equal(info_e.nstep, info_c.nstep)
    assert torch.allclose(z_e, z_c, atol=1e-5)
    for ge, gc in zip(grads_e, grads_c):
        assert torch.allclose(ge, gc, atol=1e-5, rtol=1e-4)


def test_sync_free_layer_leaves_non_finite_inputs_to_the_device_flag():
    """Without host syncs the layer cannot refuse a NaN input up front; the solver flags the sample instead."""
    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=F64)
    x[1, 0] = float("nan")
    with torch.no_grad():
        _, info = pg.DEQ(layer, solver=pg.FixedPoint(max_iter=5, check_every=None), warn_not_converged=False)(
            x, torch.zeros(3, 6, dtype=F64)
        )
    assert info.nonfinite.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="NaN or Inf"):
        pg.DEQ(layer, solver=pg.FixedPoint(max_iter=5, check_every=1))(x, torch.zeros(3, 6, dtype=F64))


# ---- torch.compile(model) with default arguments: every registered backward mode -----------------------------

# Modes that still break the graph under torch.compile with default arguments in torch 2.13, and why. The
# test below asserts that each of these does break (so the list cannot go stale) and that every other does not.
BREAKS_WITH_DEFAULTS: dict[str, str] = {}


def _default_layer(name: str, f):
    """pg.DEQ(f, backward=Mode()) with every default; a mode that refuses the default solver (SHINE) gets the
    first registered solver it accepts, with that solver's defaults."""
    mode = BACKWARD_MODES[name]()
    try:
        return pg.DEQ(f, backward=mode)
    except ValueError:
        for cls in SOLVERS.values():
            try:
                return pg.DEQ(f, solver=cls(), backward=mode)
            except (TypeError, ValueError):
                continue
    raise AssertionError(f"no registered solver works with {name}")


class _CountGraphs:
    """A torch.compile backend that runs each graph Dynamo captured as is and counts them: one graph for a
    call means no graph break (what torch._dynamo.explain's count says), at a quarter of explain's cost."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("name", sorted(BACKWARD_MODES))
def test_default_layer_compiles_without_graph_breaks_and_matches_eager(name):
    """The layer with every default (Anderson, check_every="auto": host checks in eager) in a training step
    under torch.compile: one graph (no break) for every mode but those listed with the reason, and the eager
    outputs, info and float64 gradients (Dynamo's graphs run by the eager backend, gradients through them)."""
    torch.manual_seed(7)
    layer, x, z0 = _problem(False)
    deq = _default_layer(name, layer)
    eager = _run(deq, layer, x, z0)
    torch._dynamo.reset()
    counter = _CountGraphs()
    compiled = _run(torch.compile(deq, backend=counter), layer, x, z0)
    if name in BREAKS_WITH_DEFAULTS:
        assert counter.graphs > 1, f"{name} no longer breaks the graph: remove it from BREAKS_WITH_DEFAULTS"
    else:
        assert counter.graphs == 1, f"{name}: {counter.graphs} graphs, {counter.graphs - 1} graph break(s)"
    (outs_e, info_e, grads_e), (outs_c, info_c, grads_c) = eager, compiled
    for a, b in zip(outs_e + grads_e, outs_c + grads_c, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    assert torch.equal(info_e.nstep, info_c.nstep) and torch.equal(info_e.converged, info_c.converged)


def test_a_model_around_the_layer_compiles_as_one_graph():
    """The issue's case: a small model (injection, DEQ with default arguments, head) under torch.compile(model)
    counted 17-21 graph breaks; now none, and no recompilation on the second call."""
    torch.manual_seed(8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Linear(8, 8), nn.Linear(16, 3)
            self.deq = pg.DEQ(MLPMap())

        def forward(self, x):
            z, info = self.deq(self.stem(x), torch.zeros(x.shape[0], 16))
            return self.head(z), info

    model = Model()
    x = torch.randn(6, 8)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x)[0].sum().backward()
        compiled(torch.randn(6, 8))[0].sum().backward()  # the same shapes: no recompile


@pytest.mark.parametrize("max_iter", [2, 50], ids=["falls-back", "converges"])
def test_shine_chooses_its_fallback_on_the_device_under_compile(max_iter):
    """SHINE's batch-wide choice (its JFB fallback when a sample did not converge) is a where on the device
    inside a compiled graph: one graph either way, and the eager gradient of the branch eager mode takes."""
    torch.manual_seed(9)
    layer, x, z0 = _problem(False)
    deq = pg.DEQ(layer, solver=pg.Broyden(max_iter=max_iter, tol=1e-10), backward=pg.SHINE(), warn_not_converged=False)
    eager = _run(deq, layer, x, z0)
    assert bool(eager[1].converged.all()) == (max_iter == 50)  # both branches are exercised
    torch._dynamo.reset()
    counter = _CountGraphs()
    compiled = _run(torch.compile(deq, backend=counter), layer, x, z0)
    assert counter.graphs == 1
    _assert_same(eager, compiled)
