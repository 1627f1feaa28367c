"""Checkpoints that survive a bad write: the previous one kept, a SHA-256 checked, a safe loader."""

import json
import logging
import os
import pickle

import pytest
import torch

import phantomgrad.train.checkpoint as ck
from phantomgrad.train.checkpoint import (
    CheckpointError,
    describe_intact,
    load_checkpoint,
    previous_path,
    save_checkpoint,
    sidecar_path,
)


def _state(epoch):
    return {"epoch": epoch, "step": 10 * epoch, "model": {"w": torch.full((50,), float(epoch))}, "history": []}


@pytest.fixture
def two(tmp_path):
    """A run directory after two checkpoints: epoch 2 the latest, epoch 1 the previous."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    return path


def test_the_previous_checkpoint_is_kept_with_its_checksum(two):
    assert load_checkpoint(two)["epoch"] == 2
    assert ck.read_checkpoint(previous_path(two))["epoch"] == 1
    meta = json.loads(sidecar_path(two).read_text())
    assert meta["epoch"] == 2 and meta["step"] == 20 and meta["bytes"] == len(two.read_bytes())
    assert "epoch 2, step 20" in describe_intact(two)
    assert not [p for p in two.parent.iterdir() if p.name.endswith(".tmp")]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_bit, os.remove], ids=["truncated", "bit-flipped", "missing"])
def test_a_bad_latest_falls_back_to_the_previous_with_a_warning(two, damage, caplog):
    damage(two)
    with caplog.at_level(logging.WARNING, logger="phantomgrad"):
        state = load_checkpoint(two)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.full((50,), 1.0))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(previous_path(two)) in warning and "\n" not in warning
    assert "epoch 1" in describe_intact(two)


def test_a_flipped_bit_is_found_by_the_checksum_not_by_luck(two):
    _flip_bit(two)
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        ck.read_checkpoint(two)
    sidecar_path(two).unlink()  # without its checksum the same bytes load: the sidecar is what caught it
    assert ck.read_checkpoint(two)["epoch"] == 2


def test_a_bad_latest_without_a_previous_is_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    _truncate(path)
    with pytest.raises(CheckpointError, match="corrupted") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
    assert "no intact checkpoint" in describe_intact(path)


def test_both_bad_is_one_line_naming_both(two):
    _truncate(two)
    _flip_bit(previous_path(two))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(two)
    text = str(err.value)
    assert "\n" not in text and str(two) in text and str(previous_path(two)) in text


def test_a_corrupt_latest_never_replaces_a_good_previous(two):
    _truncate(two)
    save_checkpoint(two, _state(3))  # the corrupt epoch-2 file is dropped, epoch 1 stays the previous one
    assert load_checkpoint(two)["epoch"] == 3
    assert ck.read_checkpoint(previous_path(two))["epoch"] == 1


@pytest.mark.parametrize("call", range(7))
def test_a_kill_at_any_rename_leaves_a_good_checkpoint(two, call, monkeypatch):
    """SIGKILL between any two steps of a save, simulated by stopping at the n-th rename or link: the
    newest intact checkpoint loads (the new one, the last one or the one before)."""
    real_replace, real_link, calls = os.replace, os.link, []

    def stop_at(real):
        def step(*args):
            if len(calls) == call:
                raise KeyboardInterrupt("killed")
            calls.append(args)
            return real(*args)

        return step

    monkeypatch.setattr(ck.os, "replace", stop_at(real_replace))
    monkeypatch.setattr(ck.os, "link", stop_at(real_link))
    try:
        save_checkpoint(two, _state(3))
        finished = True
    except KeyboardInterrupt:
        finished = False
    monkeypatch.undo()
    for tmp in two.parent.glob(".*.tmp"):  # what a killed process leaves: temporary files only
        tmp.unlink()
    epoch = load_checkpoint(two)["epoch"]
    assert epoch == 3 if finished else epoch in (2, 3)
    assert finished == (call >= 6)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_only_refuses_a_pickle_that_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"format_version": 1, "x": Evil()}))
    with pytest.raises(CheckpointError, match="corrupted or not a phantomgrad checkpoint"):
        load_checkpoint(path)
    torch.save({"format_version": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_a_full_disk_while_writing_keeps_both_checkpoints(two, monkeypatch):
    import errno

    from phantomgrad.train.errors import RunDirError

    def full(fh, data):
        fh.write(bytes(data)[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "_write", full)
    with pytest.raises(RunDirError, match="free some space"):
        save_checkpoint(two, _state(3))
    assert load_checkpoint(two)["epoch"] == 2 and ck.read_checkpoint(previous_path(two))["epoch"] == 1
    assert not [p for p in two.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_checkpoint_without_what_a_resume_reads_is_refused_or_replaced(tmp_path):
    """A file that loads but lacks a key the trainer reads (or holds it with another type), e.g. an edited
    checkpoint without a sidecar: one line, or the previous checkpoint when there is one."""
    from phantomgrad.train.checkpoint import TRAINER_STATE

    good = {"config": {}, "epoch": 1, "step": 3, "model": {}, "optimizer": {}, "scheduler": {}, "history": []}
    good["rng"] = torch.get_rng_state()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, good)
    assert load_checkpoint(path, require=TRAINER_STATE)["step"] == 3
    save_checkpoint(path, {**good, "step": "three", "model": None})
    assert load_checkpoint(path, require=TRAINER_STATE)["step"] == 3  # the previous one
    previous_path(path).unlink()
    with pytest.raises(CheckpointError, match="step, model missing or of the wrong type") as err:
        load_checkpoint(path, require=TRAINER_STATE)
    assert "\n" not in str(err.value)
    assert load_checkpoint(path)["step"] == "three"  # without require: whatever it holds
