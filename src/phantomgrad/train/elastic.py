"""Elastic runs under torchrun: resume by itself on a restart, name a peer's failure as what it is.

* ``resume=auto`` (``--resume auto``) resumes when the run directory holds a checkpoint and starts
  fresh when it holds none, so one command line serves the first start and every restart that
  ``torchrun --max-restarts N`` makes. It is the default under torchrun (``TORCHELASTIC_RUN_ID`` is
  set), where the default run directory is named after the torchrun run id, so a restart finds it.
* A lost peer (gloo's "Connection reset/closed by peer"), a collective that times out
  (``dist_timeout``) or a failed rendezvous ends the process with
  :class:`~phantomgrad.train.errors.PeerFailure` (exit code 75): one line naming the rank, what
  happened, the checkpoint that is intact and how to resume; never the "bug in phantomgrad" line.
* A resume with another number of processes continues when the run is the same run (the global batch
  ``batch_size``, the data order drawn from (seed, epoch) and the steps per epoch, hence the
  learning-rate schedule, are unchanged) and is refused with one line when the steps per epoch differ.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from .checkpoint import CheckpointError, describe_intact, has_checkpoint
from .config import ConfigError
from .distributed import DistInfo, broadcast_object
from .errors import PeerFailure, TrainError

log = logging.getLogger(__name__)

RESUME_MODES = (True, False, "auto")

# what gloo, NCCL and the TCPStore say when a peer is gone, a collective times out or the rendezvous fails
_LOST = re.compile(
    r"connection (reset|closed) by peer|broken pipe|connection refused|ECONNRESET|EPIPE|socket closed|"
    r"NCCL communicator was aborted|remote process exited|peer.*(closed|disconnected)",
    re.IGNORECASE,
)
_TIMEOUT = re.compile(r"timed? ?out|timeout|deadline exceeded", re.IGNORECASE)
_RENDEZVOUS = re.compile(r"connectFullMesh|rendezvous|TCPStore|store", re.IGNORECASE)


def under_torchelastic() -> bool:
    """Whether torchrun's elastic agent started this process (it sets TORCHELASTIC_RUN_ID)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0 at the first start)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def default_run_name(dataset: str, backward: str, stamp: str) -> str:
    """``<dataset>-<backward>-<stamp>``; under torchrun the run id (``--rdzv-id``; a random one with
    ``--standalone``) replaces the time stamp, so that the workers torchrun restarts find the directory
    their first attempt wrote. The static rendezvous has no run id ("none"): the time stamp stays."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        stamp = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:36]
    elif run_id:  # the static rendezvous has no run id: every job would share one directory
        log.warning("torchrun's static rendezvous has no run id: name out_dir=... so that a restarted job resumes")
    return f"{dataset}-{backward}-{stamp}"


def resolve_resume(resume: bool | str | None, configured: Any, out_dir: Path, info: DistInfo) -> bool:
    """Whether this run resumes: ``resume`` (the ``--resume`` flag) wins over ``configured`` (the
    ``resume`` config key); when both are None: ``auto`` under torchrun, else False. ``auto`` is
    decided by rank 0 (does out_dir hold a checkpoint?) and broadcast, so every process agrees."""
    mode = resume if resume is not None else configured
    if mode is None:
        mode = "auto" if under_torchelastic() else False
    if mode not in RESUME_MODES:
        raise ConfigError(f"resume must be true, false or auto, got {mode!r}")
    if mode != "auto":
        return bool(mode)
    found = bool(broadcast_object(has_checkpoint(out_dir / "checkpoint.pt"), info))
    log.info(
        "resume=auto: %s (restart %d)",
        f"continuing the run in {out_dir}" if found else f"no checkpoint in {out_dir}, starting a new run",
        restart_count(),
    )
    return found


def check_world_size(state: dict[str, Any], out_dir: Path, world_size: int, steps_per_epoch: int) -> None:
    """Refuse (one line) a resume with another number of processes that would change the run."""
    saved, saved_steps = state.get("world_size"), state.get("steps_per_epoch")
    if saved is None or saved == world_size:
        return
    if saved_steps is not None and saved_steps != steps_per_epoch:
        raise CheckpointError(
            f"checkpoint in {out_dir} was written by {saved} process(es) with {saved_steps} steps per epoch; "
            f"{world_size} process(es) make {steps_per_epoch}, which would change the run's schedule: resume "
            f"with {saved} process(es) (torchrun --nproc-per-node {saved}) or use a new out_dir"
        )
    log.info(
        "resuming a run of %d process(es) with %d: the global batch, the data order (seed, epoch) and the "
        "learning-rate schedule (%d steps per epoch) are unchanged",
        saved,
        world_size,
        steps_per_epoch,
    )


def classify(err: BaseException) -> str | None:
    """What a distributed error says happened, or None when it is not a peer's failure."""
    import torch.distributed as dist

    text = str(err)
    if not isinstance(err, RuntimeError):  # gloo's and NCCL's errors are RuntimeErrors (DistError among them)
        return None
    if _LOST.search(text):
        return "lost the connection to a peer process, which died, was killed or lost its node"
    if isinstance(err, (dist.DistStoreError, dist.DistNetworkError)) or (
        isinstance(err, dist.DistError) and _RENDEZVOUS.search(text)
    ):
        return "could not reach its peers: the rendezvous or the TCPStore failed (a peer did not start or join)"
    if _TIMEOUT.search(text) and (isinstance(err, dist.DistError) or "gloo" in text.lower()):
        return "timed out waiting for a peer process in a collective: the peer hung or died (see dist_timeout)"
    return None


def peer_failure(err: BaseException, what: str, checkpoint: Path | None) -> PeerFailure:
    """The one-line error of a peer's failure, seen by this process (RANK and WORLD_SIZE from torchrun)."""
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    detail = " ".join(str(err).split())
    detail = re.sub(r"\[[^\]]*third_party[^\]]*\]\s*", "", detail)  # gloo's source location
    detail = detail.split(" This is typically caused by")[0][:160]  # torch's generic advice
    intact = describe_intact(checkpoint) if checkpoint is not None else "no run directory was chosen yet"
    if under_torchelastic():
        how = (
            "torchrun restarts the workers when --max-restarts allows and they resume by themselves; "
            "otherwise run the same command again (resume=auto is the default under torchrun)"
        )
    else:
        how = "run the same command again with --resume auto"
    return PeerFailure(f"rank {rank} of {world} {what} ({type(err).__name__}: {detail}); {intact}; {how}")


class _Watch:
    checkpoint: Path | None = None


@contextlib.contextmanager
def peer_failures() -> Iterator[_Watch]:
    """Turn a peer's failure inside the block into :class:`PeerFailure`; set ``.checkpoint`` on the
    yielded object once the run directory is known (for the message)."""
    watch = _Watch()
    try:
        yield watch
    except TrainError:  # the trainer's own errors (diverged, interrupted, a peer's failure) say what they are
        raise
    except Exception as err:
        what = classify(err) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if what is None:
            raise
        log.debug("the distributed error in full", exc_info=True)
        raise peer_failure(err, what, watch.checkpoint) from None


__all__ = [
    "RESUME_MODES",
    "under_torchelastic",
    "restart_count",
    "default_run_name",
    "resolve_resume",
    "check_world_size",
    "classify",
    "peer_failure",
    "peer_failures",
]
