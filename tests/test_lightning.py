"""examples/lightning_mdeq.py: PyTorch Lightning drives a phantomgrad MDEQ (tiny size).

It trains, logs the DEQ's solver metrics through self.log (metrics.csv), checkpoints every epoch,
and a run resumed from its epoch-1 checkpoint ends with exactly the parameters of the run that
was never interrupted. Skipped where Lightning is not installed (the ``lightning`` extra)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "lightning_mdeq.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lightning_mdeq", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_logs_the_solver_metrics_and_resume_is_exact(example, tmp_path):
    torch.set_num_threads(1)
    whole = example.main(["--tiny", "--epochs", "2", "--out", str(tmp_path / "whole")])
    rows = list(csv.DictReader(open(tmp_path / "whole" / "metrics.csv")))
    logged = set(rows[0]) if rows else set()
    for key in ("train/loss", "train/solver_steps", "train/converged", "train/rel_residual", "train/init_loss"):
        assert key in logged, key
    assert any(r.get("val/accuracy") for r in rows)
    steps = [float(r["train/solver_steps"]) for r in rows if r.get("train/solver_steps")]
    assert steps and all(1 <= s <= 6 for s in steps)  # the solver's mean steps, within max_iter
    assert (tmp_path / "whole" / "checkpoints" / "last.ckpt").is_file()

    example.main(["--tiny", "--epochs", "1", "--out", str(tmp_path / "split")])  # interrupted after epoch 1
    resumed = example.main(["--tiny", "--epochs", "2", "--out", str(tmp_path / "split"), "--resume"])
    a, b = _params(whole), _params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"
    first = example.main(["--tiny", "--epochs", "1", "--out", str(tmp_path / "other")])
    assert not all(torch.equal(a[k], v) for k, v in _params(first).items())  # one epoch less is not the same
