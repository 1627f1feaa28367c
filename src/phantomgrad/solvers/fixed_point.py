"""Plain iteration: the damped fixed-point solver and the unrolled weight-tied stack."""

from __future__ import annotations

from dataclasses import field
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import positive_int
from .base import CheckEvery, Solver, _check_damping
from .loop import Loop


class FixedPoint(Solver):
    """Damped fixed-point (Picard/Krasnosel'skii-Mann) iteration.

    z_{n+1} = z_n + damping * (F(z_n) - z_n). Converges for a contraction F and any
    damping in (0, 1]; smaller damping trades speed for stability. The other keywords are
    those of :class:`Solver`.

    Examples:
        >>> import torch, phantomgrad as pg
        >>> A = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.4, 0.2], [0.0, 0.3, 0.3]], dtype=torch.float64)
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> fn = lambda z: z @ A.T + b  # F(z) = A z + b on a batch of 2; z* solves (I - A) z* = b
        >>> z_star = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - A, b.T).T
        >>> z0 = torch.zeros(2, 3, dtype=torch.float64)
        >>> z, info = pg.FixedPoint(damping=0.8, max_iter=200, tol=1e-12).solve(fn, z0)
        >>> torch.allclose(z, z_star), bool(info.converged.all())
        (True, True)
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.damping = _check_damping("damping", self.damping)

    def step(self, loop: Loop, state: None, z: Tensor, fz: Tensor, g: Tensor) -> tuple[None, Tensor]:
        # z + 1 * (F(z) - z) is F(z): no arithmetic for the undamped step
        return None, fz if self.damping == 1.0 else torch.add(z, g, alpha=self.damping)


class Unrolled(Solver):
    """Exactly ``depth`` plain steps z_{t+1} = F(z_t), never stopping early: a weight-tied stack.

    With ``pg.Backprop()`` this is the pretraining phase of MDEQ-style models (F applied as
    ``depth`` layers from z0, differentiated by ordinary backpropagation). Unlike the other
    solvers, the returned state is the last one, z_depth = F(z_{depth-1}), whose residual is
    not measured; ``info`` describes the last layer: the residuals ||F(z) - z|| and
    ||F(z) - z|| / ||F(z)|| of its input z = z_{depth-1}, ``nstep = depth``, ``converged``
    where the ``stop`` criterion at ``tol`` holds for it. The host never waits (no check).

    Args:
        depth: the number of layers (evaluations of F), >= 1.
        tol, stop: only for ``info.converged``.
        trace: keep the criterion of every layer's input in ``info.trace``.
    """

    depth: int
    max_iter: int = field(default=1, init=False)  # set to depth
    check_every: CheckEvery = field(default=None, init=False)  # never looks
    fused: bool = field(default=False, init=False)

    lockstep: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.depth = self.max_iter = positive_int("depth", self.depth)
        super().__post_init__()

    def __repr__(self) -> str:
        return f"Unrolled(depth={self.depth}, tol={self.tol!r}, stop={self.stop!r}, trace={self.trace!r})"

    def _keep_limit(self) -> tuple[int, str, str]:
        return self.depth, f"Unrolled runs depth={self.depth} steps", "depth"

    def step(self, loop: Loop, state: None, z: Tensor, fz: Tensor, g: Tensor) -> tuple[None, Tensor]:
        return None, fz

    def finish(self, loop: Loop, state: None, z: Tensor, fz: Tensor, g: Tensor) -> Tensor:
        return fz  # the last layer's output; info describes its input z


__all__ = ["FixedPoint", "Unrolled"]
