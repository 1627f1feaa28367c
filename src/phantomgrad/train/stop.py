"""A graceful stop on SIGINT (Ctrl-C) and SIGTERM (what ``kill``, schedulers and torchrun send).

The first signal sets :attr:`GracefulStop.signum`; the trainer looks at it after every step
(under torchrun: at the end of every logging interval, where the processes agree), writes a
checkpoint that resumes in the middle of the epoch and raises
:class:`~phantomgrad.train.errors.TrainingInterrupted`. A second signal raises at once, wherever
the loop is: checkpoints are written atomically, so the last one on disk stays good.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


_Handlers = TypeVar("_Handlers", bound="SignalHandlers")


class SignalHandlers:
    """Context manager: while active, SIGINT and SIGTERM call :meth:`_handle` (installed in the main
    thread only; elsewhere it does nothing); the previous handlers come back on exit. ``signum`` is
    the first signal received, None before."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self: _Handlers) -> _Handlers:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        raise NotImplementedError


class GracefulStop(SignalHandlers):
    """The trainer's handlers: the first signal sets ``signum``, the second raises ``at_once(signum)``.

    Args:
        at_once: builds the exception raised on the second signal.
    """

    def __init__(self, at_once: Callable[[int], BaseException]):
        super().__init__()
        self.at_once = at_once

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: stopping after this step and writing a checkpoint (send it again to stop at once)",
                signal.Signals(signum).name,
            )
            return
        raise self.at_once(signum)
