"""Multi-process training on PyTorch's own engine (torchrun + DistributedDataParallel).

``torchrun --nproc-per-node N -m phantomgrad train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; :func:`init_distributed` then joins the process group (gloo on CPU, NCCL on
GPU). Without those variables everything runs in one process and these helpers are no-ops.

A restarted job reconnects: torchrun keeps one TCPStore across the restarts of its workers, so
restarted gloo workers could read the addresses the dead attempt published there and fail in
``connectFullMesh`` or hang (pytorch issue 167288). :func:`init_distributed` therefore hands
``init_process_group`` a :class:`~torch.distributed.PrefixStore` keyed by
``TORCHELASTIC_RESTART_COUNT`` over that store: each attempt reads and writes its own keys (on
one node: see :func:`attempt_store`).
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(use_cuda: bool, timeout: float | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (once per process).

    ``timeout`` (seconds; None: torch's default, 30 minutes for gloo) bounds every collective and the
    rendezvous, so a hung peer fails the job instead of hanging it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        wait = timedelta(seconds=timeout) if timeout else None
        store = attempt_store(info, wait)
        if store is None:  # not started by torchrun: the env:// rendezvous as it is
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=wait)
        else:
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo", store=store, rank=info.rank, world_size=world, timeout=wait
            )
    return info


def attempt_store(info: DistInfo, timeout: timedelta | None) -> dist.Store | None:
    """The store of this restart attempt: a PrefixStore keyed by TORCHELASTIC_RESTART_COUNT over the
    TCPStore at MASTER_ADDR:MASTER_PORT (torchrun's agent hosts it when it sets
    TORCHELASTIC_USE_AGENT_STORE=True, else rank 0 does, as torch's env:// rendezvous would). None
    outside torchrun and on several nodes (GROUP_WORLD_SIZE > 1), where the restart counts of the
    nodes' agents can differ."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if restart is None or not addr or not port:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        # several nodes: each node's agent counts only its own workers' failures (pytorch issues 108158,
        # 135712), so the nodes could disagree on the prefix for good; torch's own rendezvous is used there
        return None
    wait = timeout or timedelta(minutes=30)  # torch's default for gloo
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        base = dist.TCPStore(addr, int(port), info.world_size, is_master=False, timeout=wait)
    else:
        base = dist.TCPStore(
            addr, int(port), info.world_size, is_master=info.rank == 0, timeout=wait, multi_tenant=True
        )
    return dist.PrefixStore(f"phantomgrad/attempt-{restart}", base)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every process (e.g. the run directory rank 0 chose)."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def quiet_other_ranks(info: DistInfo) -> None:
    """Processes other than rank 0 log warnings and errors only (rank 0 speaks for the run)."""
    if not info.is_main:
        logging.getLogger("phantomgrad").setLevel(logging.WARNING)


def is_main_process() -> bool:
    """True in rank 0 of a torchrun job and in a single process (reads RANK; no process group needed),
    e.g. for a command that prints the summary once."""
    return int(os.environ.get("RANK", "0")) == 0


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a list of numbers over all processes."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest of an integer over all processes (a host sync)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group once every process has arrived here.

    Call it after dropping the DDP model. Objects that still hold the group when the
    interpreter shuts down (a DDP reducer in a reference cycle, say) can make gloo abort
    the process ("terminate called without an active exception"); hence the ``gc.collect``.
    The barrier keeps any process from leaving while a peer still talks to it.
    """
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
