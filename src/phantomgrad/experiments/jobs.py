"""Training runs side by side in worker processes, stopped together and cleanly by SIGINT or SIGTERM.

Used by ``phantomgrad ablate --jobs N``. Each worker runs in its own session, so a signal meant for
the command (Ctrl-C in the terminal, ``kill`` of its process) reaches only this process, which
passes it on to every worker exactly once: each worker's trainer then writes a checkpoint after its
current step and stops (a second signal stops them at once). When one run is interrupted, the
others are stopped the same way and no further run starts; the command then exits with 130
(SIGINT) or 143 (SIGTERM) and says how to resume: run it again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from types import FrameType
from typing import Any, Callable

from phantomgrad.train.errors import TrainError, TrainingInterrupted
from phantomgrad.train.stop import SignalHandlers

log = logging.getLogger(__name__)


class RunsInterrupted(TrainError):
    """SIGINT or SIGTERM stopped a set of runs; finished runs are kept and the others hold checkpoints."""

    def __init__(self, signum: int, finished: int, total: int):
        self.signum, self.finished, self.total = signum, finished, total
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after {finished} of {total} runs finished; run the same "
            "command again to resume (finished runs are read back, interrupted ones continue from their checkpoints)"
        )

    def __reduce__(self) -> tuple[type, tuple[int, int, int]]:
        return type(self), (self.signum, self.finished, self.total)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


class _Skipped(Exception):
    """A job that reached a worker after the runs were stopped (the pool queues one ahead)."""


_STOPPED: Any = None  # in a worker: the event the parent sets once the runs are stopped


def _guarded(fn: Callable[[list[str], int], dict[str, Any]], overrides: list[str], threads: int) -> dict[str, Any]:
    if _STOPPED is not None and _STOPPED.is_set():
        raise _Skipped()
    return fn(overrides, threads)


def _worker_init(stopped: Any) -> None:
    global _STOPPED
    _STOPPED = stopped
    if hasattr(os, "setsid"):
        os.setsid()  # signals reach the workers only through the parent, once (see the module docstring)
    # outside training (start-up, the evaluation after it) a signal ends the job with KeyboardInterrupt;
    # during training the trainer's own handlers take over and checkpoint first
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [%(process)d]: %(message)s")


def _signal_workers(signum: int) -> None:
    for child in multiprocessing.active_children():
        if child.pid is not None:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:  # it ended meanwhile
                pass


class _ForwardSignals(SignalHandlers):
    """While active (main thread only), SIGINT and SIGTERM to this process are passed to the workers,
    and ``stopped`` is set so that no further job starts."""

    def __init__(self, stopped: Any) -> None:
        super().__init__()
        self.stopped = stopped

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self.stopped.set()
            log.warning("%s received: every run writes a checkpoint and stops", signal.Signals(signum).name)
        _signal_workers(signum)

    def stop_all(self, signum: int) -> None:
        """One run was interrupted from outside: stop the others the same way (once)."""
        if self.signum is None:
            self.signum = signum
            self.stopped.set()
            _signal_workers(signum)


def run_jobs(
    fn: Callable[[list[str], int], dict[str, Any]],
    jobs: list[tuple[Any, list[str]]],
    n_jobs: int,
    threads: int,
    on_done: Callable[[dict[Any, dict[str, Any]]], None] | None = None,
) -> dict[Any, dict[str, Any]]:
    """Run ``fn(overrides, threads)`` for each ``(key, overrides)`` job, ``n_jobs`` at a time in worker
    processes (``fn`` must be a module-level function) or in this process when ``n_jobs`` is 1;
    ``on_done(results)`` after each finishes. Returns ``{key: fn's result}``; raises
    :class:`RunsInterrupted` when a signal stopped the runs."""
    results: dict[Any, dict[str, Any]] = {}
    if n_jobs <= 1:
        for key, overrides in jobs:
            try:
                results[key] = fn(overrides, threads)
            except TrainingInterrupted as err:
                raise RunsInterrupted(err.signum, len(results), len(jobs)) from None
            if on_done:
                on_done(results)
        return results
    context = get_context("spawn")
    stopped = context.Event()
    pool = ProcessPoolExecutor(max_workers=n_jobs, mp_context=context, initializer=_worker_init, initargs=(stopped,))
    with pool, _ForwardSignals(stopped) as forward:
        futures = {pool.submit(_guarded, fn, overrides, threads): key for key, overrides in jobs}
        for fut in as_completed(futures):
            try:
                results[futures[fut]] = fut.result()
            except (CancelledError, _Skipped):
                continue
            except (TrainingInterrupted, KeyboardInterrupt) as err:
                for other in futures:
                    other.cancel()  # runs not queued yet never start
                forward.stop_all(getattr(err, "signum", forward.signum or signal.SIGINT))
                continue
            if forward.signum is None and on_done:
                on_done(results)
    if forward.signum is not None:
        if on_done:
            on_done(results)
        raise RunsInterrupted(forward.signum, len(results), len(jobs))
    return results


__all__ = ["RunsInterrupted", "run_jobs"]
