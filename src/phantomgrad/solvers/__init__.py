"""Forward (and backward) fixed-point solvers.

Every solver finds z with z = fn(z) for a batched map ``fn`` on flat states of
shape ``(B, D)`` (the DEQ layer packs tuple states into that form). A solver
knows nothing about gradients: it is handed a function and a start and returns
the best iterate it saw together with a :class:`SolverInfo`.

Conventions shared by all solvers
---------------------------------
* ``max_iter`` is the largest number of evaluations of ``fn``; the iterate
  returned is one whose residual was measured, so the reported residual belongs
  to the returned state exactly (:class:`Unrolled`, a fixed stack of layers, is the
  exception and says so).
* The residual of an iterate z is r(z) = ||fn(z) - z|| (per sample, 2-norm over D).
  ``stop="abs"`` stops a sample when r(z) <= tol, ``stop="rel"`` when
  r(z) / ||fn(z)|| <= tol.
* Samples stop independently: once a sample meets the tolerance it is frozen, and
  for every sample the iterate with the lowest residual seen is returned.
* The host looks at convergence every ``check_every`` steps, or never (``None``):
  stopped samples are frozen by masks on the device, so the result does not depend
  on ``check_every``; only the number of steps run, and the host syncs, do.
* Non-finite residuals never become the best iterate; ``info.nonfinite`` flags a
  sample for which a non-finite value was produced.
* When autograd is recording (``pg.Backprop``) the solvers stay differentiable:
  history buffers are written out of place.

One loop
--------
:meth:`Solver.solve` is the only loop: a solver supplies ``init(loop, z0) -> (state, z)`` and
``step(loop, state, z, fz, g) -> (state, z_next)`` (and optionally ``finish``), and the loop does
the per-sample stopping, the best iterate, ``check_every``, the fused bookkeeping, the trace,
``keep=`` and the :class:`SolverInfo`, the same for every solver (docs/adding_a_solver.md).

Modules: ``base`` (the Solver base class and its loop), ``loop`` (the loop's bookkeeping),
``info`` (SolverInfo), ``fixed_point`` (FixedPoint, Unrolled), ``anderson``, ``broyden`` (Broyden
and its BroydenInverse), ``reversible`` (the reversible coupled iteration, exact gradient in O(1)
memory), ``gmres`` (restarted GMRES for an affine fn: Implicit's backward solve).
"""

from __future__ import annotations

import inspect

from .anderson import Anderson
from .base import FlatFn, Solver, SolverInfo, _check_damping, default_check_every
from .broyden import Broyden, BroydenInverse
from .fixed_point import FixedPoint, Unrolled
from .gmres import GMRES
from .loop import Loop
from .reversible import Reversible

SOLVERS: dict[str, type[Solver]] = {
    "fixed_point": FixedPoint,
    "anderson": Anderson,
    "broyden": Broyden,
    "unrolled": Unrolled,
    "reversible": Reversible,
    "gmres": GMRES,
}


def make_solver(name: str, **kwargs) -> Solver:
    """Build a solver by name (a key of ``SOLVERS``) with its keyword arguments, for configs."""
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
    return cls(**kwargs)


def fusable() -> list[str]:
    """The names in ``SOLVERS`` whose solver takes ``fused=True`` (compiled per-step bookkeeping)."""
    return [name for name, cls in SOLVERS.items() if "fused" in inspect.signature(cls).parameters]


__all__ = [
    "SOLVERS",
    "make_solver",
    "fusable",
    "Solver",
    "SolverInfo",
    "FixedPoint",
    "Unrolled",
    "Anderson",
    "Broyden",
    "Reversible",
    "GMRES",
    "BroydenInverse",
    "FlatFn",
    "Loop",
    "default_check_every",
    "_check_damping",
]
