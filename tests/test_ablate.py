"""`phantomgrad ablate` end to end at the tiny budget (on digits, so it needs no installed data)."""

import json
import shutil

import pytest

from phantomgrad.cli import main


@pytest.mark.slow
def test_ablate_tiny_writes_table_plot_and_json(tmp_path, capsys):
    out = tmp_path / "ablate"
    small = [
        "dataset=digits",
        "model=mdeq-tiny",
        "arch.channels=[8,8]",
        "arch.head_channels=[4,4]",
        "arch.final_channels=16",
        "solver_max_iter=4",
        "backward_max_iter=4",
    ]
    assert main(["ablate", "--budget", "tiny", "--out", str(out), "--threads", "1", *small]) == 0
    result = json.loads((out / "ablate.json").read_text())
    assert [r["row"] for r in result["table1"]] == [
        "Implicit (with pretraining)",
        "Implicit (no pretraining)",
        "UPG A_{5,0.5}",
        "NPG A_{5,0.5}",
        "UPG A_{9,0.5} + dropout",
    ]
    assert result["table1"][1]["time_vs_implicit"] == 1.0
    for row in result["table1"]:
        assert 0 <= row["accuracy_mean"] <= 1 and row["spectral_radius_mean"] > 0
    assert {(p["mode"], p["k"], p["damping"]) for p in result["fig3"]} == {
        ("UPG", 1, 0.5),
        ("UPG", 2, 0.5),
        ("NPG", 1, 0.5),
        ("NPG", 2, 0.5),
        ("UPG", 5, 0.5),
        ("UPG", 5, 1.0),
    }
    assert (out / "fig3.png").stat().st_size > 1000
    assert "| UPG A_{5,0.5} |" in (out / "ablate.md").read_text()
    assert "Table 1" in capsys.readouterr().out
    # --report-only: the finished runs read back, nothing trained (a missing run is left out, not started)
    shutil.rmtree(out / "npg-3-s0")
    report = ["ablate", "--budget", "tiny", "--what", "table1", "--report-only", "--out", str(out), *small]
    assert main(report) == 0
    rows = [r["row"] for r in json.loads((out / "ablate.json").read_text())["table1"]]
    assert rows == [
        "Implicit (with pretraining)",
        "Implicit (no pretraining)",
        "UPG A_{5,0.5}",
        "UPG A_{9,0.5} + dropout",
    ]
    assert not (out / "npg-3-s0").exists()
    # --rows: train the missing row only; the others' finished runs are read back, not retrained
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*-s0/result.json")}
    train = ["ablate", "--budget", "tiny", "--what", "table1", "--out", str(out), "--threads", "1", "--rows", "3"]
    assert main([*train, *small]) == 0
    assert (out / "npg-3-s0" / "result.json").exists()
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*-s0/result.json")}
    assert {name: t for name, t in after.items() if name in before} == before and len(after) == 5
    assert len(json.loads((out / "ablate.json").read_text())["table1"]) == 5


def test_ablate_rows_must_name_rows_of_the_budget(tmp_path, capsys):
    assert main(["ablate", "--budget", "tiny", "--what", "table1", "--out", str(tmp_path), "--rows", "5"]) == 2
    assert "--rows takes indices 0-4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # argparse's own usage error
        main(["ablate", "--budget", "tiny", "--what", "table1", "--out", str(tmp_path), "--rows", "a"])
    assert done.value.code == 2 and "comma-separated row indices" in capsys.readouterr().err


def test_ablate_rejects_a_bad_override(tmp_path, capsys):
    assert main(["ablate", "--budget", "tiny", "--out", str(tmp_path), "epoch=3"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_table_rows_show_finished_seeds_and_compare_times_on_shared_seeds():
    from dataclasses import replace

    from phantomgrad.experiments.ablate import BUDGETS, _table1_rows, format_table1

    budget = replace(BUDGETS["full"], seeds=(0, 1))

    def run(acc, secs):
        keys = ("seconds_per_epoch", "spectral_radius", "mean_forward_steps", "eval_rel_residual")
        return {"test_accuracy": acc, "train_seconds": secs, "epochs": 6, **{k: 1.0 for k in keys}}

    # Implicit (row 0) finished seed 0 only; UPG (row 1) seeds 0 and 1; NPG (row 2) nothing yet
    results = {(0, 0): run(0.90, 100.0), (1, 0): run(0.91, 80.0), (1, 1): run(0.93, 60.0)}
    rows = {r["row"]: r for r in _table1_rows(budget, results)}
    assert list(rows) == ["Implicit", "UPG A_{5,0.5}"]
    assert rows["Implicit"]["seeds"] == [0] and rows["UPG A_{5,0.5}"]["seeds"] == [0, 1]
    assert rows["UPG A_{5,0.5}"]["accuracy_mean"] == pytest.approx(0.92)
    assert rows["UPG A_{5,0.5}"]["time_vs_implicit"] == pytest.approx(0.8)  # seed 0 against seed 0, not 70/100
    assert "| 0, 1 |" in format_table1(list(rows.values()), budget)


def test_convergence_table_reports_final_epoch_health_and_both_time_ratios():
    # --budget full_converge: the final epoch's steps and converged fractions, and the time against
    # today's UPG (the reference) and against today's Implicit, over the seeds both finished
    from phantomgrad.experiments.ablate import BUDGETS, _table1_rows, format_table1

    budget = BUDGETS["full_converge"]

    def run(secs, train_steps, test_steps, converged):
        keys = ("seconds_per_epoch", "spectral_radius", "mean_forward_steps", "eval_rel_residual")
        final = {"train_nstep": train_steps, "train_converged": converged, "test_nstep": test_steps}
        final["test_converged"] = converged
        return {
            "test_accuracy": 0.9,
            "train_seconds": secs,
            "epochs": 6,
            "final_metrics": final,
            **dict.fromkeys(keys, 1.0),
        }

    results = {
        (0, 0): run(100.0, 12.0, 12.0, 0.0),
        (1, 0): run(50.0, 3.0, 8.0, 0.95),
        (2, 0): run(125.0, 12.0, 12.0, 0.0),
    }
    table = format_table1(_table1_rows(budget, results), budget)
    best = next(line for line in table.splitlines() if line.startswith("| UPG A_{5,0.5} + reuse + Jacobian reg."))
    assert "| 3.00; 1.00 | 95.0% | 8.00 | 95.0% | 50 s | 0.50x | 0.40x | 0.50x |" in best
    alone = next(line for line in table.splitlines() if line.startswith("| Implicit (today)"))
    assert alone.endswith("| 1.25x | 1.00x | - |")  # its partner (row 3) has not finished
