"""Running sums over an epoch that stay on the device until the host asks for them.

A task's :class:`~phantomgrad.train.tasks.StepResult` holds metric sums as floats or as tensors
(tensors stay on the device). :meth:`Meter.add` only keeps references; :meth:`Meter.flush` moves
everything pending to the host in one transfer (the only host sync, once per logging interval),
drops the steps the guard undid (non-zero code) and adds the rest in step order, in float64, so
the sums do not depend on how often the host looks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .distributed import DistInfo, all_reduce_sum


@dataclass
class _Pending:
    step: int | None
    sums: dict[str, Any]
    count: int
    nstep: Tensor | None
    code: Tensor | None


@dataclass
class Meter:
    """Sums over one epoch of the steps that were applied: metric sums from the task, samples,
    mean forward solver steps per batch; and this process's timings."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    nstep: float = 0.0
    batches: int = 0
    forward_s: float = 0.0
    backward_s: float = 0.0
    step_s: float = 0.0
    pending: list[_Pending] = field(default_factory=list)

    def add(self, result: Any, code: Tensor | None = None, step: int | None = None) -> None:
        """Keep one step's result (no host sync); ``code`` is the guard's, 0 when the step was applied."""
        info = result.info
        nstep = info.nstep.detach().float().mean() if info is not None and hasattr(info, "nstep") else None
        self.pending.append(_Pending(step, dict(result.sums), result.count, nstep, code))

    def flush(self) -> list[tuple[int | None, int]]:
        """Add the pending steps to the sums; returns (step, code) of each, in order. One host sync."""
        if not self.pending:
            return []
        tensors = [t for p in self.pending for t in (p.code, p.nstep, *p.sums.values()) if isinstance(t, Tensor)]
        host = iter(_to_host(tensors))
        out = []
        for p in self.pending:
            code = int(next(host)) if p.code is not None else 0
            nstep = next(host) if p.nstep is not None else None
            sums = {k: next(host) if isinstance(v, Tensor) else v for k, v in p.sums.items()}
            out.append((p.step, code))
            if code:
                continue
            for key, value in sums.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
            self.count += p.count
            self.batches += 1
            if nstep is not None:
                self.nstep += nstep
        self.pending = []
        return out

    def reduce(self, dist: DistInfo, device: torch.device) -> "Meter":
        """Sum the counters over processes (timings stay this process's). Flush first."""
        if not dist.enabled:
            return self
        keys = sorted(self.sums)
        values = all_reduce_sum([self.sums[k] for k in keys] + [self.count, self.nstep, self.batches], dist, device)
        return Meter(
            dict(zip(keys, values[: len(keys)])),
            int(values[-3]),
            values[-2],
            int(values[-1]),
            self.forward_s,
            self.backward_s,
            self.step_s,
        )

    def means(self, finalize: Callable[[dict[str, float], int], dict[str, float]]) -> dict[str, float]:
        return {**finalize(self.sums, self.count), "nstep": self.nstep / max(self.batches, 1)}

    def state_dict(self) -> dict[str, Any]:
        """The flushed sums (for a checkpoint in the middle of an epoch)."""
        assert not self.pending, "flush() before saving"
        return {k: getattr(self, k) for k in ("sums", "count", "nstep", "batches", "forward_s", "backward_s", "step_s")}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Meter":
        return cls(**{**state, "sums": dict(state["sums"])})


def _to_host(tensors: list[Tensor]) -> list[float]:
    """Scalars of any device and dtype as Python floats: one transfer per device (a host sync)."""
    if not tensors:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: list[float] = [0.0] * len(tensors)
    for idx in by_device.values():
        values = torch.stack([tensors[i].detach().reshape(()).double() for i in idx]).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out
