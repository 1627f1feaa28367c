"""Fault-tolerant torchrun jobs (gloo, 2 CPU processes): a killed worker restarted by torchrun resumes by
itself, a peer's failure is one line with its own exit code, SIGTERM stops every rank at one step with one
checkpoint, and a resume with another number of processes does what docs/reliability.md says."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from phantomgrad.train.checkpoint import load_checkpoint

HERE = Path(__file__).parent

# 1024 samples, global batch 64: 16 steps per epoch, about a second each epoch on one thread per process
TINY = [
    "dataset=digits",
    "arch.channels=[8,8]",
    "arch.head_channels=[4,4]",
    "arch.final_channels=16",
    "arch.outer_norm=group",
    "batch_size=64",
    "data_options.train_subset=1024",
    "data_options.test_subset=64",
    "solver=fixed_point",
    "solver_max_iter=4",
    "progress=false",
    "threads=1",
    "optimizer=sgd",
    "lr=0.05",
    "dist_timeout=60",
    "warm_start=none",  # a fixed-point cache per process: only rank 0's is saved, so a restart is not exact
]


_STARTED: list = []  # every job a test starts: killed at its end if still alive (a failed assertion)


@pytest.fixture(autouse=True)
def _reap():
    yield
    while _STARTED:
        job = _STARTED.pop()
        if job.poll() is None:
            for pid in _children(job.pid):  # torchrun's workers
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            job.kill()
            job.communicate()


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def _torchrun(args, cwd, nproc=2, restarts=0, rdzv="c10d"):
    """torchrun with the c10d rendezvous (``--standalone``) or the static one (a fixed master address)."""
    where = ["--standalone"] if rdzv == "c10d" else ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(restarts),
        "--monitor-interval",
        "0.2",
        *args,
    ]
    job = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _STARTED.append(job)
    return job


def _train(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "phantomgrad", "train", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _children(pid):
    """The pids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _worker(job, rank):
    """The pid of the worker of ``rank`` (RANK in its environment) that torchrun ``job`` started."""
    for pid in _children(job.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def _wait_for(path, epoch, job, seconds=60):
    """Until the checkpoint sidecar at ``path`` records ``epoch`` (or more) epochs done."""
    deadline = time.time() + seconds
    while time.time() < deadline and job.poll() is None:
        try:
            if json.loads(path.read_text())["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of epoch {epoch} in {seconds} s")


def _same_weights(a, b, atol=0.0):
    return all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=atol, rtol=0) for k in a["model"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The final checkpoint of the tests' job (2 processes, 2 epochs) run without a fault: the reference."""
    root = tmp_path_factory.mktemp("straight")
    job = _torchrun(["-m", "phantomgrad", "train", *TINY, "epochs=2", f"out_dir={root / 'run'}"], root)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    return load_checkpoint(root / "run" / "checkpoint.pt")


@pytest.mark.slow
@pytest.mark.parametrize("rdzv", ["c10d", "static"])
def test_a_killed_worker_is_restarted_by_torchrun_and_the_job_resumes_by_itself(tmp_path, straight, rdzv):
    """SIGKILL rank 1 in epoch 2 under --max-restarts 1: the restarted workers reconnect (a PrefixStore per
    restart), resume by themselves (resume=auto, the default under torchrun) and end with the weights of
    the same job run without a fault."""
    args = ["-m", "phantomgrad", "train", *TINY, "epochs=2"]
    job = _torchrun([*args, f"out_dir={tmp_path / 'killed'}"], tmp_path, restarts=1, rdzv=rdzv)
    _wait_for(tmp_path / "killed" / "checkpoint.pt.json", 1, job)
    time.sleep(0.3)  # into epoch 2
    victim = _worker(job, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    assert "bug in phantomgrad" not in err
    assert "resume=auto: continuing the run" in err
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert b["epoch"] == 2 and b["step"] == straight["step"] == 32
    assert _same_weights(straight, b, atol=1e-6)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(args, cwd, ranks=(0, 1)):
    """Two workers started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT; torch's env:// rendezvous, no torchrun)."""
    port = str(_free_port())
    procs = []
    for rank in ranks:
        env = _env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "phantomgrad", "train", *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        _STARTED.append(procs[-1])
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_peers_failure_is_one_line_with_exit_code_75(tmp_path, fault):
    """Rank 1 is SIGKILLed (a lost peer) or SIGSTOPped (a hung peer, found by dist_timeout=5): rank 0 ends with
    one line that names its rank, what happened, the intact checkpoint and how to resume; exit code 75."""
    out = tmp_path / "run"
    rank0, rank1 = _workers([*TINY, "epochs=5", "dist_timeout=5", f"out_dir={out}"], tmp_path)
    try:
        _wait_for(out / "checkpoint.pt.json", 1, rank0)
        rank1.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        _, err = rank0.communicate(timeout=60)
    finally:
        rank1.kill()
        rank1.communicate()
    assert rank0.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("phantomgrad train: error: rank 0 of 2 "), last
    what = "lost the connection to a peer" if fault == "killed" else "timed out waiting for a peer"
    assert what in last and "is intact" in last and "--resume auto" in last, last
    assert "Traceback" not in err and "bug" not in err
    epoch = json.loads((out / "checkpoint.pt.json").read_text())["epoch"]
    assert f"epoch {epoch}" in last
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == epoch  # and it is


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_all_at_one_step_and_the_resume_continues_mid_epoch(tmp_path, straight):
    """SIGTERM to rank 1 alone: the ranks agree (an all-reduce of the stop flag), rank 0 writes one checkpoint
    in the middle of epoch 2, both exit 143; the resume, with one process instead of two (the global batch,
    the data order and the schedule are kept), ends where a two-process run without a stop ends."""
    out = tmp_path / "stopped"
    rank0, rank1 = _workers([*TINY, "epochs=2", f"out_dir={out}"], tmp_path)
    _wait_for(out / "checkpoint.pt.json", 1, rank0)
    time.sleep(0.3)
    rank1.send_signal(signal.SIGTERM)
    (_, err0), (_, err1) = rank0.communicate(timeout=60), rank1.communicate(timeout=60)
    assert (rank0.returncode, rank1.returncode) == (143, 143), err0[-2000:] + err1[-2000:]
    assert "training interrupted by SIGTERM" in err0.strip().splitlines()[-1]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1 and 0 < state["partial_epoch"]["batch"] < 16 and state["world_size"] == 2
    assert state["step"] == 16 + state["partial_epoch"]["batch"]
    resumed = _train([*TINY, "epochs=2", f"out_dir={out}", "--resume", "auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming a run of 2 process(es) with 1" in resumed.stderr
    a, b = straight, load_checkpoint(out / "checkpoint.pt")
    assert b["step"] == a["step"] == 32
    # one process vs two: only the float32 rounding of the gradient average differs, which the untrained DEQ
    # amplifies step by step; a wrong data order or schedule would move the weights as far as training does
    moved = sum(float((a["model"][k].double() - state["model"][k].double()).norm() ** 2) for k in a["model"])
    apart = sum(float((a["model"][k].double() - b["model"][k].double()).norm() ** 2) for k in a["model"])
    assert apart**0.5 < 0.05 * moved**0.5, (apart**0.5, moved**0.5)  # measured: 0.003 of the distance moved
    assert [r["lr"] for r in b["history"]] == [r["lr"] for r in a["history"]]  # the schedule is kept
    for key in ("train_loss", "train_accuracy", "test_accuracy"):  # the stopped epoch's metrics: all ranks' sums
        assert b["history"][-1][key] == pytest.approx(a["history"][-1][key], rel=0.02, abs=0.02), key


@pytest.mark.slow
def test_sigterm_to_the_job_writes_one_checkpoint_and_the_same_command_resumes(tmp_path, straight):
    """SIGTERM to torchrun (a scheduler's preemption): it passes the signal to its workers, which stop at one
    step with a checkpoint; the same torchrun command line then resumes (resume=auto by default) and ends
    with the weights of the run without the stop."""
    args = ["-m", "phantomgrad", "train", *TINY, "epochs=2"]
    job = _torchrun([*args, f"out_dir={tmp_path / 'stopped'}"], tmp_path)
    _wait_for(tmp_path / "stopped" / "checkpoint.pt.json", 1, job)
    time.sleep(0.3)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode != 0
    assert "bug in phantomgrad" not in err
    state = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    assert state["epoch"] == 1 and 0 < state["partial_epoch"]["batch"] < 16
    again = _torchrun([*args, f"out_dir={tmp_path / 'stopped'}"], tmp_path)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-3000:]
    a, b = straight, load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    assert b["step"] == a["step"] == 32 and _same_weights(a, b, atol=1e-6)


@pytest.mark.slow
def test_a_world_size_change_that_would_change_the_schedule_is_refused(tmp_path):
    from phantomgrad.train.checkpoint import CheckpointError
    from phantomgrad.train.elastic import check_world_size

    state = {"world_size": 2, "steps_per_epoch": 16}
    check_world_size(state, tmp_path, 2, 16)
    check_world_size(state, tmp_path, 4, 16)  # the same global batches: allowed
    check_world_size({}, tmp_path, 3, 11)  # a checkpoint of an older version: not checked
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) with 16 steps per epoch") as err:
        check_world_size(state, tmp_path, 3, 17)
    assert "\n" not in str(err.value) and "--nproc-per-node 2" in str(err.value)


@pytest.mark.parametrize(
    "message, what",
    [
        ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242", "lost"),
        (
            "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv",
            "timed",
        ),
        ("Connection reset by peer", "lost"),
        ("CUDA out of memory", None),
        ("mat1 and mat2 shapes cannot be multiplied", None),
    ],
)
def test_classify_names_a_peers_failure_and_nothing_else(message, what):
    from phantomgrad.train.elastic import classify

    for err in (RuntimeError(message), torch.distributed.DistBackendError(message)):
        got = classify(err)
        assert (got is None) if what is None else got.startswith(what), (message, got)
    assert classify(ValueError("Connection reset by peer")) is None
    store_error = torch.distributed.DistStoreError("Timed out after 4 seconds waiting for clients. 1/2 clients joined.")
    assert classify(store_error).startswith("could not reach its peers")


@pytest.mark.slow
def test_a_peer_that_never_joins_is_a_rendezvous_failure(tmp_path):
    """Rank 0 of 2 alone: init_process_group gives up after dist_timeout; one line, exit code 75."""
    (rank0,) = _workers([*TINY, "epochs=1", "dist_timeout=3", f"out_dir={tmp_path / 'run'}"], tmp_path, ranks=(0,))
    _, err = rank0.communicate(timeout=60)
    assert rank0.returncode == 75, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("phantomgrad train: error: rank 0 of 2 could not reach its peers"), last
    assert "no run directory was chosen yet" in last and "Traceback" not in err


def test_each_restart_attempt_has_its_own_keys_in_torchruns_store(monkeypatch):
    """The store handed to init_process_group is torchrun's TCPStore under the prefix of this attempt, so a
    restarted worker never reads an address the dead attempt published."""
    from datetime import timedelta

    from phantomgrad.train.distributed import DistInfo, attempt_store

    server = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert attempt_store(DistInfo(0, 2), None) is None  # not under torchrun: torch's env:// rendezvous
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    server.set("rank_0", b"the dead attempt's address")
    for restart in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        store = attempt_store(DistInfo(1, 2), timedelta(seconds=10))
        store.set("rank_1", f"attempt {restart}".encode())
        assert not store.check(["rank_0"])  # the other attempt's keys are not seen
    assert server.get("phantomgrad/attempt-0/rank_1") == b"attempt 0"
    assert server.get("phantomgrad/attempt-1/rank_1") == b"attempt 1"
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # two nodes: their agents' restart counts may differ
    assert attempt_store(DistInfo(1, 2), None) is None


def test_the_default_run_directory_survives_a_restart(monkeypatch):
    from phantomgrad.train.elastic import default_run_name

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert default_run_name("digits", "upg", "20260101-000000") == "digits-upg-20260101-000000"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job/42")  # --rdzv-id, the same in every attempt
    assert default_run_name("digits", "upg", "20260101-000000") == "digits-upg-job_42"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # the static rendezvous: no id, keep the time stamp
    assert default_run_name("digits", "upg", "20260101-000000") == "digits-upg-20260101-000000"


def test_resume_modes(tmp_path, monkeypatch):
    """--resume / resume=: True and False as given; auto follows out_dir; None is auto under torchrun only."""
    from phantomgrad.train.checkpoint import save_checkpoint
    from phantomgrad.train.config import ConfigError
    from phantomgrad.train.distributed import DistInfo
    from phantomgrad.train.elastic import resolve_resume

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    one = DistInfo()
    assert resolve_resume(None, None, tmp_path, one) is False
    assert resolve_resume(None, "auto", tmp_path, one) is False  # nothing to resume: a new run
    assert resolve_resume(True, None, tmp_path, one) is True
    save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    assert resolve_resume(None, "auto", tmp_path, one) is True
    assert resolve_resume(False, "auto", tmp_path, one) is False  # the flag wins over the config key
    assert resolve_resume(None, None, tmp_path, one) is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert resolve_resume(None, None, tmp_path, one) is True  # torchrun: auto by default
    (tmp_path / "checkpoint.pt").unlink()  # only the previous checkpoint is left: still a run to resume
    save_checkpoint(tmp_path / "other.pt", {"epoch": 1})
    (tmp_path / "other.pt").rename(tmp_path / "checkpoint.prev.pt")
    assert resolve_resume(None, "auto", tmp_path, one) is True
    with pytest.raises(ConfigError, match="true, false or auto"):
        resolve_resume("sometimes", None, tmp_path, one)


def test_the_command_line_takes_resume_auto(tmp_path, monkeypatch):
    import phantomgrad.train.command as command
    from phantomgrad.cli import main

    seen = {}
    monkeypatch.setattr(command, "run", lambda args: seen.update(vars(args)) or 0)
    assert main(["train", "--resume", "auto", "epochs=2"]) == 0 and seen["resume"] == "auto"
    assert main(["train", "--resume", "epochs=3", "lr=0.1"]) == 0 and seen["resume"] is True
    assert seen["resume_overrides"] + seen["overrides"] == ["epochs=3", "lr=0.1"]
    with pytest.raises(SystemExit):
        main(["train", "--resume", "sometimes"])


def test_peer_failures_turns_only_a_peers_failure_into_exit_code_75(tmp_path, monkeypatch, capsys):
    import phantomgrad.train.command as command
    from phantomgrad.cli import main
    from phantomgrad.train.checkpoint import save_checkpoint
    from phantomgrad.train.elastic import peer_failures
    from phantomgrad.train.errors import DivergenceError, PeerFailure

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 4, "step": 120})
    with pytest.raises(PeerFailure) as caught:
        with peer_failures() as watch:
            watch.checkpoint = tmp_path / "checkpoint.pt"
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:9")
    text = str(caught.value)
    assert text.startswith("rank 1 of 2 lost the connection to a peer process") and "third_party" not in text
    assert "(epoch 4, step 120) is intact" in text and "--resume auto" in text
    for other in (DivergenceError("training diverged: timed out"), ValueError("Connection reset by peer")):
        with pytest.raises(type(other)):
            with peer_failures():
                raise other
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing is a peer's failure
    with pytest.raises(RuntimeError):
        with peer_failures():
            raise RuntimeError("Connection reset by peer")

    def run(args):
        raise caught.value

    monkeypatch.setattr(command, "run", run)
    assert main(["train"]) == 75
    err = capsys.readouterr().err
    assert err.startswith("phantomgrad train: error: rank 1 of 2") and err.count("\n") == 1 and "bug" not in err
