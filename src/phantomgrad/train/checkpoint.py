"""Checkpoints that survive a bad write: a run killed at any moment leaves a good one readable.

Each checkpoint ``checkpoint.pt`` has a sidecar ``checkpoint.pt.json`` holding the SHA-256 and the
length of its bytes (and, for messages, its epoch and step). A new checkpoint does not overwrite
the last one: the last one becomes ``checkpoint.prev.pt`` (with its sidecar), so two good ones are
on disk. The order of the writes keeps, at every instant, at least one file whose bytes match its
sidecar:

1. the new bytes go to a temporary file in the same directory, flushed and fsync'ed (a write that
   fails, e.g. on a full disk, removes it and leaves both older checkpoints as they were: one line,
   :class:`~phantomgrad.train.errors.RunDirError`);
2. when the current checkpoint matches its sidecar (a corrupt one never replaces a good previous one),
   it and its sidecar are hard-linked (copied where links are not allowed) to
   temporary names and renamed over ``checkpoint.prev.pt`` and its sidecar (the current pair stays good
   meanwhile);
3. the new file, then its sidecar, are renamed over ``checkpoint.pt`` and ``checkpoint.pt.json``
   (the previous pair stays good meanwhile); the directory is fsync'ed.

:func:`load_checkpoint` checks the SHA-256 and loads with ``torch.load(weights_only=True)`` (a
checkpoint is outside bytes: no arbitrary classes are unpickled). When the latest checkpoint is
missing, truncated or corrupt it uses the previous one and logs one warning that says so; when
both are bad the error is one line (:class:`CheckpointError`, exit code 2).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .rundir import writing

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".json"  # checkpoint.pt -> checkpoint.pt.json


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


# what a resume of ``phantomgrad train`` reads, and its type (``require=`` of :func:`load_checkpoint`)
TRAINER_STATE: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "epoch": int,
    "step": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": torch.Tensor,
    "history": list,
}


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def has_checkpoint(path: str | Path) -> bool:
    """Whether a resume from ``path`` has anything to try (the latest or the previous checkpoint)."""
    return Path(path).is_file() or previous_path(path).is_file()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` as the latest checkpoint at ``path``, keeping the one before at
    :func:`previous_path` (see the module docstring for the order of the writes)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    data = buffer.getbuffer()
    partial = state.get("partial_epoch")
    meta = {
        "format_version": FORMAT_VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        "partial_batch": partial.get("batch") if isinstance(partial, dict) else None,
    }
    keep = (
        f"the previous checkpoint {path} is intact: resume from it with --resume (or resume=auto)"
        if path.exists()
        else "no checkpoint was written"
    )
    with writing(f"checkpoint {path}", keep):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(path, data, _write)
        try:
            side_tmp = _write_temp(sidecar_path(path), json.dumps(meta).encode(), _write_all)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            if _intact(path):  # a corrupt latest never replaces a good previous one
                _keep_as_previous(path)
            os.replace(tmp, path)
            os.replace(side_tmp, sidecar_path(path))
        finally:
            tmp.unlink(missing_ok=True)
            side_tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def _write_temp(target: Path, data: bytes | memoryview, write: Any) -> Path:
    """``data`` in a fsync'ed temporary file beside ``target``; removed again if the write fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _keep_as_previous(path: Path) -> None:
    """The current checkpoint and its sidecar become the previous ones; the current pair stays in place
    (hard links), so a kill between the two renames still leaves it good."""
    prev = previous_path(path)
    for src, dst in ((path, prev), (sidecar_path(path), sidecar_path(prev))):
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
        try:
            try:
                os.link(src, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)


def _intact(path: Path) -> bool:
    """Whether ``path`` exists and its bytes match its sidecar's SHA-256 (reads the file, no unpickling)."""
    meta = _read_sidecar(path)
    if not meta:
        return False
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == meta.get("sha256")
    except OSError:
        return False


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write(fh: Any, data: memoryview) -> None:
    fh.write(data)


def _write_all(fh: Any, data: bytes) -> None:
    fh.write(data)


def read_checkpoint(path: str | Path, require: dict[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """One checkpoint file, verified against its sidecar's SHA-256 (when it has one) and loaded with
    ``weights_only=True``; raises :class:`CheckpointError` (one line) for anything unusable, including a
    key of ``require`` that is missing or of another type."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no checkpoint at {path}; train without --resume first, or point out_dir at the run to resume"
        ) from None
    meta = _read_sidecar(path)
    if meta is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.get("sha256") or len(data) != meta.get("bytes"):
            raise CheckpointError(
                f"checkpoint {path} is corrupted: its {len(data)} bytes do not match the SHA-256 in "
                f"{sidecar_path(path).name} (a truncated or interrupted write, or a changed file)"
            )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign bytes raise many types (UnpicklingError, RuntimeError, ...)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a phantomgrad checkpoint ({type(err).__name__}: {reason}); "
            "delete it or resume from another run"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not a phantomgrad checkpoint of format {FORMAT_VERSION}; start a new run"
        )
    wrong = [key for key, kind in (require or {}).items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or incomplete: {', '.join(wrong)} missing or of the wrong type; "
            "delete it or resume from another run"
        )
    return state


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's record, None when there is none (a checkpoint of an older phantomgrad); an
    unreadable sidecar is a record that matches nothing."""
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_checkpoint(
    path: str | Path, fallback: bool = True, require: dict[str, type | tuple[type, ...]] | None = None
) -> dict[str, Any]:
    """The latest good checkpoint at ``path``: when it is missing or corrupt (and ``fallback``), the
    previous one, with a warning that names both. ``require``: keys and types it must hold (e.g.
    :data:`TRAINER_STATE`)."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return read_checkpoint(path, require)
    except (CheckpointError, FileNotFoundError) as err:
        if not fallback or not prev.is_file():
            raise
        first = err
    try:
        state = read_checkpoint(prev, require)
    except CheckpointError as err:
        raise CheckpointError(f"{first}; the previous checkpoint is unusable too: {err}") from None
    log.warning(
        "%s; resuming from the previous checkpoint %s (epoch %s, step %s)",
        str(first).split("; ")[0],
        prev,
        state.get("epoch"),
        state.get("step"),
    )
    return state


def describe_intact(path: str | Path) -> str:
    """For an error message: which checkpoint at ``path`` (latest or previous) is intact, and of
    which epoch and step, checked against its SHA-256 (reads the file, does not unpickle it)."""
    for candidate in (Path(path), previous_path(path)):
        meta = _read_sidecar(candidate)
        if meta and _intact(candidate):
            where = f"epoch {meta.get('epoch')}, step {meta.get('step')}"
            if meta.get("partial_batch"):
                where += f", {meta['partial_batch']} steps into epoch {int(meta.get('epoch') or 0) + 1}"
            return f"the checkpoint {candidate} ({where}) is intact"
    return f"no intact checkpoint in {Path(path).parent} yet"
