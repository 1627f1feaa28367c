"""The DEQ transformer (phantomgrad.models.transformer), its sequence dropout, the lm task
and the lm-table command at a tiny budget. Tests that train read a small synthetic text
through data_dir (bible-kjv.txt), so they need no installed corpus."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import phantomgrad as pg
from phantomgrad.cli import main
from phantomgrad.models.transformer import DEQTransformer, TransformerConfig
from phantomgrad.nn.seq_dropout import VariationalSeqDropout
from phantomgrad.train.config import ConfigError, TrainConfig
from phantomgrad.train.lm_task import LMChunks, build_lm_task
from phantomgrad.train.trainer import train

VOCAB = 11


def model(norm: str = "post", backward=None, solver=None, **overrides) -> DEQTransformer:
    cfg = TransformerConfig.named("deq-transformer-tiny", vocab_size=VOCAB, norm=norm, **overrides)
    return DEQTransformer(
        cfg, solver=solver or pg.Anderson(max_iter=30, tol=1e-5), backward=backward or pg.UPG(k=3, damping=0.8)
    )


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A small English-like text (~24k characters) saved as the bible corpus of a data_dir."""
    words = (
        "and the lord said unto moses , let my people go that they may serve me in the wilderness . "
        "in the beginning god created the heaven and the earth ."
    ).split()
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        start = int(torch.randint(0, len(words) - 12, (), generator=gen))
        lines.append(" ".join(words[start : start + 12]))
    d = tmp_path_factory.mktemp("corpus")
    (d / "bible-kjv.txt").write_text("\n".join(lines) + "\n")
    return d


def lm_cfg(text_dir, out_dir, *extra: str) -> TrainConfig:
    base = [
        "task=lm",
        "dataset=bible",
        f"data_dir={text_dir}",
        "model=deq-transformer-tiny",
        "data_options.seq_len=16",
        "data_options.train_tokens=3841",
        "data_options.eval_tokens=513",
        "batch_size=8",
        "epochs=1",
        "lr=0.01",
        "solver_max_iter=8",
        "backward_max_iter=6",
        "k=3",
        "damping=0.8",
        "progress=false",
        "threads=1",
        f"out_dir={out_dir}",
    ]
    return TrainConfig.from_sources(None, base + list(extra))


# ----------------------------------------------------------------------------- the model


def test_the_map_is_exactly_causal():
    torch.manual_seed(0)
    block = model().block
    z, u = torch.randn(2, 10, 32), torch.randn(2, 10, 96)
    z2, u2 = z.clone(), u.clone()
    z2[:, 6:] += torch.randn(2, 4, 32)
    u2[:, 6:] += torch.randn(2, 4, 96)
    out, out2 = block(z, u), block(z2, u2)
    assert torch.equal(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_changing_a_future_token_leaves_past_logits(norm):
    """Exact for the map; through Anderson, whose mixing weights see the whole sequence,
    only up to the solve's residual (here tol 1e-6), so the bound is loose but far below
    what a leaking mask gives (changes of order 0.1)."""
    torch.manual_seed(0)
    m = model(norm, solver=pg.Anderson(max_iter=60, tol=1e-6)).eval()
    x = tokens(2, 12)
    x2 = x.clone()
    x2[:, 8] = (x2[:, 8] + 1) % VOCAB
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(x2)
    assert (a[:, :8] - b[:, :8]).abs().max() < 1e-3
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-2


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_postln_and_preln_solve_to_a_small_residual(norm):
    torch.manual_seed(0)
    m = model(norm, solver=pg.Anderson(max_iter=40, tol=1e-5)).eval()
    with torch.no_grad():
        logits, info = m(tokens(3, 16))
    assert logits.shape == (3, 16, VOCAB)
    assert float(info.rel_residual.max()) < 1e-4, info.summary()


@pytest.mark.parametrize(
    "backward",
    [
        pg.UPG(k=3, damping=0.8),
        pg.NPG(k=3, damping=0.8),
        pg.Implicit(pg.Broyden(max_iter=10, tol=1e-5)),
        pg.JFB(),
        pg.Backprop(),
    ],
    ids=["upg", "npg", "implicit", "jfb", "backprop"],
)
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_gradients_reach_every_parameter(backward, norm):
    torch.manual_seed(0)
    m = model(
        norm, backward=backward, solver=pg.Anderson(max_iter=10, tol=1e-4), dropout=0.1, positions="learned", max_len=16
    )
    m.train()
    x = tokens(2, 8)
    logits, _ = m(x)
    F.cross_entropy(logits.reshape(-1, VOCAB), torch.roll(x, -1, 1).reshape(-1)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"zero or non-finite gradient for {name}"


def test_weight_norm_on_the_maps_of_f_and_tied_output():
    m = model()
    names = dict(m.named_parameters())
    for layer in ("qkv", "out", "ff1", "ff2"):
        assert f"deq.f.{layer}.parametrizations.weight.original0" in names  # the gain g of w = g v / ||v||
    assert not any(n.startswith("decoder") for n in names)  # tied: the embedding is the output layer
    assert model(tie_weights=False).decoder is not None


def test_dropout_masks_are_fixed_through_one_forward_and_redrawn_by_the_next():
    torch.manual_seed(0)
    m = model(dropout=0.3, solver=pg.Anderson(max_iter=60, tol=1e-6), backward=pg.UPG(k=3, damping=0.8)).train()
    seen = []
    m.block.drop_attn.register_forward_hook(lambda mod, inp, out: seen.append(mod.mask))
    out = m.solve(tokens(2, 10))
    m.jacobian_penalty(out)  # the penalty evaluates F with this forward's masks too
    assert len(seen) > 5 and all(mask is seen[0] for mask in seen)
    assert seen[0].shape == (2, 1, 32)
    assert torch.all((seen[0] == 0) | torch.isclose(seen[0], torch.tensor(1 / 0.7)))
    # a map whose masks changed between iterations would have no fixed point to converge to
    assert float(out.info.rel_residual.max()) < 1e-4
    m.solve(tokens(2, 10))
    assert seen[-1] is not seen[0] and not torch.equal(seen[-1], seen[0])
    m.eval()
    seen.clear()
    m.solve(tokens(2, 10))
    assert all(mask is None for mask in seen)  # identity in eval mode


def test_seq_dropout_checks_its_input():
    drop = VariationalSeqDropout(0.5).train()
    with pytest.raises(RuntimeError, match="call reset"):
        drop(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        drop.reset(torch.randn(2, 4))
    drop.reset(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="does not fit"):
        drop(torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VariationalSeqDropout(1.0)


def test_jacobian_penalty_and_radius_at_the_fixed_point():
    torch.manual_seed(0)
    m = model("pre").train()
    out = m.solve(tokens(2, 8))
    penalty = m.jacobian_penalty(out, n_samples=4)
    assert penalty.requires_grad and float(penalty.detach()) > 0
    penalty.backward()
    assert m.block.ff1.parametrizations.weight.original1.grad.abs().sum() > 0
    assert m.embed.weight.grad.abs().sum() > 0  # through the injection
    radius = m.spectral_radius(out, iters=10)
    assert radius.shape == (2,) and bool((radius > 0).all())


def test_bad_configs_name_the_problem():
    with pytest.raises(TypeError, match="unknown TransformerConfig field"):
        TransformerConfig.named("deq-transformer-tiny", vocab_size=5, d_modle=8)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        TransformerConfig.named("deq-transformer-tiny", vocab_size=5, n_heads=3)
    with pytest.raises(ValueError, match="'post'"):
        TransformerConfig.named("deq-transformer-tiny", vocab_size=5, norm="middle")
    m = model(positions="learned", max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        m(tokens(1, 9))


# ----------------------------------------------------------------------------- the lm task


def test_chunks_pair_each_input_with_the_next_token():
    data = LMChunks(torch.arange(21), seq_len=5)
    assert len(data) == 4
    x, y = data[3]
    assert x.tolist() == [15, 16, 17, 18, 19] and y.tolist() == [16, 17, 18, 19, 20]
    with pytest.raises(IndexError):
        data[4]


def test_lm_options_are_checked(text_dir, tmp_path):
    with pytest.raises(ConfigError, match="d_modl"):
        build_lm_task(lm_cfg(text_dir, tmp_path, "arch.d_modl=16"))
    with pytest.raises(ConfigError, match="seq_length"):
        build_lm_task(lm_cfg(text_dir, tmp_path, "data_options.seq_length=16"))
    with pytest.raises(ConfigError, match="is not a DEQ transformer"):
        build_lm_task(lm_cfg(text_dir, tmp_path, "model=mdeq-cifar"))


def test_lm_task_trains_a_tiny_model_for_one_epoch(text_dir, tmp_path):
    summary = train(lm_cfg(text_dir, tmp_path, "backward=upg"))
    m = summary["final_metrics"]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 1
    assert {
        "train_loss",
        "train_ppl",
        "valid_ppl",
        "valid_bpc",
        "test_ppl",
        "test_bpc",
        "train_spectral_radius",
    } <= set(rows[0])
    assert m["valid_ppl"] == pytest.approx(math.exp(m["valid_loss"]))
    assert m["test_bpc"] == pytest.approx(m["test_loss"] / math.log(2))
    assert m["valid_tokens"] == 512  # 32 chunks of 16 tokens from the first 513
    # 30 steps on a repetitive text: far below the uniform log(vocab) ~ 3.3 nats
    assert m["valid_loss"] < 2.6, m


def test_jacobian_penalty_enters_the_loss_and_the_metrics(text_dir, tmp_path):
    cfg = lm_cfg(text_dir, tmp_path, "jac_reg_freq=1.0", "jac_reg_weight=0.5", "backward=implicit")
    task = build_lm_task(cfg)
    task.model.train()
    batch = next(iter(DataLoader(task.train_set, batch_size=4)))
    result = task.step(task.model, batch, torch.device("cpu"), 0)
    ce = float(result.sums["loss"]) / result.count
    penalty = float(result.sums["jac_penalty"])
    assert result.sums["jac_steps"] == 1 and penalty > 0
    assert float(result.loss.detach()) == pytest.approx(ce + 0.5 * penalty, rel=1e-5)

    summary = train(cfg)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    steps = 30
    assert float(rows[0]["train_jac_steps"]) == steps
    assert 0 < float(rows[0]["train_jac_penalty"]) < 10
    assert 0 < float(rows[0]["train_spectral_radius"]) < 10
    assert summary["final_metrics"]["train_jac_penalty"] == pytest.approx(float(rows[0]["train_jac_penalty"]))


def test_pretraining_steps_run_the_unrolled_stack(text_dir, tmp_path, monkeypatch):
    calls = []
    original = pg.Unrolled.solve

    def spy(self, fn, z0, **kwargs):
        calls.append(self.depth)
        return original(self, fn, z0, **kwargs)

    monkeypatch.setattr(pg.Unrolled, "solve", spy)
    summary = train(lm_cfg(text_dir, tmp_path, "pretrain_steps=3", "pretrain_depth=2"))
    assert calls == [2, 2, 2] and math.isfinite(summary["final_metrics"]["valid_loss"])


def test_pretraining_is_the_weight_tied_stack_under_cached_weight_norm():
    model = DEQTransformer(TransformerConfig.named("deq-transformer-tiny", vocab_size=11))
    tokens = torch.randint(0, 11, (2, 5))
    with pg.pretraining(model, 3):
        logits, info = model(tokens)
    assert info.nstep.tolist() == [3, 3] and isinstance(model.deq.solver, pg.Anderson)
    u = model.injection(tokens)
    z = torch.zeros(2, 5, model.config.d_model)
    for _ in range(3):
        z = model.block(z, u)
    torch.testing.assert_close(logits, model.head(z))
    logits.sum().backward()  # the weight-norm parameters (g and v) of F get their gradient through the stack
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.block.parameters())


def test_without_jacobian_regularisation_the_loss_is_the_cross_entropy(text_dir, tmp_path):
    task = build_lm_task(lm_cfg(text_dir, tmp_path))
    task.model.train()
    batch = next(iter(DataLoader(task.train_set, batch_size=4)))
    result = task.step(task.model, batch, torch.device("cpu"), 1)
    assert "jac_penalty" not in result.sums
    assert float(result.loss.detach()) == pytest.approx(float(result.sums["loss"]) / result.count, rel=1e-6)


def test_lm_table_runs_end_to_end_at_a_tiny_budget(text_dir, tmp_path, capsys):
    out = tmp_path / "table"
    code = main(
        [
            "lm-table",
            "--budget",
            "tiny",
            "--data-dir",
            str(text_dir),
            "--out",
            str(out),
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "PreLN + JR + UPG A_{5,0.8}" in printed
    result = json.loads((tmp_path / "t.json").read_text())
    rows = result["rows"]
    assert [r["row"] for r in rows] == [
        "PostLN + Implicit",
        "PostLN + UPG A_{5,0.8}",
        "PreLN + JR + Implicit",
        "PreLN + JR + UPG A_{5,0.8}",
    ]
    for r in rows:
        assert math.isfinite(r["valid_ppl"]) and math.isfinite(r["test_bpc"]) and r["steps"] == 4
        assert r["seconds_per_step"] > 0
    assert rows[0]["time_vs_implicit"] == 1.0 and rows[2]["time_vs_implicit"] == 1.0
    assert rows[2]["jac_penalty"] > 0 and rows[0]["jac_penalty"] is None
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 rows
    assert (
        main(["lm-table", "--budget", "tiny", "--data-dir", str(text_dir), "--out", str(out)]) == 2
    )  # never overwrites
    assert "already hold runs" in capsys.readouterr().err
    # the causal re-evaluation reloads the four checkpoints and evaluates them with fixed-point iteration
    assert (
        main(["lm-table", "--budget", "tiny", "--out", str(out), "--recheck", "--json", str(tmp_path / "r.json")]) == 0
    )
    recheck = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(recheck) == 4 and all(math.isfinite(r["test_ppl"]) and r["test_nstep"] > 6 for r in recheck)
    assert (out / "recheck.md").exists()
