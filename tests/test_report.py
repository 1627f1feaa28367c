"""The run report: written by every training run, and rendered again by `phantomgrad report RUN_DIR`."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from conftest import tiny_overrides
from phantomgrad.cli import main
from phantomgrad.train.config import TrainConfig
from phantomgrad.train.trainer import train

TINY = tiny_overrides(train_subset=160)
REPORT_FILES = [
    "report.json",
    "report.md",
    "report_metrics.png",
    "report_forward.png",
    "environment.json",
    "forward_hist.json",
    "forward_stats.csv",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig.from_sources(None, TINY + ["epochs=2", "monitor_every=2", "seed=3", f"out_dir={out}"]))
    return out


def test_every_run_writes_its_report(run_dir):
    for name in REPORT_FILES + ["gradient_quality.csv", "gradient_quality.png"]:
        assert (run_dir / name).stat().st_size > 0, name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["torch_threads"] == 1
    assert report["seeds"]["seed"] == 3
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["summary"]["test_accuracy"] == pytest.approx(report["epochs"][-1]["test_accuracy"])
    fwd = report["forward"]
    assert fwd["samples"] == 2 * 160 and fwd["batches"] == 2 * 3  # 160 images in batches of 64, two epochs
    assert sum(fwd["nstep_histogram"].values()) == fwd["samples"] == sum(fwd["residual_histogram"])
    assert all(1 <= int(k) <= 6 for k in fwd["nstep_histogram"])  # solver_max_iter=6
    assert 0 <= fwd["not_converged"] <= fwd["samples"] and fwd["fallback"] == 0
    assert report["skipped_steps"] == 0
    assert report["gradient_quality"]["points"] == 3  # steps 0, 2, 4 of 6
    md = (run_dir / "report.md").read_text()
    for heading in ("## Environment", "## Per epoch", "## Forward solves", "## Gradient quality", "## Configuration"):
        assert heading in md
    rows = list(csv.DictReader((run_dir / "forward_stats.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(6))


def test_report_command_renders_it_again_from_the_files(run_dir, capsys):
    before = json.loads((run_dir / "report.json").read_text())
    for name in ("report.json", "report.md", "report_metrics.png", "report_forward.png", "gradient_quality.png"):
        (run_dir / name).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    after = json.loads((run_dir / "report.json").read_text())
    before.pop("rendered"), after.pop("rendered")
    assert after == before
    assert (run_dir / "report_forward.png").exists() and (run_dir / "gradient_quality.png").exists()


def test_report_command_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a phantomgrad run directory" in capsys.readouterr().err
