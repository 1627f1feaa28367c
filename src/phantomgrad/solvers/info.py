"""What a solve returns besides the state: :class:`SolverInfo`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .inverse import BroydenInverse


@dataclass
class SolverInfo:
    """What a solve returns besides the state; every tensor field is per sample, shape (B,).

    Attributes:
        abs_residual, rel_residual: ||F(z) - z|| and ||F(z) - z|| / ||F(z)|| of the returned z (float64).
        nstep: evaluations of F counted for the sample (it stops counting once the sample stops).
        converged: the stopping criterion holds at the returned z.
        nonfinite: a non-finite value was produced for the sample.
        fallback: Anderson took a plain step because its small system was singular or not finite.
        trace: with ``trace=True``, one (B,) tensor per step: the stopping criterion of each
            sample's iterate, NaN for samples that had stopped. With ``check_every=None`` there
            is one entry per step run (``max_iter``); otherwise the list ends at ``nstep.max()``.
        states: with ``solve(..., keep=steps)``, for each requested step t the (B, D) state the
            solve had after t evaluations of F (see :meth:`Solver.solve`).
        inverse_jacobian: with ``solve(..., keep_inverse=True)``, Broyden's low-rank estimate of
            (J_F - I)^{-1} at the returned state (:class:`~phantomgrad.solvers.broyden.BroydenInverse`);
            None for solvers that keep no such estimate.
    """

    abs_residual: Tensor
    rel_residual: Tensor
    nstep: Tensor
    converged: Tensor
    nonfinite: Tensor
    fallback: Tensor
    trace: list[Tensor] | None = None
    states: list[Tensor] | None = None
    inverse_jacobian: BroydenInverse | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())  # host sync

    def summary(self) -> dict[str, float]:
        """Batch means as plain floats, for logs and progress bars (one host sync per field)."""
        return {
            "abs_residual": float(self.abs_residual.float().mean()),
            "rel_residual": float(self.rel_residual.float().mean()),
            "nstep": float(self.nstep.float().mean()),
            "converged": float(self.converged.float().mean()),
            "nonfinite": int(self.nonfinite.sum()),
            "fallback": int(self.fallback.sum()),
        }


__all__ = ["SolverInfo"]
