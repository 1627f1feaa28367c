"""Checkpoints written atomically: a run killed at any moment leaves the last good one readable.

The bytes go to a temporary file in the same directory, are flushed and fsync'ed, and the
file is renamed over the target (an atomic replace on POSIX), then the directory is fsync'ed.
A write that fails (a full disk, say) removes the temporary file and leaves the previous
checkpoint as it was; the error is one line (:class:`~phantomgrad.train.errors.RunDirError`).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .rundir import writing

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    keep = (
        f"the previous checkpoint {path} is intact: resume from it with --resume"
        if path.exists()
        else "no checkpoint was written"
    )
    with writing(f"checkpoint {path}", keep):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                _write(fh, buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write(fh: Any, data: memoryview) -> None:
    fh.write(data)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train without --resume first, or point out_dir at the run to resume"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a phantomgrad checkpoint ({type(err).__name__}: {err}); "
            "delete it or resume from another run"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not a phantomgrad checkpoint of format {FORMAT_VERSION}; start a new run"
        )
    return state
