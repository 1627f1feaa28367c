"""pg.swap / pg.pretraining: one mechanism that swaps the solve and the gradient of every DEQ layer."""

import pytest
import torch
from torch import nn

import phantomgrad as pg
from phantomgrad.models.toy import TanhMap


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = pg.DEQ(TanhMap(5, 3, 0.6), solver=pg.Anderson(max_iter=40, tol=1e-10), backward=pg.UPG(3, 0.5))
        self.second = pg.DEQ(TanhMap(5, 5, 0.6), solver=pg.FixedPoint(max_iter=60, tol=1e-10), backward=pg.NPG(3))

    def forward(self, x):
        z, _ = self.first(x, x.new_zeros(x.shape[0], 5))
        z, info = self.second(z, z.new_zeros(z.shape[0], 5))
        return z, info


def test_pretraining_gradient_is_backprop_through_the_weight_tied_stack():
    model = TwoLayers()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pg.pretraining(model, 4):
        z, info = model(x)
    z.pow(2).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    assert info.nstep.tolist() == [4] * 4

    # independent: autograd through both stacks written out by hand
    model.zero_grad()
    h = x.new_zeros(4, 5)
    for _ in range(4):
        h = model.first.f(h, x)
    g = h.new_zeros(4, 5)
    for _ in range(4):
        g = model.second.f(g, h)
    torch.testing.assert_close(z, g, rtol=0, atol=0)
    g.pow(2).sum().backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-14)


def test_swap_restores_every_layer_also_on_error():
    model = TwoLayers()
    own = [(m.solver, m.backward_mode) for m in pg.deq_layers(model)]
    exact = pg.Implicit()
    with pytest.raises(RuntimeError, match="inside"):
        with pg.swap(model, backward=exact) as layers:
            assert [m.backward_mode for m in layers] == [exact, exact]
            assert [m.solver for m in layers] == [s for s, _ in own]  # solver=None keeps each layer's own
            raise RuntimeError("inside")
    assert [(m.solver, m.backward_mode) for m in pg.deq_layers(model)] == own


def test_swap_refuses_bad_arguments():
    with pytest.raises(TypeError, match="solver"):
        with pg.swap(TwoLayers(), solver="unrolled"):
            pass
    with pytest.raises(TypeError, match="backward"):
        with pg.swap(TwoLayers(), backward=pg.Anderson()):
            pass
    with pytest.raises(ValueError, match="no phantomgrad.DEQ"):
        with pg.swap(nn.Linear(2, 2), backward=pg.JFB()):
            pass
