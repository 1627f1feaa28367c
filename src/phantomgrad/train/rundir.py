"""The run directory: one run at a time, and write errors that say what to do.

:class:`RunLock` holds an exclusive ``flock`` on ``out_dir/.phantomgrad.lock`` (the file holds the
owner's pid, for the message) for as long as a run uses the directory. The operating system drops
the lock when its process ends, however it ends, so a lock left by a killed run never blocks a
resume; a second run started on the same directory while the first is alive is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import RunDirError

LOCK_FILE = ".phantomgrad.lock"


class RunLock:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        with writing(f"out_dir {self.path.parent}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"out_dir {self.path.parent} is in use by another run (pid {owner}); wait for it to end "
                "or choose another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the file stays: removing it could let two later runs lock two different files
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def writing(what: str, keep: str = "") -> Iterator[None]:
    """Turn an OS error while writing ``what`` into one line that names it and the fix; ``keep``
    says what is still good on disk (e.g. the last checkpoint)."""
    try:
        yield
    except RunDirError:
        raise
    except OSError as err:
        reason = err.strerror or str(err)
        fix = (
            "free some space"
            if err.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check that it is a directory you can write to"
        )
        tail = f"; {keep}" if keep else ""
        raise RunDirError(f"could not write {what} ({reason}); {fix}{tail}") from None


__all__ = ["RunLock", "writing", "LOCK_FILE"]
