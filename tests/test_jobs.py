"""Runs side by side (``phantomgrad ablate --jobs``): a signal stops every run cleanly, each with a
checkpoint, and the command says how to resume; the errors cross process boundaries intact."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from phantomgrad.experiments.jobs import RunsInterrupted
from phantomgrad.train.errors import TrainingInterrupted


def test_interruptions_pickle_with_their_message_and_exit_code():
    for err in (
        TrainingInterrupted(signal.SIGTERM, Path("runs/a/checkpoint.pt"), " at step 7"),
        RunsInterrupted(2, 1, 3),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.exit_code == err.exit_code
    assert RunsInterrupted(signal.SIGTERM, 1, 3).exit_code == 143 and "run the same command again" in str(
        RunsInterrupted(2, 1, 3)
    )


SCRIPT = textwrap.dedent(
    """
    import sys
    from phantomgrad.experiments.ablate import run_one
    from phantomgrad.experiments.jobs import RunsInterrupted, run_jobs

    out, overrides = sys.argv[1], sys.argv[2:]
    jobs = [(i, overrides + [f"out_dir={out}/run{i}", "epochs=500", f"seed={i}"]) for i in range(3)]
    try:
        run_jobs(run_one, jobs, 2, 1)
    except RunsInterrupted as err:
        print("stopped:", err, flush=True)
        sys.exit(err.exit_code)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_every_run_with_a_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), *tiny_overrides(train_subset=128)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # both workers are training (their metrics files exist)
        if all((tmp_path / f"run{i}" / "metrics.csv").exists() for i in (0, 1)):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the runs did not start")
    proc.send_signal(signal.SIGTERM)  # only the parent: it passes the signal on to its workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped: interrupted by SIGTERM after 0 of 3 runs finished; run the same command again" in out
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    for i in (0, 1):  # each interrupted run wrote a checkpoint to resume from
        assert (tmp_path / f"run{i}" / "checkpoint.pt").exists()
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()  # the third never started


def test_fig3_interrupted_says_to_rerun_ablate(monkeypatch, tmp_path):
    from phantomgrad.experiments import ablate

    def interrupted(overrides, threads=None):
        raise TrainingInterrupted(signal.SIGINT, tmp_path / "checkpoint.pt")

    monkeypatch.setattr(ablate, "run_one", interrupted)
    with pytest.raises(RunsInterrupted, match="run the same command again") as caught:
        ablate.run_fig3(ablate.BUDGETS["tiny"], tmp_path, [])
    assert caught.value.exit_code == 130 and caught.value.finished == 0
