"""`phantomgrad bench` end to end at a tiny budget, and its F-evaluation counts. No timing assertions."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from phantomgrad.cli import main
from phantomgrad.experiments.bench import (
    MODES,
    TORCHDEQ_INSTALL,
    BenchConfig,
    Runner,
    build_problem,
    measure_memory,
    solver_names,
    variant,
)
from phantomgrad.experiments.bench.measure import variants_of

TINY_SYNTHETIC = ["bench", "--model", "synthetic", "--dim", "8", "--batch", "4", "--repeats", "1", "--warmup", "0"]


def _runner(**kw) -> tuple[BenchConfig, Runner]:
    cfg = BenchConfig(**kw)
    return cfg, Runner(cfg, build_problem(cfg))


def test_bench_command_writes_tables_plot_and_json(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        TINY_SYNTHETIC
        + [
            "--solver-iter",
            "6",
            "--sweep-k",
            "1..2",
            "--sweep-K",
            "2,3",
            "--no-memory",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    assert code == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res) >= {
        "config",
        "machine",
        "floors",
        "rows",
        "solvers",
        "sweep_k",
        "sweep_K",
        "reference",
        "targets",
        "seconds",
    }
    assert [r["mode"] for r in res["rows"]] == list(MODES)
    for r in res["rows"]:
        for key in (
            "forward_ms",
            "deq_forward_ms",
            "backward_ms",
            "deq_backward_ms",
            "step_ms",
            "f_forward",
            "vjp_backward",
            "f_backward_calls",
            "cosine",
            "floor_ms",
        ):
            assert key in r, key
        assert r["step_ms"] > 0 and r["step_ms"] >= r["forward_ms"]
        assert -1.0 <= r["cosine"] <= 1.0 + 1e-9
    implicit = next(r for r in res["rows"] if r["mode"] == "implicit-broyden")
    assert implicit["cosine"] > 0.999  # the same gradient as the tightly solved reference
    assert {s["solver"] for s in res["solvers"]} == set(solver_names())  # every registered solver that iterates
    assert [(r["mode"], r["k"]) for r in res["sweep_k"]] == [("upg", 1), ("npg", 1), ("upg", 2), ("npg", 2)]
    assert len(res["sweep_K"]) == 6
    assert set(res["floors"]) >= {"f_ms", "vjp_state_ms", "vjp_full_ms"}
    assert all({"target", "value", "limit", "met"} <= set(t) for t in res["targets"])
    assert (out / "bench.png").stat().st_size > 1000
    assert "| mode | lib |" in (out / "bench.md").read_text()
    assert "UPG A_{5,0.5}" in capsys.readouterr().out
    # the tables and the plot come back from the JSON alone
    assert main(["bench", "--render", str(tmp_path / "b.json"), "--out", str(tmp_path / "again")]) == 0
    assert "| mode | lib |" in capsys.readouterr().out
    assert (tmp_path / "again" / "bench.png").exists()
    # the GPU script's summary page reads the same JSON (a missing run is noted, not fatal)
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_summary.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "s.md"), str(tmp_path / "b.json"), str(tmp_path / "absent.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "s.md").read_text()
    assert "| b | synthetic b4 | UPG A_{5,0.5} |" in page and "| absent | missing" in page and "## b" in page


def test_f_evaluation_counts_per_mode():
    # FixedPoint with an unreachable tolerance runs exactly K steps forward and backward.
    K, k = 6, 3
    cfg, runner = _runner(
        model="synthetic",
        dim=8,
        batch=4,
        solver="fixed_point",
        solver_iter=K,
        solver_tol=1e-30,
        k=k,
        backward_iter=5,
        backward_tol=1e-30,
    )
    counts = {m: runner.count(variant(cfg, m)) for m in MODES}
    none = {"f_backward_calls": 0, "backward_nstep": None}
    assert counts["upg"] == {"f_forward": K + k, "vjp_backward": k, **none}
    assert counts["npg"] == {"f_forward": K + 1, "vjp_backward": k, **none}
    assert counts["jfb"] == {"f_forward": K + 1, "vjp_backward": 1, **none}
    # Backprop returns the last iterate whose residual was measured, z_{K-1}: K - 1 evaluations lead to it
    assert counts["backprop"] == {"f_forward": K, "vjp_backward": K - 1, **none}
    for mode in ("implicit-fixed_point", "implicit-broyden"):
        # the backward solve's 5 VJPs, then one pass of J_theta^T g to the parameters
        assert counts[mode] == {"f_forward": K + 1, "f_backward_calls": 0, "vjp_backward": 5 + 1, "backward_nstep": 5}


def test_implicit_count_follows_an_early_stop():
    cfg, runner = _runner(model="synthetic", dim=8, batch=4, solver_iter=40, backward_iter=40, backward_tol=1e-4)
    counts = runner.count(variant(cfg, "implicit-fixed_point"))
    assert 1 < counts["backward_nstep"] < 40  # a contraction: the backward solve stops early
    assert counts["vjp_backward"] == counts["backward_nstep"] + 1


@pytest.mark.slow
def test_mdeq_tiny_at_tiny_size(tmp_path):
    code = main(
        [
            "bench",
            "--model",
            "mdeq-tiny",
            "--image-size",
            "8",
            "--batch",
            "2",
            "--solver-iter",
            "3",
            "--backward-iter",
            "3",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--modes",
            "implicit-broyden,upg,npg",
            "--no-memory",
            "--no-solvers",
            "--out",
            str(tmp_path),
            "--json",
            str(tmp_path / "m.json"),
        ]
    )
    assert code == 0
    rows = {r["mode"]: r for r in json.loads((tmp_path / "m.json").read_text())["rows"]}
    assert rows["upg"]["f_forward"] == 3 + 5 and rows["upg"]["vjp_backward"] == 5
    assert rows["npg"]["vjp_backward"] == 5
    assert rows["implicit-broyden"]["vjp_backward"] == rows["implicit-broyden"]["backward_nstep"] + 1
    assert all(math.isfinite(r["deq_backward_ms"]) and r["deq_backward_ms"] > 0 for r in rows.values())


def test_memory_is_measured_in_a_fresh_process():
    cfg = BenchConfig(model="synthetic", dim=8, batch=4, solver_iter=4)
    mem = measure_memory(cfg, variant(cfg, "upg"))
    assert math.isfinite(mem["step_mib"]) and mem["step_mib"] >= 0
    assert mem["peak_rss_mib"] > 10  # at least the interpreter and torch


def test_torchdeq_counts_match_its_source():
    pytest.importorskip("torchdeq")
    K, k = 5, 3
    cfg, runner = _runner(
        model="synthetic",
        dim=8,
        batch=4,
        solver="fixed_point",
        solver_iter=K,
        solver_tol=1e-30,
        k=k,
        backward_iter=4,
        backward_tol=1e-30,
    )
    assert runner.count(variant(cfg, "upg", lib="torchdeq")) == {
        "f_forward": K + k,
        "f_backward_calls": 0,
        "vjp_backward": k,
        "backward_nstep": None,
    }
    # TorchDEQ's IFT evaluates F once in the forward with a graph and once more in the backward;
    # its backward solve starts from zero, so all b_max_iter VJPs run.
    assert runner.count(variant(cfg, "implicit-fixed_point", lib="torchdeq")) == {
        "f_forward": K + 1,
        "f_backward_calls": 1,
        "vjp_backward": 4 + 1,
        "backward_nstep": None,
    }


def test_compare_without_torchdeq_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # import torchdeq now raises ImportError
    assert main(TINY_SYNTHETIC + ["--compare", "torchdeq", "--no-memory"]) == 2
    assert TORCHDEQ_INSTALL in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--modes", "upg,bogus"], "bogus"),
        (["--solver-iter", "0"], "solver_iter"),
        (["--damping", "1.5"], "damping"),
    ],
)
def test_bad_values_are_refused(argv, match, capsys):
    assert main(TINY_SYNTHETIC + argv) == 2
    assert match in capsys.readouterr().err


def test_cuda_request_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="cuda"):
        BenchConfig(device="cuda")


def test_bench_runs_the_deq_transformer_on_token_ids(capsys):
    # the language model: integer token ids in, (B L, V) logits against the next tokens
    args = [
        "bench",
        "--model",
        "deq-transformer-small",
        "--batch",
        "2",
        "--seq-len",
        "8",
        "--modes",
        "upg,jfb",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--no-memory",
        "--no-solvers",
        "--solver-iter",
        "8",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model deq-transformer-small, batch 2" in out
    assert "| UPG A_{5,0.5} | phantomgrad |" in out and "| JFB | phantomgrad |" in out


def test_modes_and_solvers_come_from_the_registries(monkeypatch):
    from phantomgrad.backward import UPG
    from phantomgrad.experiments.bench import mode_names, solver_names
    from phantomgrad.experiments.bench.measure import variants_of
    from phantomgrad.modes import BACKWARD_MODES
    from phantomgrad.solvers import SOLVERS

    assert {m.partition("@")[0].partition("-")[0] for m in MODES} == set(BACKWARD_MODES)
    assert set(solver_names()) <= set(SOLVERS) and {"fixed_point", "anderson", "broyden"} <= set(solver_names())

    class Halfway(UPG):  # a new mode: one class and one registry entry
        def __init__(self, k: int = 5, damping: float = 0.5):
            super().__init__(k=k, damping=damping)

    monkeypatch.setitem(BACKWARD_MODES, "halfway", Halfway)
    assert "halfway" in mode_names()
    cfg = BenchConfig(model="synthetic", modes=("upg", "halfway"), compare="torchdeq")
    assert variant(cfg, "halfway").label == "Halfway A_{5,0.5}"
    variants, na = variants_of(cfg)  # TorchDEQ is not imported for this
    assert [(v.lib, v.mode) for v in variants] == [
        ("phantomgrad", "upg"),
        ("torchdeq", "upg"),
        ("phantomgrad", "halfway"),
    ]
    assert [(r["lib"], r["mode"], r["na"]) for r in na] == [
        ("torchdeq", "halfway", "TorchDEQ has no equivalent of Halfway")
    ]


def test_sync_free_and_compiled_rows(tmp_path):
    # check_every=None runs every solve to max_iter; the compiled step's gradient is the eager one
    K, k = 7, 3
    code = main(
        TINY_SYNTHETIC
        + [
            "--modes",
            "upg",
            "--solver-iter",
            str(K),
            "--k",
            str(k),
            "--sync-free",
            "--compiled",
            "--compile-backend",
            "eager",
            "--no-memory",
            "--no-solvers",
            "--out",
            str(tmp_path),
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert code == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert list(rows) == [
        "UPG A_{3,0.5}",
        "UPG A_{3,0.5}, check_every=None",
        "UPG A_{3,0.5}, compiled, check_every=None",
    ]
    sync_free, compiled = rows["UPG A_{3,0.5}, check_every=None"], rows["UPG A_{3,0.5}, compiled, check_every=None"]
    assert sync_free["f_forward"] == K + k and sync_free["check_every"] is None
    assert compiled["f_forward"] is None and math.isnan(compiled["deq_forward_ms"]) and compiled["step_ms"] > 0
    assert compiled["cosine"] == pytest.approx(sync_free["cosine"], abs=1e-6)


@pytest.mark.slow
def test_fused_rows_and_solver_table(tmp_path):
    # --fused adds a row per mode whose solvers (forward and Implicit's backward) have fused=True,
    # and fused rows to the forward-solver table for the solvers that take it
    code = main(
        TINY_SYNTHETIC
        + ["--modes", "upg,implicit-broyden", "--solver-iter", "6", "--fused", "--sync-free", "--no-memory"]
        + ["--out", str(tmp_path), "--json", str(tmp_path / "f.json")]
    )
    assert code == 0
    result = json.loads((tmp_path / "f.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    fused = rows["UPG A_{5,0.5}, fused, check_every=None"]
    assert fused["fused"] is True and fused["f_forward"] == 6 + 5
    assert fused["cosine"] == pytest.approx(rows["UPG A_{5,0.5}, check_every=None"]["cosine"], abs=1e-5)
    assert "Implicit (broyden, 30), fused, check_every=None" in rows
    libs = {(s["solver"], s["lib"]) for s in result["solvers"]}
    assert {("anderson", "phantomgrad, fused"), ("broyden", "phantomgrad, fused")} <= libs
    assert ("reversible", "phantomgrad, fused") not in libs  # no fused option there
    cfg, runner = _runner(model="synthetic", dim=8, batch=4, fused=True, modes=("implicit-broyden",))
    solver, mode = runner.solver_and_mode(variant(cfg, "implicit-broyden", fused=True))
    assert solver.fused and mode.solver.fused
    with pytest.raises(ValueError, match="no fused option"):
        BenchConfig(model="synthetic", solver="reversible", fused=True)


def test_sync_free_implicit_runs_every_backward_step():
    cfg, runner = _runner(model="synthetic", dim=8, batch=4, solver_iter=40, backward_iter=40, backward_tol=1e-4)
    early = runner.count(variant(cfg, "implicit-fixed_point"))
    never = runner.count(variant(cfg, "implicit-fixed_point", check_every=None))
    assert early["backward_nstep"] < 40 and early["f_forward"] < 41  # a contraction: both solves stop early
    assert never["vjp_backward"] == 40 + 1 and never["f_forward"] == 40 + 1  # the host never looked


def test_check_every_is_passed_to_every_solve():
    cfg, runner = _runner(model="synthetic", dim=8, batch=4, check_every=None, modes=("implicit-broyden",))
    solver, mode = runner.solver_and_mode(variant(cfg, "implicit-broyden"))
    assert solver.check_every is None and mode.solver.check_every is None
    with pytest.raises(ValueError, match="check_every"):
        BenchConfig(model="synthetic", check_every=0)


def test_the_transformer_gradient_reaches_its_weight_norm_parameters():
    # bench drives the model through its own prepare() inside its forward_context() (cached weight norm)
    cfg, runner = _runner(model="deq-transformer-small", batch=2, seq_len=4, solver_iter=3, modes=("upg",))
    runner.step(variant(cfg, "upg"), optimizer_step=False)
    names = [n for n, _ in runner.p.block.named_parameters()]
    assert any("original0" in n for n in names) and any("original1" in n for n in names)  # g and v
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in runner.p.block.parameters())


def test_a_mode_the_bench_cannot_build_gets_an_na_row(monkeypatch, tmp_path):
    from phantomgrad.backward import BackwardMode
    from phantomgrad.modes import BACKWARD_MODES

    class NeedsData(BackwardMode):  # a constructor argument the bench has no option for
        def __init__(self, table):
            self.table = table

        def attach(self, fn, z_star, info):
            return z_star

    monkeypatch.setitem(BACKWARD_MODES, "needs_data", NeedsData)
    code = main(
        TINY_SYNTHETIC
        + [
            "--modes",
            "jfb,needs_data",
            "--solver-iter",
            "4",
            "--no-memory",
            "--no-solvers",
            "--no-cosine",
            "--out",
            str(tmp_path),
            "--json",
            str(tmp_path / "n.json"),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "n.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["JFB", "needs_data"]
    assert "table" in rows[1]["na"] and "na" not in rows[0]


def test_every_method_has_a_row_shine_with_broyden_and_reversible_with_backprop():
    from phantomgrad.experiments.bench.torchdeq import unsupported
    from phantomgrad.modes import BACKWARD_MODES

    assert "shine" in MODES and "backprop@reversible" in MODES
    assert {m.partition("@")[0].partition("-")[0] for m in MODES} == set(BACKWARD_MODES)
    cfg = BenchConfig(model="synthetic", solver="anderson")
    shine = variant(cfg, "shine")
    assert shine.solver == "broyden" and "broyden forward" in shine.label  # never silently Anderson
    assert variant(cfg, "upg").solver is None  # a mode that accepts the run's solver keeps it
    rev = variant(cfg, "backprop@reversible")
    assert rev.solver == "reversible" and "reversible forward" in rev.label
    assert "SHINE" in unsupported(cfg, replace(shine, lib="torchdeq"))
    assert "reversible" in unsupported(cfg, replace(rev, lib="torchdeq"))


def test_shine_asked_to_run_with_anderson_is_refused_not_run():
    cfg = BenchConfig(model="synthetic", dim=8, batch=4, modes=("shine@anderson",), repeats=1, warmup=0)
    runner = Runner(cfg, build_problem(cfg))
    with pytest.raises(ValueError, match="Broyden"):
        runner.probe(variant(cfg, "shine@anderson"))


def test_shine_and_reversible_rows_measure_their_own_solver():
    cfg, runner = _runner(model="synthetic", dim=8, batch=4, solver="anderson", solver_iter=20, dtype="float64")
    solver, mode = runner.solver_and_mode(variant(cfg, "shine"))
    assert type(solver).__name__ == "Broyden" and type(mode).__name__ == "SHINE"
    counts, grad = runner.probe(variant(cfg, "backprop@reversible"))
    assert counts["f_forward"] > 0 and counts["f_backward_calls"] > 0  # the reversal evaluates F again
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_conv_cell_model_runs_every_phantomgrad_mode_it_names(tmp_path):
    # the residual conv cell of a new user's first DEQ: (B, C, H, W) states, GroupNorm, two convs
    code = main(
        ["bench", "--model", "conv-cell", "--batch", "2", "--image-size", "8", "--solver-iter", "3"]
        + ["--backward-iter", "3", "--modes", "upg,jfb,implicit-fixed_point", "--repeats", "1", "--warmup", "0"]
        + ["--no-memory", "--no-cosine", "--out", str(tmp_path), "--json", str(tmp_path / "c.json")]
    )
    assert code == 0
    result = json.loads((tmp_path / "c.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["UPG A_{5,0.5}"]["f_forward"] == 3 + 5 and rows["JFB"]["vjp_backward"] == 1
    assert all(r["step_ms"] > 0 for r in rows.values())


def test_warm_start_rows_reuse_the_last_fixed_point_and_train_an_init_head():
    # --warm-starts: a reuse row (the batch's fixed point of the previous step, through FixedPointCache)
    # and a learned row (an MDEQ init head trained by info.init_loss), each at --warm-iter solver steps
    cfg, runner = _runner(
        model="mdeq-tiny", image_size=8, batch=2, solver_iter=6, warm_starts=True, warm_iter=3, modes=("upg",)
    )
    labels = [v.label for v in variants_of(cfg)[0]]
    assert labels[1:] == ["UPG A_{5,0.5}, reuse start (3 steps)", "UPG A_{5,0.5}, learned start (3 steps)"]
    reuse, learned = (variant(cfg, "upg", start=start, solver_iter=3) for start in ("reuse", "learned"))
    assert runner.count(reuse)["f_forward"] == 3 + 5 and runner.count(learned)["f_forward"] == 3 + 5
    runner.step(reuse)
    stored = runner._caches[reuse].fill(torch.arange(2), runner.last_info.fixed_point)
    for got, want in zip(stored, runner.last_info.fixed_point):
        torch.testing.assert_close(got, want.half().float())  # the next step starts here (float16 store)
    seen = []
    runner.p.deq.register_forward_pre_hook(lambda mod, args: seen.append(args[1] if len(args) > 1 else None))
    runner.step(reuse)
    for got, want in zip(seen[-1], stored):
        torch.testing.assert_close(got, want)
    head = runner._head(learned)[0]
    before = [q.detach().clone() for q in head.parameters()]
    keys = set(runner.p.model.state_dict())
    runner.step(learned)
    assert runner.last_info.init_loss is not None and set(runner.p.model.state_dict()) == keys
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))  # the head trained
    with pytest.raises(ValueError, match="init head"):
        BenchConfig(model="synthetic", warm_starts=True)
