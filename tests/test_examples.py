"""The scripts in examples/ run, at a tiny budget (``--tiny``), and stay short enough to copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_the_examples_are_there():
    names = {p.stem for p in EXAMPLES}
    assert {"own_training_loop", "mdeq_fashion_mnist", "deq_language_model", "ignn_mutag", "switch_backward"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_is_short(script):
    assert len(script.read_text().splitlines()) < 100, f"{script.name} should stay under 100 lines"


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_tiny(script, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(
        [sys.executable, str(script), "--tiny"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    if done.returncode == 2 and "install" in done.stderr:  # the script's own "dataset not installed" exit
        pytest.skip(f"{script.name}: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the example printed nothing"
