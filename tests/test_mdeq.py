"""MDEQ (phantomgrad.models.mdeq) and variational dropout (phantomgrad.nn.dropout)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import phantomgrad as pg
from phantomgrad.models.mdeq import MDEQ, MDEQBlock, MDEQConfig
from phantomgrad.nn.dropout import VariationalDropout2d


def tiny(image_size: int = 8, in_channels: int = 1, **overrides) -> MDEQConfig:
    return MDEQConfig.named("mdeq-tiny", in_channels=in_channels, image_size=image_size, num_classes=10, **overrides)


def images(cfg: MDEQConfig, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, cfg.in_channels, *cfg.image_size)


def small_model(cfg: MDEQConfig, backward=None, max_iter: int = 6) -> MDEQ:
    return MDEQ(cfg, solver=pg.Anderson(max_iter=max_iter, tol=1e-4), backward=backward or pg.UPG(k=2, damping=0.5))


# ----------------------------------------------------------------------------- shapes and configs


@pytest.mark.parametrize(
    "in_channels, size, sizes", [(1, 8, [(8, 8), (4, 4)]), (1, 28, [(28, 28), (14, 14)]), (3, 7, [(7, 7), (4, 4)])]
)
def test_output_shapes_and_branch_resolutions(in_channels, size, sizes):
    cfg = tiny(size, in_channels)
    assert cfg.branch_sizes() == sizes
    model = small_model(cfg)
    x = images(cfg, batch=3)
    logits, info = model(x)
    assert logits.shape == (3, 10)
    assert info.rel_residual.shape == info.nstep.shape == info.converged.shape == (3,)
    u, z0 = model.prepare(x)
    z = model.block(z0, u)
    assert [tuple(p.shape) for p in z] == [(3, 24, h, w) for h, w in sizes]
    assert u[0].shape == (3, 24, *sizes[0]) and u[1] is None  # only the highest resolution is injected


def test_mdeq_tiny_has_about_170k_parameters_on_cifar():
    model = MDEQ(MDEQConfig.named("mdeq-tiny", in_channels=3, image_size=32, num_classes=10))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 170_000) / 170_000 < 0.15, n


def test_state_dict_holds_f_once():
    keys = MDEQ(tiny()).state_dict().keys()
    assert any(k.startswith("deq.f.") for k in keys)
    assert not any(k.startswith("block.") for k in keys)


def test_weight_norm_uses_torch_parametrization():
    block = MDEQ(tiny()).block
    conv = block.branches[0].conv1
    assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    torch.testing.assert_close(conv.weight, g * v / v.flatten(1).norm(dim=1)[:, None, None, None])


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown MDEQ config"):
        MDEQConfig.named("mdeq-huge")
    with pytest.raises(TypeError, match="unknown MDEQConfig field"):
        MDEQConfig.named("mdeq-tiny", dropuot=0.1)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        MDEQConfig.named("mdeq-tiny", channels=(20, 24))
    with pytest.raises(ValueError, match="one entry per branch"):
        MDEQConfig.named("mdeq-tiny", head_channels=(8,))
    with pytest.raises(ValueError, match="dropout"):
        MDEQConfig.named("mdeq-tiny", dropout=1.0)
    model = MDEQ(tiny(8, 1))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))


# ----------------------------------------------------------------------------- variational dropout


def test_variational_dropout_unit():
    drop = VariationalDropout2d(0.5)
    x = torch.ones(4, 16, 3, 3)
    with pytest.raises(RuntimeError, match="reset"):
        drop(x)
    mask = drop.reset(x)
    assert mask.shape == (4, 16, 1, 1)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}  # scaled by 1 / (1 - p)
    out = drop(x)
    assert torch.equal(out, x * mask) and torch.equal(drop(x), out)  # the same mask until the next reset
    assert (out == 0).any() and (out == 2).any()
    with pytest.raises(RuntimeError, match="does not fit"):
        drop(torch.ones(5, 16, 3, 3))
    drop.eval()
    assert drop(x) is x and drop.reset(x) is None and drop.mask is None
    assert VariationalDropout2d(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VariationalDropout2d(1.0)


def _record_masks(model: MDEQ) -> list[list[torch.Tensor | None]]:
    """Per branch, the mask each evaluation of F used (None where dropout was a no-op)."""
    seen: list[list[torch.Tensor | None]] = [[] for _ in model.block.branches]
    for i, branch in enumerate(model.block.branches):

        def hook(module, inputs, output, i=i):
            if module.active:
                assert torch.equal(output, inputs[0] * module.mask)
                seen[i].append(module.mask.clone())
            else:
                assert output is inputs[0]
                seen[i].append(None)

        branch.drop.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("backward", [pg.UPG(k=3, damping=0.5), pg.NPG(k=3, damping=0.5), pg.Implicit()], ids=repr)
def test_one_dropout_mask_per_forward_redrawn_between_forwards(backward):
    model = small_model(tiny(dropout=0.5), backward=backward, max_iter=5)
    seen = _record_masks(model)
    x, y = images(model.config), torch.tensor([1, 2])

    F.cross_entropy(model(x)[0], y).backward()  # solver steps and the backward mode's evaluations
    first = [list(s) for s in seen]
    for masks in first:
        assert len(masks) >= 5  # F was evaluated many times ...
        assert all(torch.equal(m, masks[0]) for m in masks)  # ... always with one mask

    for s in seen:
        s.clear()
    F.cross_entropy(model(x)[0], y).backward()
    for before, after in zip(first, seen):
        assert all(torch.equal(m, after[0]) for m in after)
        assert not torch.equal(before[0], after[0])  # redrawn (2 x 24 channels at p = 0.5)


def test_no_dropout_in_eval_and_no_graph_under_no_grad():
    model = small_model(tiny(dropout=0.5))
    seen = _record_masks(model)
    model.eval()
    with torch.no_grad():
        logits, _ = model(images(model.config))
    assert not logits.requires_grad
    assert all(m is None for masks in seen for m in masks) and all(seen)
    assert all(branch.drop.mask is None for branch in model.block.branches)


def test_mdeq_block_with_dropout_needs_a_reset():
    block = MDEQBlock((8, 8), num_groups=4, dropout=0.3)
    z = (torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 2, 2))
    with pytest.raises(RuntimeError, match="reset"):
        block(z, (torch.randn(2, 8, 4, 4), None))
    block.reset_dropout(z)
    out = block(z, (torch.randn(2, 8, 4, 4), None))
    assert [o.shape for o in out] == [p.shape for p in z]


# ----------------------------------------------------------------------------- gradients and the solve


@pytest.mark.parametrize("backward", [pg.UPG(k=5, damping=0.5), pg.NPG(k=5, damping=0.5), pg.Implicit()], ids=repr)
def test_gradients_reach_every_parameter(backward):
    model = small_model(tiny(dropout=0.2), backward=backward, max_iter=8)
    logits, _ = model(images(model.config, batch=3))
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_single_branch_mdeq_converges_untrained():
    cfg = tiny(16, channels=(24,), head_channels=(8,))
    model = MDEQ(cfg, solver=pg.Anderson(max_iter=40, tol=1e-4))
    with torch.no_grad():
        _, info = model(images(cfg, batch=4))
    assert info.rel_residual.max() < 5e-2, info.summary()


def test_forward_solve_of_untrained_mdeq_tiny_makes_progress():
    """With two branches the untrained map is far from a contraction (the cross-resolution
    fusion; the reference MDEQ is the same), so the solve stalls near a relative residual
    of 0.1 instead of converging; it must still cut the residual from 1 at z0 = 0."""
    cfg = tiny(16, dropout=0.25)
    model = MDEQ(cfg, solver=pg.Anderson(max_iter=40, tol=1e-4, trace=True))
    with torch.no_grad():
        _, info = model(images(cfg, batch=4))
    assert torch.isfinite(info.rel_residual).all() and not info.nonfinite.any()
    assert float(info.trace[0].mean()) == pytest.approx(1.0)
    assert info.rel_residual.max() < 0.3 and info.rel_residual.mean() < 0.2, info.summary()


def test_pretraining_is_the_weight_tied_stack():
    model = small_model(tiny(dropout=0.3))
    seen = _record_masks(model)
    x, y = images(model.config), torch.tensor([3, 4])
    solver, mode = model.deq.solver, model.deq.backward_mode

    with pg.pretraining(model, 3):  # pg.Unrolled(3) with pg.Backprop(), then the layer's own back
        logits, info = model(x)
    assert model.deq.solver is solver and model.deq.backward_mode is mode
    assert info.nstep.tolist() == [3, 3] and info.abs_residual.shape == (2,)
    assert all(len(m) == 3 and all(torch.equal(a, m[0]) for a in m) for m in seen)  # one mask for all layers

    # the same computation by hand (the masks of that forward are still in place)
    u = model.stem(x)
    z = tuple(torch.zeros(2, 24, h, w) for h, w in model.config.branch_sizes())
    for _ in range(3):
        prev, z = z, model.block(z, u)
    torch.testing.assert_close(logits, model.head(z))
    flat = torch.cat([p.flatten(1) for p in z], 1) - torch.cat([p.flatten(1) for p in prev], 1)
    torch.testing.assert_close(info.abs_residual, flat.norm(dim=1).double(), rtol=1e-5, atol=1e-6)  # last layer's input

    F.cross_entropy(logits, y).backward()  # plain backprop through the stack reaches everything
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="depth"):
        pg.pretraining(model, 0)


# ----------------------------------------------------------------------------- every preset trains


@pytest.mark.parametrize(
    "name, in_channels, size, classes",
    [("mdeq-tiny", 3, 32, 10), ("mdeq-tiny", 1, 28, 10), ("mdeq-cifar", 3, 32, 10), ("mdeq-imagenet", 3, 64, 1000)],
)
def test_each_named_config_takes_a_training_step(name, in_channels, size, classes):
    cfg = MDEQConfig.named(name, in_channels=in_channels, image_size=size, num_classes=classes)
    model = MDEQ(cfg, solver=pg.Anderson(max_iter=3, tol=1e-4), backward=pg.UPG(k=2, damping=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    logits, info = model(images(cfg, batch=2))
    loss = F.cross_entropy(logits, torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    assert logits.shape == (2, classes) and torch.isfinite(loss)
    assert int(info.nstep.max()) <= 3
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed), f"{changed.count(False)} parameters did not move"


def test_presets_are_plain_data():
    cfg = MDEQConfig.named("mdeq-cifar", dropout=0.25)
    assert cfg.num_branches == 4 and cfg.dropout == 0.25
    assert dataclasses.replace(cfg, dropout=0.0) == MDEQConfig.named("mdeq-cifar")
    assert MDEQConfig.named("mdeq-imagenet", image_size=224).branch_sizes()[0] == (56, 56)
