"""Plain iteration: the damped fixed-point solver and the unrolled weight-tied stack."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from .._checks import boolean, positive_int
from .base import CheckEvery, FlatFn, Solver, SolverInfo, _check_damping, check_start_and_keep, residual_norms


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

    def __init__(
        self,
        damping: float = 1.0,
        *,
        max_iter: int = 50,
        tol: float = 1e-4,
        stop: Literal["rel", "abs"] = "rel",
        trace: bool = False,
        check_every: CheckEvery = "auto",
        fused: bool = False,
    ):
        super().__init__(max_iter=max_iter, tol=tol, stop=stop, trace=trace, check_every=check_every, fused=fused)
        self.damping = _check_damping("damping", damping)

    def _iterate(self, fn, z, tracker, fallback):
        for n in range(self.max_iter):
            fz = fn(z)
            g = tracker.observe(z, fz)
            if not tracker.any_active or n == self.max_iter - 1:
                return
            # z + 1 * (F(z) - z) is F(z): no arithmetic for the undamped step
            z = tracker.advance(fz if self.damping == 1.0 else torch.add(z, g, alpha=self.damping), z)


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

    def __init__(self, depth: int, *, tol: float = 1e-4, stop: Literal["rel", "abs"] = "rel", trace: bool = False):
        super().__init__(max_iter=positive_int("depth", depth), tol=tol, stop=stop, trace=trace, check_every=None)

    @property
    def depth(self) -> int:
        return self.max_iter

    def __repr__(self) -> str:
        return f"Unrolled(depth={self.depth}, tol={self.tol!r}, stop={self.stop!r}, trace={self.trace!r})"

    def solve(
        self, fn: FlatFn, z0: Tensor, *, keep: Sequence[int] = (), keep_inverse: bool = False
    ) -> tuple[Tensor, SolverInfo]:
        """``depth`` evaluations of F from ``z0``; ``keep`` returns z_t for each requested t (as
        :meth:`Solver.solve`); there is no inverse-Jacobian estimate (``keep_inverse`` is ignored)."""
        keep = check_start_and_keep(z0, keep, self.depth, f"Unrolled runs depth={self.depth} steps", "depth")
        boolean("keep_inverse", keep_inverse)
        trace: list[Tensor] | None = [] if self.trace else None
        states: dict[int, Tensor] = {}
        z = z0
        for t in range(1, self.depth + 1):
            prev, z = z, fn(z)
            if trace is not None or t == self.depth:
                _, abs_res, rel_res = residual_norms(prev, z)
                if trace is not None:
                    trace.append(rel_res if self.stop == "rel" else abs_res)
            if t in keep:
                states[t] = z
        crit = rel_res if self.stop == "rel" else abs_res
        finite = (abs_res + rel_res) < torch.inf
        batch = z0.shape[0]
        info = SolverInfo(
            abs_residual=abs_res,
            rel_residual=rel_res,
            nstep=torch.full((batch,), self.depth, dtype=torch.long, device=z0.device),
            converged=finite & (crit <= self.tol),
            nonfinite=~finite,
            fallback=torch.zeros(batch, dtype=torch.bool, device=z0.device),
            trace=trace,
            states=[states[t] for t in keep] if keep else None,
        )
        return z, info

    def _iterate(self, fn, z, tracker, fallback):  # pragma: no cover - solve is overridden
        raise AssertionError("Unrolled.solve does not use the tracker")


__all__ = ["FixedPoint", "Unrolled"]
