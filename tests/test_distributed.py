"""Multi-process training on torchrun + DDP (gloo, 2 CPU processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers.ddp_grad_worker import MODES, Model, global_batch
from phantomgrad.train.checkpoint import load_checkpoint

HERE = Path(__file__).parent


def _torchrun(args, tmp_path, timeout=300):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_ddp_averaged_gradients_equal_single_process_for_every_mode(tmp_path):
    _torchrun([str(HERE / "helpers" / "ddp_grad_worker.py"), str(tmp_path / "grads.pt")], tmp_path)
    ddp = torch.load(tmp_path / "grads.pt")
    x, y = global_batch()
    for name, make in MODES.items():
        model = Model(make())
        nn.functional.cross_entropy(model(x), y).backward()
        for p, g in zip(model.parameters(), ddp[name]):
            assert torch.allclose(p.grad, g, rtol=0, atol=1e-6), name
            assert p.grad.abs().sum() > 0


# Two SGD steps: one and two processes agree to float32 rounding (about 4e-6 here). Over longer runs the
# untrained, not yet contractive MDEQ amplifies that rounding (about 10x per step), so the test stays short.
TINY = [
    "dataset=digits",
    "arch.channels=[8,8]",
    "arch.head_channels=[4,4]",
    "arch.final_channels=16",
    "arch.outer_norm=group",
    "batch_size=128",
    "data_options.train_subset=256",
    "data_options.test_subset=200",
    "solver=fixed_point",
    "solver_tol=1e-12",
    "solver_max_iter=5",
    "epochs=1",  # no stopping decision to flip
    "progress=false",
    "threads=1",
    "optimizer=sgd",
    "lr=0.05",
]  # SGD: Adam would amplify float32 rounding of near-zero gradients


@pytest.mark.slow
def test_torchrun_training_matches_one_process(tmp_path):
    _torchrun(["-m", "phantomgrad", "train", *TINY, f"out_dir={tmp_path / 'two'}"], tmp_path)
    one = subprocess.run(
        [sys.executable, "-m", "phantomgrad", "train", *TINY, f"out_dir={tmp_path / 'one'}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-5, rtol=1e-4), key
    # metrics are reduced over processes: the same test accuracy
    assert a["history"][-1]["test_accuracy"] == pytest.approx(b["history"][-1]["test_accuracy"], abs=1e-9)
    assert not (tmp_path / "two" / "tensorboard").exists()


@pytest.mark.slow
def test_torchrun_default_out_dir_is_chosen_by_rank_0_and_only_rank_0_logs(tmp_path):
    """Without out_dir every process uses rank 0's time-stamped directory: the one printed exists
    and holds the run; the INFO lines come from rank 0 alone."""
    done = _torchrun(["-m", "phantomgrad", "train", *TINY], tmp_path)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoint.pt").exists() and (runs[0] / "summary.json").exists()
    printed = {line.split()[-1] for line in done.stdout.splitlines() if line.startswith("run directory")}
    assert printed and all((tmp_path / p).resolve() == runs[0].resolve() for p in printed)
    assert sum("INFO phantomgrad.train.trainer: training" in line for line in done.stderr.splitlines()) == 1
