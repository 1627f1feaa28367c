"""Faults and bad input: atomic checkpoints, exact resume after SIGKILL, the divergence guard,
bf16, and one-line errors that overwrite nothing."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import phantomgrad as pg
from phantomgrad.cli import main
from phantomgrad.models.toy import TanhMap
from phantomgrad.train.checkpoint import load_checkpoint
from phantomgrad.train.config import TrainConfig
from phantomgrad.train.trainer import DivergenceError, Trainer

TINY = [
    "dataset=digits",
    "arch.channels=[8,8]",
    "arch.head_channels=[4,4]",
    "arch.final_channels=16",
    "batch_size=32",
    "data_options.train_subset=640",
    "data_options.test_subset=100",
    "solver_max_iter=5",
    "progress=false",
    "threads=1",
    "dropout=0.1",
]


def _run(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "phantomgrad", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kw,
    )


def _without_timing(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path):
    straight = _run([*TINY, "epochs=3", f"out_dir={tmp_path / 'straight'}"])
    killed_dir = tmp_path / "killed"
    victim = _run([*TINY, "epochs=3", f"out_dir={killed_dir}"])
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until epoch 1's checkpoint is written, then kill inside epoch 2
        if (killed_dir / "checkpoint.pt").exists():
            time.sleep(0.4)
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    survived = load_checkpoint(killed_dir / "checkpoint.pt")  # readable whatever the moment of the kill
    assert survived["epoch"] in (1, 2)
    resumed = _run([*TINY, "epochs=3", f"out_dir={killed_dir}", "--resume"])
    assert resumed.wait(240) == 0, resumed.stderr.read()
    assert straight.wait(240) == 0, straight.stderr.read()
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(killed_dir / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _without_timing(a["history"]) == _without_timing(b["history"])
    rows = list(csv.DictReader((killed_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert not [p for p in killed_dir.iterdir() if p.name.endswith(".tmp")]


def test_divergence_guard_skips_non_finite_steps_and_stops(tmp_path, monkeypatch):
    trainer = Trainer(TrainConfig.from_sources(None, [*TINY, "epochs=1", "max_bad_steps=3", f"out_dir={tmp_path}"]))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    original = trainer.task.step

    def poisoned(model, batch, device, step):
        result = original(model, batch, device, step)
        result.loss = result.loss * float("nan")
        return result

    trainer.task.step = poisoned
    with pytest.raises(DivergenceError, match=r"3 steps in a row had a non-finite loss.*damping.*jac_reg"):
        trainer.fit()
    assert trainer.skipped == 3
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing reached the weights


def test_guard_skips_an_isolated_bad_step_and_training_goes_on(tmp_path):
    trainer = Trainer(TrainConfig.from_sources(None, [*TINY, "epochs=1", f"out_dir={tmp_path}"]))
    original = trainer.task.step

    def once_bad(model, batch, device, step):
        result = original(model, batch, device, step)
        if step == 2 and not once_bad.done:
            once_bad.done = True
            result.loss = result.loss + float("inf")
        return result

    once_bad.done = False
    trainer.task.step = once_bad
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 640 // 32 - 1


@pytest.mark.parametrize(
    "mode", [pg.UPG(5, 0.5), pg.NPG(5, 0.5), pg.Implicit(), pg.JFB()], ids=lambda m: type(m).__name__
)
def test_bf16_gradient_is_close_to_fp32(mode):
    torch.manual_seed(0)
    f, head = TanhMap(64, 32, lipschitz=0.5, dtype=torch.float32), torch.nn.Linear(64, 10)
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=30, tol=1e-4), backward=mode)
    x, y = torch.randn(128, 32), torch.randint(0, 10, (128,))

    def grad(bf16):
        f.zero_grad()
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z, info = deq(x, torch.zeros(128, 64))
            loss = torch.nn.functional.cross_entropy(head(z), y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in [*f.parameters(), *head.parameters()]]), z, info

    g32, _, _ = grad(False)
    g16, z, info = grad(True)
    assert z.dtype == torch.float32  # the solver ran in float32
    assert info.rel_residual.max() < 1e-2  # as far as F in bfloat16 (8-bit mantissa) allows
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99


def test_bf16_training_run(tmp_path):
    summary = Trainer(
        TrainConfig.from_sources(None, [*TINY, "epochs=1", "precision=bf16", f"out_dir={tmp_path}"])
    ).fit()
    assert summary["skipped_steps"] == 0 and summary["test_accuracy"] is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["epoch=3"], "unknown config key 'epoch'; did you mean 'epochs'"),
        (["epochs=three"], "epochs must be int"),
        (["k=0"], "k must be >= 1"),
        (["damping=1.5"], "damping must be in (0, 1]"),
        (["lr=-0.1"], "lr must be > 0"),
        (["precision=fp8"], "precision must be one of fp32, bf16"),
        (["dataset=fashion-mnist", "data_dir=/nonexistent/fmnist"], "apt-get install dataset-fashion-mnist"),
        (["dataset=cifar10", "data_dir=/nonexistent/cifar"], "cifar-10-batches-py"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path, capsys):
    assert main(["train", *args, f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_corrupted_data_file(tmp_path, capsys):
    data = tmp_path / "fmnist"
    data.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (data / name).write_bytes(b"\x00\x00\x08\x03garbage")
    assert main(["train", "dataset=fashion-mnist", f"data_dir={data}", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and err.count("\n") == 1


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "epochs=1", f"out_dir={out}"]) == 0
    return out


def test_corrupted_or_mismatched_checkpoint(finished_run, capsys):
    capsys.readouterr()
    ck = finished_run / "checkpoint.pt"
    good = ck.read_bytes()
    metrics = (finished_run / "metrics.csv").read_text()
    # a different architecture: refused, nothing overwritten
    assert main(["train", *TINY, "epochs=2", "arch.channels=[16,16]", f"out_dir={finished_run}", "--resume"]) == 2
    assert "different config" in capsys.readouterr().err
    # a fresh run into a directory that holds one: refused
    assert main(["train", *TINY, "epochs=1", f"out_dir={finished_run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # corrupted bytes: refused with a one-line error
    ck.write_bytes(good[: len(good) // 3])
    assert main(["train", *TINY, "epochs=2", f"out_dir={finished_run}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and err.count("\n") == 1
    assert ck.read_bytes() == good[: len(good) // 3] and (finished_run / "metrics.csv").read_text() == metrics


# ---- the guard on the device -------------------------------------------------------------------


def _poison(trainer, bad_steps, how=float("nan"), floats=False):
    """Make the loss of the given steps non-finite; with ``floats``, the task's sums (device tensors)
    become host floats, read on every step."""
    original = trainer.task.step

    def step(model, batch, device, global_step):
        result = original(model, batch, device, global_step)
        if global_step in bad_steps:
            result.loss = result.loss * how
        if floats:
            result.sums = {k: float(v) for k, v in result.sums.items()}
        return result

    trainer.task.step = step


def test_the_logging_interval_and_tensor_sums_change_nothing(tmp_path):
    """Host reads every step with float sums, or every 7 steps with tensor sums: the same weights and
    metrics, with bad steps at a parameter's first update (decided on the host) and later (on the device)."""
    runs = []
    for name, every, floats in (("a", 1, True), ("b", 7, False)):
        cfg = TrainConfig.from_sources(None, [*TINY, "epochs=1", f"out_dir={tmp_path / name}"])
        trainer = Trainer(cfg, log_every=every)
        _poison(trainer, {0, 5}, floats=floats)
        runs.append((trainer, trainer.fit()))
    (a, sa), (b, sb) = runs
    assert sa["skipped_steps"] == sb["skipped_steps"] == 2 and sa["steps"] == sb["steps"] == 640 // 32 - 2
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert _without_timing(a.history) == _without_timing(b.history)


def test_divergence_is_seen_at_the_end_of_the_interval_and_nothing_reaches_the_weights(tmp_path):
    trainer = Trainer(
        TrainConfig.from_sources(None, [*TINY, "epochs=1", "max_bad_steps=3", f"out_dir={tmp_path}"]), log_every=5
    )
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    _poison(trainer, set(range(100)), how=float("inf"))
    with pytest.raises(DivergenceError, match=r"3 steps in a row had a non-finite loss \(last at step 2\)") as err:
        trainer.fit()
    assert err.value.exit_code == 3
    assert trainer.skipped == 5 and trainer.step == 5  # at most log_every - 1 steps past the third bad one
    assert all(torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


def test_an_update_that_makes_a_weight_non_finite_is_undone():
    from phantomgrad.train.distributed import DistInfo
    from phantomgrad.train.guard import BAD_UPDATE, StepGuard

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = StepGuard(list(model.parameters()), opt, DistInfo(), torch.device("cpu"))
    x = torch.randn(16, 4)

    def step(lr):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.param_groups[0]["lr"] = lr
        return guard.update(guard.check(loss, None), opt.step)

    assert int(step(1e-2)) == 0 and int(step(1e-2)) == 0
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())}
    assert int(step(float("inf"))) == BAD_UPDATE  # an infinite lr: the weights become non-finite
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(torch.equal(state[i][k], opt.state[p][k]) for i, p in enumerate(model.parameters()) for k in state[i])
    assert int(step(1e-2)) == 0 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_huge_learning_rate_on_one_step_is_skipped_in_training(tmp_path):
    trainer = Trainer(TrainConfig.from_sources(None, [*TINY, "epochs=1", f"out_dir={tmp_path}"]))
    original, calls = trainer.optimizer.step, []

    def step(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            trainer.optimizer.param_groups[0]["lr"] = float("inf")  # the scheduler sets it back on its next step
        return original(*args, **kw)

    trainer.optimizer.step = step
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and summary["test_accuracy"] is not None
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ---- signals, the run lock, a full disk ------------------------------------------------------------


def _wait_for_checkpoint(run_dir, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and not (run_dir / "checkpoint.pt").exists():
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_mid_epoch_with_a_checkpoint_and_resume_is_bit_exact(tmp_path, sig):
    args = [*TINY, "epochs=2", "data_options.train_subset=1280"]
    straight = _run([*args, f"out_dir={tmp_path / 'straight'}"])
    stopped_dir = tmp_path / "stopped"
    victim = _run([*args, f"out_dir={stopped_dir}"])
    _wait_for_checkpoint(stopped_dir)  # epoch 1 is done; the signal lands in epoch 2 (40 steps)
    time.sleep(0.5)
    victim.send_signal(sig)
    assert victim.wait(240) == 128 + sig
    err = victim.stderr.read().strip().splitlines()
    assert err[-1].startswith("phantomgrad train: error: training interrupted by") and "--resume" in err[-1]
    assert not any("Traceback" in line for line in err)
    state = load_checkpoint(stopped_dir / "checkpoint.pt")
    assert state["epoch"] == 1 and 0 < state["partial_epoch"]["batch"] < 40  # in the middle of epoch 2
    resumed = _run([*args, f"out_dir={stopped_dir}", "--resume"])
    assert resumed.wait(240) == 0, resumed.stderr.read()
    assert straight.wait(240) == 0, straight.stderr.read()
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(stopped_dir / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _without_timing(a["history"]) == _without_timing(b["history"])
    assert [r["step"] for r in csv.DictReader((stopped_dir / "forward_stats.csv").open())] == [
        r["step"] for r in csv.DictReader((tmp_path / "straight" / "forward_stats.csv").open())
    ]
    assert not [p for p in stopped_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_second_signal_stops_at_once_and_the_last_checkpoint_stays_good(tmp_path):
    run_dir = tmp_path / "run"
    victim = _run([*TINY, "epochs=3", f"out_dir={run_dir}"])
    _wait_for_checkpoint(run_dir)
    victim.send_signal(signal.SIGINT)
    victim.send_signal(signal.SIGINT)
    assert victim.wait(240) == 130
    assert "training interrupted by SIGINT" in victim.stderr.read().strip().splitlines()[-1]
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] >= 1
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_one_run_per_directory_and_a_stale_lock_does_not_block(tmp_path, capsys):
    from phantomgrad.train.rundir import LOCK_FILE, RunLock

    out = tmp_path / "run"
    with RunLock(out):  # another run holds the directory
        assert main(["train", *TINY, "epochs=1", f"out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {os.getpid()})" in err and err.count("\n") == 1
    assert not (out / "config.yaml").exists()  # nothing written
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(f"{dead.pid}\n")  # a lock left by a killed run
    assert main(["train", *TINY, "epochs=1", f"out_dir={out}"]) == 0
    (out / LOCK_FILE).write_text(f"{dead.pid}\n")
    assert main(["train", *TINY, "epochs=2", f"out_dir={out}", "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    import phantomgrad.train.checkpoint as ck

    out = tmp_path / "run"
    real, calls = ck._write, []

    def write(fh, data):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint after epoch 2: half written, then the disk is full
            fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fh, data)

    monkeypatch.setattr(ck, "_write", write)
    assert main(["train", *TINY, "epochs=3", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space" in err and "--resume" in err and err.count("\n") == 1
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the previous checkpoint, readable
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(ck, "_write", real)
    assert main(["train", *TINY, "epochs=3", f"out_dir={out}", "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3
