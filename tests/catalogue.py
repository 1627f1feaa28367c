"""The tests' catalogue of solvers and backward modes, built from the registries (as banax's
tests/conftest.py builds its adjoints' catalogue): registering a solver in ``SOLVERS`` or a mode in
``BACKWARD_MODES`` is all it takes for the contract tests parametrised from here to run on it.

Solvers are grouped by what they declare (class attributes read by the one loop):
``nonlinear`` (they solve z = F(z) for a contraction F: the forward solvers), ``linear_only``
(GMRES: only for an affine fn, Implicit's backward solve), ``per_sample`` (samples stop and freeze
on their own and the best iterate is returned) and ``lockstep`` (Unrolled, Reversible).

Modes are grouped as banax groups its adjoints: ``exact`` modes give the implicit gradient of
Eq. 4 (to their solve's tolerance) and are checked against the dense formula; ``approximate``
ones (the phantom gradients, SHINE, ...) only by the shared contract. A mode is exact when its
class says ``exact = True`` or it is one of :data:`EXACT_MODES`; any other registered mode is
tested as approximate.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import phantomgrad as pg
from phantomgrad.modes import BACKWARD_MODES
from phantomgrad.solvers import SOLVERS, fusable

EXACT_MODES = ("implicit", "backprop")  # registered modes known to be exact (no class attribute says so yet)


@dataclass(frozen=True)
class SolverEntry:
    name: str
    cls: type[pg.Solver]

    @property
    def linear_only(self) -> bool:
        return self.cls.linear_only

    @property
    def lockstep(self) -> bool:
        return self.cls.lockstep

    @property
    def fusable(self) -> bool:
        return self.name in fusable()

    @property
    def takes(self) -> set[str]:
        return set(inspect.signature(self.cls).parameters)

    def make(self, max_iter: int = 50, tol: float = 1e-4, **options: Any) -> pg.Solver:
        """The solver with its defaults, at most ``max_iter`` evaluations of F (Unrolled: depth) and
        ``tol``; ``options`` it does not take (check_every, fused) are left out."""
        kw = {k: v for k, v in options.items() if k in self.takes}
        if "max_iter" in self.takes:
            kw["max_iter"] = max_iter
        else:
            kw["depth"] = max_iter
        return self.cls(tol=tol, **kw)

    def __repr__(self) -> str:  # the test id
        return self.name


@dataclass(frozen=True)
class ModeEntry:
    name: str
    cls: type[pg.BackwardMode]

    @property
    def exact(self) -> bool:
        return bool(getattr(self.cls, "exact", self.name in EXACT_MODES))

    def make(self) -> pg.BackwardMode:
        return self.cls()

    def __repr__(self) -> str:
        return self.name


SOLVER_ENTRIES = [SolverEntry(name, cls) for name, cls in SOLVERS.items()]
NONLINEAR = [e for e in SOLVER_ENTRIES if not e.linear_only]
LINEAR_ONLY = [e for e in SOLVER_ENTRIES if e.linear_only]
PER_SAMPLE = [e for e in NONLINEAR if not e.lockstep]  # stop per sample, return the best iterate
TO_TOLERANCE = [e for e in SOLVER_ENTRIES if "max_iter" in e.takes]  # iterate to a tolerance (not Unrolled)
MODE_ENTRIES = [ModeEntry(name, cls) for name, cls in BACKWARD_MODES.items()]
EXACT = [e for e in MODE_ENTRIES if e.exact]
APPROXIMATE = [e for e in MODE_ENTRIES if not e.exact]
# the solvers Implicit's backward solve may use: every one that iterates to a tolerance, GMRES included
BACKWARD_SOLVERS = [e for e in TO_TOLERANCE if not e.lockstep]

__all__ = [
    "SolverEntry",
    "ModeEntry",
    "SOLVER_ENTRIES",
    "NONLINEAR",
    "LINEAR_ONLY",
    "PER_SAMPLE",
    "TO_TOLERANCE",
    "MODE_ENTRIES",
    "EXACT",
    "APPROXIMATE",
    "BACKWARD_SOLVERS",
]
