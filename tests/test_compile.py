"""torch.compile on CPU: a training step whose F is compiled (or whose whole DEQ layer is) gives the
eager loss and gradients for UPG, NPG and JFB, and the solvers run on a compiled F.

The DEQ libraries that fail under torch.compile trace the solver loop and the custom backward
into one graph; phantomgrad's solvers are plain Python loops around calls of F, so compiling F
(the expensive part) leaves the data-dependent stopping rules in Python, and compiling the whole
layer works through graph breaks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import phantomgrad as pg


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


def test_whole_layer_compiles_with_graph_breaks():
    """torch.compile(DEQ) traces the solver loop too (breaking the graph at its stopping tests);
    the aot_eager backend keeps the test quick while exercising Dynamo and AOTAutograd."""
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
