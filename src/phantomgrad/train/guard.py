"""The divergence guard, on the device: a non-finite step never reaches the weights, and the host
is not asked about it on every step.

For every training step the guard computes a *code* on the device (a 0-dim integer tensor):

    0  the step is applied
    1  the loss is not finite
    2  a forward solve returned a non-finite state (``info.nonfinite``)
    3  a gradient is not finite
    4  the update itself made a parameter non-finite (e.g. an absurd learning rate)

:meth:`StepGuard.update` copies the parameters and the optimiser's state tensors, runs the update
(optimiser step, model projections), and puts every copied tensor back with
``torch.where(code == 0, new, old)``: a bad step leaves the weights and the optimiser's moments
exactly as they were, without a host sync. Under torchrun the codes are combined over processes
(an all-reduce on the device), so every process undoes the same steps.

The host reads the codes later, once per logging interval (:class:`~phantomgrad.train.meter.Meter`),
to count skipped steps and to stop after ``max_bad_steps`` in a row.

One exception: a parameter's *first* update creates its optimiser state, which has no earlier
value to restore on the device; that step is decided on the host (one sync, once per parameter),
and a bad one drops the state it created.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import DistInfo

OK, BAD_LOSS, BAD_SOLVE, BAD_GRADIENT, BAD_UPDATE = range(5)
PROBLEMS = {
    BAD_LOSS: "loss",
    BAD_SOLVE: "solver residual",
    BAD_GRADIENT: "gradient",
    BAD_UPDATE: "parameter after the update",
}


class StepGuard:
    """Keeps non-finite steps away from ``params`` and ``optimizer`` (see the module docstring)."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        dist_info: DistInfo,
        device: torch.device,
    ):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self.dist = dist_info
        self.device = device
        self._updated: set[int] = set()  # ids of parameters whose optimiser state exists
        if device.type == "cuda":
            # Adam's step counters live on the host unless capturable; on the device, restoring them needs no sync
            for group in optimizer.param_groups:
                if "capturable" in group:
                    group["capturable"] = True

    @torch.no_grad()
    def check(self, loss: Tensor, info: Any) -> Tensor:
        """The code of this step before its update (after ``loss.backward()``); no host sync."""
        code = torch.zeros((), dtype=torch.int64, device=self.device)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # one multi-tensor kernel: the sum of |g| over everything overflows or is NaN when any g is
            total = torch.stack(torch._foreach_norm([g.detach() for g in grads], 1)).sum()
            code = torch.where(torch.isfinite(total), code, BAD_GRADIENT)
        nonfinite = getattr(info, "nonfinite", None)
        if isinstance(nonfinite, Tensor):
            code = torch.where(nonfinite.any().to(self.device), BAD_SOLVE, code)
        return torch.where(torch.isfinite(loss.detach()).all().to(self.device), code, BAD_LOSS)

    def update(self, code: Tensor, apply: Callable[[], None]) -> Tensor:
        """Run ``apply()`` (the optimiser step and what follows it) and undo it unless every process's
        ``code`` is 0 and every parameter is finite afterwards. ``code`` is updated in place to the
        step's final code (the same on every process), which is also returned."""
        stepped = [p for p in self.params if p.grad is not None]
        new = [p for p in stepped if id(p) not in self._updated]
        tensors = [p.detach() for p in stepped] + [
            v for p in stepped for v in self.optimizer.state.get(p, {}).values() if isinstance(v, Tensor)
        ]
        with torch.no_grad():
            saved = torch._foreach_mul(tensors, 1.0) if tensors else ()  # one multi-tensor kernel: exact copies
        apply()
        with torch.no_grad():
            return self._settle(code, stepped, new, tensors, saved)

    def _settle(
        self,
        code: Tensor,
        stepped: Sequence[Tensor],
        new: Sequence[Tensor],
        tensors: list[Tensor],
        saved: tuple[Tensor, ...],
    ) -> Tensor:
        if stepped:  # max |p| is NaN or inf when any entry is
            largest = torch.stack(torch._foreach_norm([p.detach() for p in stepped], float("inf"))).max()
            code.copy_(torch.where((code == OK) & ~torch.isfinite(largest), BAD_UPDATE, code))
        if self.dist.enabled:
            dist.all_reduce(code, op=dist.ReduceOp.MAX)  # on the device: every process undoes the same steps
        if new:
            # first update of these parameters: their new optimiser state has no old value; host sync, once each
            if int(code) != OK:
                torch._foreach_copy_(tensors, saved)
                for p in new:
                    self.optimizer.state.pop(p, None)
            else:
                self._updated.update(id(p) for p in new)
            return code
        keep = code == OK
        for t, old in zip(tensors, saved):  # no host sync: a kernel per tensor (there is no multi-tensor where)
            torch.where(keep.to(t.device), t, old, out=t)
        return code

    def after_load(self) -> None:
        """After the optimiser's state was loaded (a resumed run): the parameters with state are known."""
        self._updated = {id(p) for p in self.params if self.optimizer.state.get(p)}


def problem(code: int) -> str:
    """What a non-zero code names."""
    return PROBLEMS.get(code, f"step (code {code})")


__all__ = ["StepGuard", "problem", "OK", "BAD_LOSS", "BAD_SOLVE", "BAD_GRADIENT", "BAD_UPDATE"]
