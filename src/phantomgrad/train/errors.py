"""The trainer's errors. Each carries ``exit_code``: the ``phantomgrad`` command prints such an
error as one line ``phantomgrad train: error: <message>`` and exits with that code.

    2    bad input or environment (a run directory in use, a full disk)
    3    training diverged
    75   another process of a torchrun job failed (a lost peer, a collective timeout, a failed
         rendezvous): :class:`PeerFailure`; the checkpoint on disk is intact and the same command
         resumes (75 is ``EX_TEMPFAIL``: try again)
    130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM; the message names the checkpoint to resume from

(:class:`~phantomgrad.train.config.ConfigError` and
:class:`~phantomgrad.train.checkpoint.CheckpointError` are ``ValueError``s: exit code 2.)
"""

from __future__ import annotations

import signal
from pathlib import Path


class TrainError(Exception):
    """Base of the trainer's errors; ``exit_code`` is the process exit status the CLI uses."""

    exit_code = 1


class DivergenceError(TrainError, RuntimeError):
    """Training stopped because ``max_bad_steps`` steps in a row were not finite."""

    exit_code = 3


class RunDirError(TrainError, ValueError):
    """The run directory cannot be used: another run holds it, or it cannot be written (e.g. the
    disk is full). Nothing that was on disk before is lost; the message says what to do."""

    exit_code = 2


class PeerFailure(TrainError, RuntimeError):
    """Another process of a torchrun job failed: the connection to a peer was lost, a collective
    timed out (``dist_timeout``) or the rendezvous failed. Not this process's fault, nor phantomgrad's;
    the message names the rank, what happened, the intact checkpoint and how to resume."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, running the command again continues


class TrainingInterrupted(TrainError):
    """SIGINT or SIGTERM stopped training; ``checkpoint`` (when not None) resumes it with ``--resume``."""

    def __init__(self, signum: int, checkpoint: Path | None, detail: str = ""):
        self.signum = signum
        self.checkpoint = checkpoint
        self.detail = detail
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
        name = signal.Signals(signum).name
        if checkpoint is None:
            where = "no checkpoint was written yet; start the run again"
        else:
            where = f"resume with --resume and out_dir={checkpoint.parent} (checkpoint {checkpoint}{detail})"
        super().__init__(f"training interrupted by {name}; {where}")

    def __reduce__(self) -> tuple[type, tuple[int, Path | None, str]]:
        # pickled by its own arguments, so that it crosses a process boundary (``phantomgrad ablate --jobs``)
        return type(self), (self.signum, self.checkpoint, self.detail)


__all__ = ["TrainError", "DivergenceError", "RunDirError", "PeerFailure", "TrainingInterrupted"]
