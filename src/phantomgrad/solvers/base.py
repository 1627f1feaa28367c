"""The :class:`Solver` base: the six common keywords, declared once, and the one loop, :meth:`Solver.solve`."""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import Tensor
from typing_extensions import dataclass_transform

from .._checks import boolean, in_range, one_of, positive_float, positive_int
from .info import SolverInfo
from .loop import FlatFn, Loop, check_start_and_keep, residual_norms

CheckEvery = int | None | Literal["auto"]


def _check_damping(name: str, value: float) -> float:
    """A damping or mixing factor: a float in (0, 1]."""
    return in_range(name, value, 0.0, 1.0)


def _check_check_every(value: Any) -> int | None | Literal["auto"]:
    if value is None:
        return None
    if isinstance(value, str) and value == "auto":
        return "auto"
    return positive_int("check_every (steps between the host's convergence checks; None never checks)", value)


def default_check_every(device: torch.device) -> int | None:
    """The ``check_every`` that ``"auto"`` means on ``device``: 1 on CPU, None elsewhere.

    On a CPU, reading a count back costs no more than the few reductions it needs (the
    "device" is the host) while every step saved by stopping early saves a whole evaluation of
    F, so the host checks after every step (BENCHMARKS.md has the CPU measurement). On CUDA
    (and other accelerators) a check is a host sync that drains the launch
    queue, and a small F is launch-bound; without checks the solve never waits for the host
    and can be captured in a CUDA graph or compiled with ``fullgraph=True``, at the price of
    always running ``max_iter`` steps (converged samples are frozen, so the result is the
    same). This choice on CUDA is not measured here; measure it for your F (BENCHMARKS.md).
    Inside ``torch.compile`` (``torch.compiler.is_compiling()``) every solve takes ``None``.
    """
    return 1 if device.type == "cpu" else None


@dataclass_transform(field_specifiers=(dataclasses.field,))
@dataclass(eq=False, repr=False)
class Solver(abc.ABC):
    """Base class of the fixed-point solvers: the common keywords and the one loop, :meth:`solve`.

    A solver finds z with z = fn(z) for a batched map ``fn`` on flat states (B, D). A new solver
    subclasses this, declares its own options as annotated class attributes (every subclass is
    made a dataclass: its signature shows its options, then these six keywords, with their
    defaults; validate in ``__post_init__`` after ``super().__post_init__()``), implements
    :meth:`init` and :meth:`step`, and gets one line in ``SOLVERS`` (docs/adding_a_solver.md).

    Args:
        max_iter: largest number of evaluations of the map.
        tol: stopping tolerance on the residual (see ``stop``).
        stop: ``"rel"`` for ||F(z)-z|| / ||F(z)|| <= tol, ``"abs"`` for ||F(z)-z|| <= tol.
        trace: keep the per-iteration residual of every sample in ``info.trace``.
        check_every: the host reads whether any sample still iterates every ``check_every``
            evaluations of F (a host sync each time) and stops the solve when none does; with
            ``None`` it never looks: exactly ``max_iter`` evaluations, stopped samples frozen on
            the device, no host sync (the solve can be captured in a CUDA graph or traced by
            ``torch.compile(fullgraph=True)``). The returned state and info are the same for
            every value. ``"auto"`` (default): 1 on CPU, None on CUDA and other accelerators
            (:func:`default_check_every` gives the reason), and None whenever the solve is being
            compiled (``torch.compiler.is_compiling()``): no host read, no graph break.
        fused: run each step's bookkeeping (the residual F(z) - z, both norms, the stopping and
            best-iterate masks, the best iterate) as one ``torch.compile``'d function, one generated
            kernel instead of 17 operators: fewer kernel launches on a GPU (not measured yet); on
            a CPU it measured no faster (BENCHMARKS.md). Compiles on the first solve (seconds;
            needs a working inductor: a C++ compiler on CPU, Triton on CUDA) and again for a new
            shape or dtype. Results equal
            the unfused ones up to the rounding of the norms' sums (float reductions in another
            order). FixedPoint, Anderson, Broyden and GMRES take it.

    Class attributes a solver may set (the loop and the tests' catalogue read them):
        lockstep: every sample takes every step (no per-sample freezing, no best iterate); the
            solve returns what :meth:`finish` makes of the last iterate.
        evals_per_step: evaluations of F per step (the loop runs ``max_iter // evals_per_step`` steps).
        linear_only: the solver solves z = fn(z) only for an affine fn (GMRES): a backward solver
            of ``pg.Implicit``, not a forward solver of a DEQ.
    """

    _: KW_ONLY
    max_iter: int = 50
    tol: float = 1e-4
    stop: Literal["rel", "abs"] = "rel"
    trace: bool = False
    check_every: CheckEvery = "auto"
    fused: bool = False

    lockstep: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    linear_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in vars(cls):  # a dataclass: its options, then the common keywords
            dataclass(eq=False, repr=False)(cls)

    def __post_init__(self) -> None:
        self.max_iter = positive_int("max_iter", self.max_iter)
        self.tol = positive_float("tol (use a small positive number such as 1e-6)", self.tol)
        self.stop = one_of("stop", self.stop, ("rel", "abs"))
        self.trace = boolean("trace", self.trace)
        self.check_every = _check_check_every(self.check_every)
        self.fused = boolean("fused", self.fused)

    def __repr__(self) -> str:
        """The constructor's arguments (the common ones first), then anything else a subclass stored."""
        fields = {f.name: f.init for f in dataclasses.fields(self)}
        names = [k for k, init in fields.items() if init and k in vars(self)]
        names += [k for k in vars(self) if k not in fields]
        keys = ", ".join(f"{k}={getattr(self, k)!r}" for k in names)
        return f"{type(self).__name__}({keys})"

    def _keep_limit(self) -> tuple[int, str, str]:
        """The largest step ``keep`` may name, what the solve runs and the name of the limit."""
        return self.max_iter, f"the solve runs at most max_iter={self.max_iter} steps", "max_iter"

    def solve(
        self, fn: FlatFn, z0: Tensor, *, keep: Sequence[int] = (), keep_inverse: bool = False
    ) -> tuple[Tensor, SolverInfo]:
        """Find z = fn(z) for a batch of flat states ``z0`` of shape (B, D).

        Returns the iterate with the lowest residual seen for each sample (a ``lockstep`` solver:
        what its :meth:`finish` returns), and its :class:`SolverInfo`.

        The loop, the same for every solver: ``state, z = init(loop, z0)``; then per step
        ``fz = evaluate(loop, state, z)`` (fn(z)), the bookkeeping of :class:`~phantomgrad.solvers.loop.Loop` (residual,
        stopping, best iterate, trace), and, unless the solve ends there, ``state, z_next =
        step(loop, state, z, fz, g)`` with the stopped samples' z frozen; at the end
        ``finish(loop, state, z, fz, g)``.

        Args:
            keep: step numbers t (1 <= t <= max_iter) whose states to return in ``info.states``,
                in this order: per sample, the iterate the solve would continue from after t
                evaluations of F, or, for a sample that had stopped by then (converged or
                non-finite), the state the solve returns for it. The state after ``max_iter``
                evaluations is the returned state. Tensors on the device, no host sync; they
                carry autograd history when the solve does (``pg.Backprop``).
            keep_inverse: keep the solver's estimate of (J_F - I)^{-1} in
                ``info.inverse_jacobian`` (Broyden only; others leave it None). It holds the
                solver's history buffers, so memory is freed only when the info is.
        """
        limit, runs, bound = self._keep_limit()
        keep = check_start_and_keep(z0, keep, limit, runs, bound)
        check_every = self.check_every
        if torch.compiler.is_compiling():  # no host read inside a compiled graph
            check_every = None
        elif check_every == "auto":
            check_every = default_check_every(z0.device)
        loop = Loop(
            fn,
            z0,
            tol=self.tol,
            stop=self.stop,
            trace=self.trace,
            check_every=check_every,
            keep=keep,
            max_iter=self.max_iter,
            fused=self.fused,
            lockstep=self.lockstep,
            evals_per_step=self.evals_per_step,
            keep_inverse=boolean("keep_inverse", keep_inverse),
        )
        state, z = self.init(loop, z0)
        steps = self.max_iter // self.evals_per_step
        for n in range(steps):
            fz = self.evaluate(loop, state, z)
            g = loop.observe(z, fz)
            if not loop.any_active or n == steps - 1:
                break
            state, z_next = self.step(loop, state, z, fz, g)
            z = loop.advance(z_next, z)
        z_out = self.finish(loop, state, z, fz, g)
        return z_out, loop.info(z_out)

    def init(self, loop: Loop, z0: Tensor) -> tuple[Any, Tensor]:
        """The solver's state before the first evaluation, and the first iterate to evaluate
        (default: no state, ``z0``). ``loop.fn`` may be replaced here (e.g. to run without a graph)."""
        return None, z0

    def evaluate(self, loop: Loop, state: Any, z: Tensor) -> Tensor:
        """fn(z) for the iterate ``z`` (default: one evaluation, ``loop.fn(z)``). A solver that knows
        it without evaluating (GMRES, by linearity) returns it here."""
        return loop.fn(z)

    @abc.abstractmethod
    def step(self, loop: Loop, state: Any, z: Tensor, fz: Tensor, g: Tensor) -> tuple[Any, Tensor]:
        """One step: from the iterate ``z`` just evaluated, fz = fn(z) and g = fz - z (the loop has
        recorded them), the new state and the next iterate. The loop freezes the samples that
        stopped (``loop.active``), so the step need not mask."""

    def finish(self, loop: Loop, state: Any, z: Tensor, fz: Tensor, g: Tensor) -> Tensor:
        """Called once after the last evaluation (the last iterate ``z``, fz, g); returns the state
        the solve returns: by default the best iterate (``lockstep``: the last iterate). A solver
        that keeps an inverse-Jacobian estimate puts it in ``loop.inverse_jacobian`` here."""
        return loop.best_z


_Tracker = Loop  # the former name of the loop's bookkeeping

__all__ = ["Solver", "SolverInfo", "FlatFn", "CheckEvery", "Loop", "default_check_every", "residual_norms"]
