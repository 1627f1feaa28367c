"""Learned initial states: pg.DEQ(f, init=g) starts the solve at g(x), and info.init_loss trains g only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import phantomgrad as pg
from conftest import TupleLayer, forward_solver
from phantomgrad.models.toy import TanhMap

DIM, IN, B = 6, 4, 5


def _layer_and_init(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f = TanhMap(dim=DIM, in_dim=IN, lipschitz=0.6, generator=gen).double()
    g = nn.Linear(IN, DIM).double()
    x = torch.randn(B, IN, dtype=torch.float64, generator=gen)
    return f, g, x


def _start_of(layer, x, *z0):
    """With one evaluation of F the solver returns its start (the one iterate whose residual it
    knows) and that start's residual ||F(z0) - z0||."""
    with torch.no_grad():
        z, info = layer(x, *z0)
    return z, info.abs_residual


def test_the_solve_starts_at_g_of_x():
    f, g, x = _layer_and_init()
    one_step = pg.DEQ(f, solver=pg.FixedPoint(max_iter=1, tol=1e-12), init=g, warn_not_converged=False)
    with torch.no_grad():
        start = g(x)
        z, residual = _start_of(one_step, x)
        assert torch.equal(z, start)
        assert torch.allclose(residual, (f(start, x) - start).norm(dim=1), rtol=1e-12)
        given = torch.full((B, DIM), 0.3, dtype=torch.float64)
        z, residual = _start_of(one_step, x, given)
        assert torch.equal(z, given)  # a given z0 wins over init
        assert torch.allclose(residual, (f(given, x) - given).norm(dim=1), rtol=1e-12)


def test_init_loss_is_the_relative_distance_to_z_star_and_reaches_g_only():
    f, g, x = _layer_and_init()
    x.requires_grad_(True)
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=60, tol=1e-12), backward=pg.UPG(5, 0.5), init=g)
    _, info = deq(x)
    z_star = info.fixed_point
    assert torch.allclose(z_star, f(z_star, x).detach(), atol=1e-10)
    with torch.no_grad():
        guess = g(x)
        expected = ((guess - z_star).pow(2).sum(1) / z_star.pow(2).sum(1)).mean()
    assert torch.allclose(info.init_loss, expected, rtol=1e-12, atol=0)
    info.init_loss.backward()
    assert all(p.grad is None for p in f.parameters())
    assert x.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())
    # the gradient is the float64 derivative of the formula (z* a constant)
    g2 = nn.Linear(IN, DIM).double()
    g2.load_state_dict(g.state_dict())
    d = g2(x.detach())
    ((d - z_star).pow(2).sum(1) / z_star.pow(2).sum(1)).mean().backward()
    assert torch.allclose(g.weight.grad, g2.weight.grad, rtol=1e-10, atol=1e-14)


EVERY_MODE = [cls() for cls in pg.BACKWARD_MODES.values()]


@pytest.mark.parametrize("mode", EVERY_MODE, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_mode_gives_the_gradient_of_the_same_start_given_by_hand(mode, train):
    f, g, x = _layer_and_init(1)
    solver = forward_solver(mode, max_iter=40, tol=1e-10)
    with_init = pg.DEQ(f, solver=solver, backward=mode, init=g).train(train)
    by_hand = pg.DEQ(f, solver=solver, backward=mode).train(train)

    def grads(layer, *z0):
        for p in list(f.parameters()) + list(g.parameters()):
            p.grad = None
        z, info = layer(x, *z0)
        z.pow(2).sum().backward()
        return z.detach(), [p.grad.clone() for p in f.parameters()], info

    z_a, grads_a, info_a = grads(with_init)
    assert all(p.grad is None for p in g.parameters())  # the task's loss never reaches g
    z_b, grads_b, _ = grads(by_hand, g(x).detach())
    assert torch.equal(z_a, z_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    for p in f.parameters():
        p.grad = None
    info_a.init_loss.backward()
    assert all(p.grad is None for p in f.parameters())
    assert all(p.grad is not None for p in g.parameters())


def test_tuple_states():
    torch.manual_seed(0)
    f = TupleLayer()

    class TupleInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4).double(), nn.Linear(4, 3).double()

        def forward(self, x):
            return self.a(x), self.b(x)

    g = TupleInit()
    x = torch.randn(B, 4, dtype=torch.float64)
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=60, tol=1e-12), init=g)
    (a, b), info = deq(x)
    za, zb = info.fixed_point
    assert za.shape == (B, 4) and zb.shape == (B, 3)
    with torch.no_grad():
        ga, gb = g(x)
        num = (ga - za).pow(2).sum(1) + (gb - zb).pow(2).sum(1)
        expected = (num / (za.pow(2).sum(1) + zb.pow(2).sum(1))).mean()
    assert torch.allclose(info.init_loss, expected, rtol=1e-12, atol=0)
    info.init_loss.backward()
    assert all(p.grad is None for p in f.parameters()) and g.a.weight.grad is not None
    with pytest.raises(ValueError, match=r"init\(x\) has structure"):
        pg.DEQ(f, init=lambda x: g(x)[0])(x, (torch.zeros(B, 4).double(), torch.zeros(B, 3).double()))


def test_a_start_provider_gets_g_of_x_and_no_init_means_z0_is_required():
    f, g, x = _layer_and_init()
    seen = []

    def provider(default):
        seen.append(default)
        return default * 0

    deq = pg.DEQ(f, solver=pg.FixedPoint(max_iter=1, tol=1e-12), init=g, warn_not_converged=False)
    z, _ = _start_of(deq, x, provider)
    with torch.no_grad():
        assert torch.equal(seen[0], g(x)) and not seen[0].requires_grad
    assert torch.equal(z, torch.zeros(B, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="no starting state.*init=g"):
        pg.DEQ(f)(x)
    with pytest.raises(TypeError, match="init must be a module or callable"):
        pg.DEQ(f, init=3)


def test_sync_free_layer_with_init_compiles_as_one_graph():
    f, g, x = _layer_and_init()
    f, g, x = f.float(), g.float(), x.float()
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=20, tol=1e-6, check_every=None), init=g)
    z_e, info_e = deq(x)
    torch._dynamo.reset()
    z_c, info_c = torch.compile(deq, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(z_e, z_c, atol=1e-5)
    assert torch.allclose(info_e.init_loss, info_c.init_loss, atol=1e-5)


# ---- the models: a given z0, and an init head as an option ------------------------------------------


def _tiny_mdeq(**overrides):
    from phantomgrad.models.mdeq import MDEQ, MDEQConfig

    torch.manual_seed(0)
    cfg = MDEQConfig.named("mdeq-tiny", in_channels=1, image_size=8, num_classes=10, **overrides)
    return MDEQ(cfg, solver=pg.Anderson(max_iter=6, tol=1e-3), backward=pg.UPG(3, 0.5))


def test_mdeq_starts_from_a_given_z0_or_its_init_head():
    model = _tiny_mdeq(init_head=True)
    model.deq.warn_not_converged = False
    x = torch.randn(4, 1, 8, 8)
    logits, info = model(x)
    assert info.init_loss is not None and info.init_loss.ndim == 0
    z_star = info.fixed_point
    c0, c1 = model.config.channels
    assert [tuple(z.shape) for z in z_star] == [(4, c0, 8, 8), (4, c1, 4, 4)]
    model.zero_grad()
    info.init_loss.backward()
    head = {id(p) for p in model.deq.init.parameters()}
    assert all((p.grad is not None) == (id(p) in head) for p in model.parameters())
    with torch.no_grad():  # a given z0 (here: the fixed point itself) wins over the head: no step is needed
        model.deq.solver = pg.Anderson(max_iter=6, tol=1.0)
        _, again = model(x, z0=z_star)
    assert int(again.nstep.max()) == 1
    plain = _tiny_mdeq()
    assert plain.deq.init is None
    _, info = plain(x)
    assert info.init_loss is None


def test_transformer_and_ignn_take_a_z0():
    from phantomgrad.models.ignn import IGNN
    from phantomgrad.models.transformer import DEQTransformer, TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig.named("deq-transformer-tiny", vocab_size=11, init_head=True)
    lm = DEQTransformer(cfg, solver=pg.Anderson(max_iter=30, tol=1e-4)).eval()
    tokens = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        out = lm(tokens, return_state=True)
        assert out.info.init_loss is not None
        z_star = out.info.fixed_point
        _, again = lm(tokens, z0=z_star)
        _, from_zero = lm(tokens, z0=torch.zeros_like(z_star))
    assert again.nstep.float().mean() < from_zero.nstep.float().mean()
    graph = IGNN(3, 2, 8, level="node", rho=1.0, solver=pg.FixedPoint(max_iter=300, tol=1e-8))
    x, adj = torch.randn(4, 3), torch.eye(4) * 0.5
    with torch.no_grad():
        _, first = graph(x, adj)
        _, second = graph(x, adj, z0=first.fixed_point)
    assert int(second.nstep.max()) < int(first.nstep.max())
