"""`phantomgrad ablate` end to end at the tiny budget (on digits, so it needs no installed data)."""

import json

from phantomgrad.cli import main


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


def test_ablate_rejects_a_bad_override(tmp_path, capsys):
    assert main(["ablate", "--budget", "tiny", "--out", str(tmp_path), "epoch=3"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err
