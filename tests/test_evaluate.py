"""`phantomgrad evaluate RUN_DIR`: a checkpoint's accuracy at several solver budgets, end to end at a tiny
size, and its one-line errors for a bad run directory or key."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_overrides
from phantomgrad.cli import main
from phantomgrad.train.config import TrainConfig
from phantomgrad.train.trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig.from_sources(None, tiny_overrides(train_subset=128) + ["epochs=1", f"out_dir={out}"]))
    return out


def test_evaluate_writes_the_accuracy_vs_compute_table(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", str(run_dir), "solver_max_iter=1,3,6", "solver_tol=1e-3,0.5", f"out_dir={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| solver_max_iter | solver_tol | f_evals |" in printed
    doc = json.loads((out / "evaluate.json").read_text())
    assert (out / "evaluate.md").read_text().count("\n| ") == 1 + 6  # header and six budgets
    assert (out / "evaluate.png").stat().st_size > 0
    rows = {(r["solver_max_iter"], r["solver_tol"]): r for r in doc["rows"]}
    assert len(rows) == 6
    for (max_iter, _), r in rows.items():
        assert 1 <= r["f_evals"] <= max_iter and 0 <= r["converged"] <= 1 and 0 <= r["accuracy"] <= 1
    assert rows[(1, 1e-3)]["f_evals"] == 1.0
    assert rows[(6, 0.5)]["f_evals"] < rows[(6, 1e-3)]["f_evals"]  # a loose tolerance stops early
    assert rows[(6, 0.5)]["converged"] > rows[(6, 1e-3)]["converged"]
    # the budget the run was trained and evaluated with gives the run's own test metrics
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows[(6, 1e-3)]["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert rows[(6, 1e-3)]["loss"] == pytest.approx(summary["final_metrics"]["test_loss"], rel=1e-5)
    # the cheapest budget at the trained budget's accuracy, and what it saves
    c = doc["cheapest_at_reference"]
    assert c["reference"]["solver_max_iter"] == 6 and c["reference"]["solver_tol"] == 1e-3
    assert c["cheapest"]["accuracy"] >= c["reference"]["accuracy"]
    assert c["cheapest"]["f_evals"] == min(
        r["f_evals"] for r in doc["rows"] if r["accuracy"] >= c["reference"]["accuracy"]
    )
    assert c["saving"] == pytest.approx(c["reference"]["f_evals"] / c["cheapest"]["f_evals"])
    assert "fewer." in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["solver_max_iter=0"], "solver_max_iter=0: every value must be positive"),
        (["solver_tol=abc"], "solver_tol=abc: expected a comma-separated list"),
        (["max_iter=3"], "unknown key 'max_iter' for evaluate; keys: solver_max_iter"),
        (["split=valid"], "split=valid: task image evaluates on test"),
        (["solver=nope"], "solver must be one of"),
    ],
)
def test_bad_keys_end_with_one_line_and_exit_2(run_dir, args, message, capsys):
    assert main(["evaluate", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_bad_run_directory_ends_with_one_line_and_exit_2(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "has no config.yaml, so it is not a phantomgrad run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "has no checkpoint.pt to evaluate" in capsys.readouterr().err
    assert not (tmp_path / "evaluate").exists()


def test_evaluate_reads_any_task_and_split(tmp_path, capsys):
    """The graph task (one transductive graph, eval splits valid and test): the same command."""
    out = tmp_path / "run"
    train(
        TrainConfig.from_sources(
            None, ["task=graph", "dataset=chains", "epochs=1", "progress=false", "threads=1", f"out_dir={out}"]
        )
    )
    assert main(["evaluate", str(out), "split=valid", "solver_max_iter=1,50"]) == 0
    doc = json.loads((out / "evaluate" / "evaluate.json").read_text())
    assert doc["split"] == "valid" and [r["solver_max_iter"] for r in doc["rows"]] == [1, 50]
    assert doc["rows"][0]["f_evals"] == 1.0 and doc["rows"][1]["converged"] == 1.0
