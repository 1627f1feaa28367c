"""Gradient-quality monitor: the measurement itself (float64, a contractive DEQ), that it leaves
training untouched, and the trainer callback (rescaling, metrics, trace)."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import phantomgrad as pg
from conftest import TanhLayer, tiny_overrides
from phantomgrad.monitor import capture_rng_state, gradient_quality
from phantomgrad.train.config import TrainConfig
from phantomgrad.train.context import RunContext
from phantomgrad.train.distributed import DistInfo
from phantomgrad.train.monitor_callback import GradientMonitor
from phantomgrad.train.trainer import train

D = torch.float64
TINY = tiny_overrides(backward_max_iter=5)


class Classifier(nn.Module):
    """stem (Linear + BatchNorm) -> dropout -> DEQ(tanh(W z + U u + b)) -> head: a model with a random
    forward (dropout) and buffers (BatchNorm), in float64."""

    def __init__(self, backward: pg.BackwardMode, dropout: float = 0.3, lipschitz: float = 0.8):
        super().__init__()
        self.stem = nn.Linear(5, 4, dtype=D)
        self.norm = nn.BatchNorm1d(4, dtype=D)
        self.deq = pg.DEQ(
            TanhLayer(dim=6, in_dim=4, lipschitz=lipschitz),
            solver=pg.Anderson(max_iter=80, tol=1e-11),
            backward=backward,
        )
        self.head = nn.Linear(6, 3, dtype=D)
        self.dropout = dropout

    def forward(self, x):
        u = F.dropout(self.norm(self.stem(x)), self.dropout, self.training)
        z, _ = self.deq(u, torch.zeros(x.shape[0], 6, dtype=D))
        return self.head(z)


def exact() -> pg.Implicit:
    return pg.Implicit(pg.Broyden(max_iter=60, tol=1e-11))


def _setup(backward: pg.BackwardMode, dropout: float = 0.3):
    model = Classifier(backward, dropout)
    x, y = torch.randn(16, 5, dtype=D), torch.randint(0, 3, (16,))
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    state = capture_rng_state()
    loss_fn().backward()
    return model, loss_fn, state


def test_cosine_is_one_when_the_training_mode_is_the_reference():
    model, loss_fn, state = _setup(exact())
    q = gradient_quality(model, loss_fn, exact(), rng_state=state)
    assert q.cosine == pytest.approx(1.0, abs=1e-6) and q.norm_ratio == pytest.approx(1.0, abs=1e-6)
    assert q.cosine_deq == pytest.approx(1.0, abs=1e-6) and q.norm_ratio_deq == pytest.approx(1.0, abs=1e-6)
    assert q.reference_converged == 1.0


def test_dropout_masks_are_replayed():
    """Without the RNG state of the training forward the masks differ and so does the gradient."""
    model, loss_fn, _ = _setup(exact())
    q = gradient_quality(model, loss_fn, exact())
    assert q.cosine < 0.999


def test_one_step_gradient_differs_and_long_unrolling_converges():
    model, loss_fn, state = _setup(pg.JFB())
    q = gradient_quality(model, loss_fn, exact(), rng_state=state)
    assert 0.3 < q.cosine_deq < 0.999 and abs(q.norm_ratio_deq - 1) > 1e-3
    model, loss_fn, state = _setup(pg.UPG(k=80, damping=1.0))  # Theorem 2: A_{k,1} -> (I - J)^{-1}
    q = gradient_quality(model, loss_fn, exact(), rng_state=state)
    assert q.cosine_deq == pytest.approx(1.0, abs=1e-6) and q.norm_ratio_deq == pytest.approx(1.0, abs=1e-5)


def test_spectral_radius_is_bounded_by_the_lipschitz_constant():
    model, loss_fn, state = _setup(pg.JFB())
    q = gradient_quality(model, loss_fn, exact(), rng_state=state, radius_iters=30)
    assert 0.05 < q.spectral_radius <= 0.8 + 1e-9  # |tanh'| <= 1 and ||W||_2 = 0.8
    assert gradient_quality(model, loss_fn, exact(), rng_state=state, radius_iters=0).spectral_radius is None


def _snapshot(model):
    return (
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [b.clone() for b in model.buffers()],
        torch.get_rng_state().clone(),
    )


def _assert_unchanged(model, snap, mode):
    grads, buffers, rng = snap
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
    assert model.deq.backward_mode is mode


def test_monitoring_changes_nothing():
    mode = pg.UPG(k=3, damping=0.5)
    model, loss_fn, state = _setup(mode)
    snap = _snapshot(model)
    gradient_quality(model, loss_fn, exact(), rng_state=state)
    _assert_unchanged(model, snap, mode)


def test_backward_modes_and_state_are_restored_after_an_error():
    mode = pg.NPG(k=3, damping=0.5)
    model, loss_fn, state = _setup(mode)
    snap = _snapshot(model)

    def failing():
        loss_fn()  # a forward in training mode: BatchNorm statistics move, dropout draws
        assert isinstance(model.deq.backward_mode, pg.BackwardMode) and model.deq.backward_mode is not mode
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gradient_quality(model, failing, exact(), rng_state=state)
    _assert_unchanged(model, snap, mode)


def test_without_a_phantom_gradient_it_says_what_to_do():
    model = Classifier(pg.JFB())
    with pytest.raises(ValueError, match=r"loss.backward\(\)"):
        gradient_quality(model, lambda: model(torch.randn(4, 5, dtype=D)).sum())


# ---- the callback -----------------------------------------------------------------------------


def _context(model, loss_fn, tmp_path):
    """The context a trainer hands its callbacks, for a model trained by hand."""
    return RunContext(
        tmp_path,
        model,
        torch.device("cpu"),
        SimpleNamespace(pretrain_steps=0),
        DistInfo(),
        resume=False,
        recompute_loss=lambda batch: loss_fn(),
    )


def test_rescaling_multiplies_the_deq_gradient_by_the_inverse_norm_ratio(tmp_path):
    model = Classifier(pg.JFB(), dropout=0.0)
    x, y = torch.randn(16, 5, dtype=D), torch.randint(0, 3, (16,))
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    monitor = GradientMonitor(every=2, rescale=True, reference=exact(), scale_range=(0.25, 4.0))
    ctx = _context(model, loss_fn, tmp_path)
    monitor.bind(model)
    f_params = list(model.deq.parameters())
    others = [p for p in model.parameters() if all(p is not q for q in f_params)]

    for step in (2, 3):  # a measured step, then one in between: both rescaled by the same factor
        ctx.step = step
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        before_f = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in f_params))
        before_rest = [p.grad.clone() for p in others]
        monitor.after_backward(ctx, None, SimpleNamespace(info=None))
        after_f = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in f_params))
        ratio = monitor.trace[0]["norm_ratio_deq"]
        assert 0.25 < 1 / ratio < 4 and abs(1 / ratio - 1) > 0.01  # JFB is shorter or longer, not equal
        assert after_f == pytest.approx(before_f / ratio, rel=1e-9)
        assert all(torch.equal(a, p.grad) for a, p in zip(before_rest, others))  # scope "deq": head and stem untouched
    assert len(monitor.trace) == 1


def test_one_outlier_moves_the_scale_by_at_most_the_clip(tmp_path, monkeypatch):
    """At initialisation the norm ratio can be 0.05 (the exact solve diverges); it must not hold the
    scale at its bound for long: each measurement is clipped before it enters the moving average."""
    import phantomgrad.train.monitor_callback as mc
    from phantomgrad.monitor import GradientQuality

    ratios = iter([0.05, 0.8, 0.8, 0.8])
    monkeypatch.setattr(
        mc,
        "gradient_quality",
        lambda *a, **k: GradientQuality(0.9, 0.5, 0.9, next(ratios), 1.0, 2.0, None, None, None, 0.0),
    )
    monitor = GradientMonitor(every=1, rescale=True, scale_range=(0.5, 3.0), scale_ema=0.5)
    ctx = _context(Classifier(pg.JFB(), dropout=0.0), lambda: torch.zeros(()), tmp_path)
    scales = []
    for _ in range(4):
        monitor._measure(ctx, None, SimpleNamespace(info=None))
        scales.append(monitor.scale)
    expected, log_s = [], None
    for target in (math.log(3.0), -math.log(0.8), -math.log(0.8), -math.log(0.8)):
        log_s = target if log_s is None else 0.5 * log_s + 0.5 * target
        expected.append(math.exp(log_s))
    assert scales == pytest.approx(expected)
    assert scales[0] == pytest.approx(3.0) and scales[-1] < 1.5


def test_rescaling_is_clipped(tmp_path):
    model = Classifier(pg.JFB(), dropout=0.0)
    x, y = torch.randn(16, 5, dtype=D), torch.randint(0, 3, (16,))
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    loss_fn().backward()
    q = gradient_quality(model, loss_fn, exact())
    bound = 1 + abs(1 / q.norm_ratio_deq - 1) / 2  # tighter than the measured factor
    monitor = GradientMonitor(every=1, rescale=True, reference=exact(), scale_range=(1 / bound, bound))
    monitor.bind(model)
    model.zero_grad()
    loss_fn().backward()  # the hook keeps the RNG state of this forward
    monitor.after_backward(_context(model, loss_fn, tmp_path), None, SimpleNamespace(info=None))
    assert monitor.scale == pytest.approx(bound if q.norm_ratio_deq < 1 else 1 / bound)


def test_monitor_arguments_are_checked():
    with pytest.raises(ValueError, match="every"):
        GradientMonitor(every=0)
    with pytest.raises(ValueError, match="scope"):
        GradientMonitor(scope="head")
    with pytest.raises(ValueError, match="scale_range"):
        GradientMonitor(scale_range=(2.0, 3.0))


def test_trainer_monitor_with_implicit_training_measures_cosine_one_and_changes_nothing(tmp_path):
    """backward=implicit with the monitor's reference equal to it: cosine 1 on every measured step, with
    dropout (the masks are replayed); and the trained weights equal those of an unmonitored run."""
    common = TINY + ["epochs=1", "backward=implicit", "dropout=0.2"]
    monitored = train(TrainConfig.from_sources(None, common + ["monitor_every=1", f"out_dir={tmp_path / 'a'}"]))
    plain = train(TrainConfig.from_sources(None, common + [f"out_dir={tmp_path / 'b'}"]))
    trace = list(csv.DictReader((tmp_path / "a" / "gradient_quality.csv").open()))
    assert [int(r["step"]) for r in trace] == [0, 1, 2]
    assert all(float(r["cosine"]) == pytest.approx(1.0, abs=1e-6) for r in trace)
    assert all(float(r["norm_ratio"]) == pytest.approx(1.0, abs=1e-6) for r in trace)
    row = next(csv.DictReader((tmp_path / "a" / "metrics.csv").open()))
    assert float(row["grad_cosine"]) == pytest.approx(1.0, abs=1e-6) and 0 < float(row["monitor_share"]) < 1
    assert (tmp_path / "a" / "gradient_quality.png").exists()
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert monitored["final_metrics"]["test_accuracy"] == plain["final_metrics"]["test_accuracy"]
