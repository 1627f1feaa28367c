import json

import pytest
import torch

import phantomgrad as pg
from phantomgrad.cli import main
from phantomgrad.experiments.cosine import (
    CosineConfig,
    Method,
    MethodsConfig,
    SavedBytes,
    build_method,
    compare_methods,
    methods,
    run_study,
)
from phantomgrad.modes import BACKWARD_MODES

TINY = dict(batch=4, dim=16, in_dim=8, trials=1, solver_iter=30, ref_iter=100)


def test_cosine_rises_with_k_and_small_damping_slows_it():
    result = run_study(CosineConfig(dim=16, in_dim=8, batch=8, max_k=6, trials=2))
    assert min(result.implicit_vs_backprop) > 0.9999
    cos = {(r["mode"], r["damping"], r["k"]): r["cosine_mean"] for r in result.rows}
    for mode in ("UPG", "NPG"):
        for lam in (0.5, 0.8, 1.0):
            curve = [cos[(mode, lam, k)] for k in range(1, 7)]
            assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:])), (mode, lam, curve)
        assert cos[(mode, 0.5, 3)] < cos[(mode, 1.0, 3)]


def test_cosine_command_writes_csv_png_json(tmp_path, capsys):
    out = tmp_path / "cos"
    args = [
        "cosine",
        "--max-k",
        "3",
        "--trials",
        "1",
        "--dim",
        "8",
        "--out",
        str(out),
        "--json",
        str(tmp_path / "s.json"),
    ]
    code = main([*args, "--threads", "1"])
    assert code == 0
    assert (out / "cosine.csv").read_text().count("\n") == 1 + 2 * 3 * 3
    assert (out / "cosine.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "s.json").read_text())
    assert len(summary["rows"]) == 18
    assert "exact gradient check" in capsys.readouterr().out
    assert not (out / "methods.json").exists()  # Fig. 1 alone: the methods study is its own command


@pytest.mark.slow
def test_methods_command_writes_the_table(tmp_path):
    out = tmp_path / "methods"
    code = main(["methods", "--models", "synthetic", "--batch", "4", "--dim", "8", "--trials", "1", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "methods.json").read_text())["rows"]
    assert len(rows) == len(methods())
    assert "SHINE (broyden forward)" in (out / "methods.md").read_text()


def test_cosine_command_rejects_bad_values(capsys):
    assert main(["cosine", "--lipschitz", "1.5"]) == 2
    assert "lipschitz" in capsys.readouterr().err
    assert main(["methods", "--models", "resnet"]) == 2
    assert "--models: unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # gone from cosine: argparse's usage error
        main(["cosine", "--methods-on", "synthetic"])
    assert usage.value.code == 2


def test_methods_come_from_the_registries():
    assert [m.mode for m in methods()] == [*BACKWARD_MODES, "backprop"]
    assert methods()[-1] == Method("backprop", "reversible")


def test_a_mode_needing_broyden_never_runs_with_another_forward_solver():
    cfg = MethodsConfig(solver="anderson")
    solver, mode, name = build_method(cfg, Method("shine"))
    assert name == "broyden" and isinstance(solver, pg.Broyden) and isinstance(mode, pg.SHINE)
    assert build_method(cfg, Method("upg"))[2] == "anderson"
    with pytest.raises(ValueError, match="accepts none"):
        build_method(cfg, Method("shine", "anderson"))


def test_every_method_on_the_synthetic_layer():
    result = compare_methods(MethodsConfig(models=("synthetic",), **TINY))
    assert all(r["converged"] for r in result["reference"])
    rows = {(r["method"], r["solver"]): r for r in result["rows"]}
    assert len(rows) == len(methods())
    # exact methods on a converged forward are the exact gradient
    assert rows[("implicit", "broyden")]["cosine_min"] > 0.9999
    assert rows[("backprop", "broyden")]["cosine_min"] > 0.9999
    # a one-step gradient is worse than five phantom steps
    assert rows[("jfb", "broyden")]["cosine_mean"] < rows[("upg", "broyden")]["cosine_mean"]
    # F evaluations: JFB one VJP in backward, NPG k, the reversible solver re-evaluates F in backward
    assert rows[("jfb", "broyden")]["vjp_backward"] == 1
    assert rows[("npg", "broyden")]["vjp_backward"] == 5
    assert rows[("backprop", "reversible")]["f_backward"] > 0
    assert rows[("upg", "broyden")]["f_forward"] == rows[("npg", "broyden")]["f_forward"] + 4
    # memory: backprop through Broyden stores its steps; SHINE keeps an estimate outside autograd
    assert rows[("backprop", "broyden")]["saved_bytes"] > 10 * rows[("npg", "broyden")]["saved_bytes"]
    assert rows[("shine", "broyden")]["held_bytes"] > 0 and rows[("upg", "broyden")]["held_bytes"] == 0


@pytest.mark.slow
def test_reversible_saved_memory_does_not_grow_with_steps():
    def saved(steps: int) -> float:
        cfg = MethodsConfig(models=("synthetic",), **{**TINY, "solver_iter": steps, "solver_tol": 1e-30})
        rows = compare_methods(cfg)["rows"]
        return {(r["method"], r["solver"]): r["saved_bytes"] for r in rows}

    few, many = saved(8), saved(32)
    assert few[("backprop", "reversible")] == many[("backprop", "reversible")] > 0
    assert many[("backprop", "reversible")] < many[("npg", "broyden")] + 4 * 8 * 16 * 8  # + a few states
    assert many[("backprop", "broyden")] > 3 * few[("backprop", "broyden")]


def test_saved_bytes_counts_each_new_storage_once():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    with SavedBytes([w, x]) as saved:
        h = torch.tanh(x @ w)  # saves x, w (left out) and tanh's output
        (h * h).sum()  # saves h twice: one storage
        torch.exp(x @ w).sum()  # a graph dropped at once: counted in total, not retained
    assert saved.total == 2 * h.numel() * h.element_size()
    assert saved.retained == h.numel() * h.element_size()  # tanh's graph, through h


@pytest.mark.slow
def test_every_method_runs_on_mdeq_tiny():
    cfg = MethodsConfig(models=("mdeq-tiny",), batch=2, trials=1, solver_iter=4, ref_iter=6, mdeq_warmup=1)
    rows = compare_methods(cfg)["rows"]
    assert len(rows) == len(methods())
    assert all(-1 <= r["cosine_mean"] <= 1 and r["saved_bytes"] > 0 for r in rows)
