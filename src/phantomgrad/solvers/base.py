"""What every solver shares: :class:`SolverInfo`, the per-sample bookkeeping and the :class:`Solver` base."""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from .._checks import boolean, in_range, one_of, positive_float, positive_int

if TYPE_CHECKING:
    from .broyden import BroydenInverse

FlatFn = Callable[[Tensor], Tensor]
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
    """
    return 1 if device.type == "cpu" else None


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


def check_start_and_keep(z0: Tensor, keep: Sequence[int], limit: int, runs: str, bound: str) -> tuple[int, ...]:
    """The kept steps as a tuple; a one-line error for a start that is not (batch, dim) or a kept
    step past ``limit`` (``runs`` says how many steps the solve runs, ``bound`` names the limit)."""
    if z0.dim() != 2:
        raise ValueError(f"solvers work on flat states of shape (batch, dim), got shape {tuple(z0.shape)}")
    steps = tuple(positive_int("keep (a step number)", t) for t in keep)
    if any(t > limit for t in steps):
        raise ValueError(f"keep asks for the state after step {max(steps)}, but {runs}; ask for steps <= {bound}")
    return steps


def residual_norms(z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """g = fz - z and the per-sample norms ||g||, ||g|| / ||fz|| (float64, no autograd on the norms)."""
    g = fz - z
    with torch.no_grad():
        abs_res = torch.linalg.vector_norm(g, dim=1).double()
        fz_norm = torch.linalg.vector_norm(fz, dim=1).double()
        rel_res = abs_res / fz_norm.clamp_min(torch.finfo(torch.float64).tiny)
    return g, abs_res, rel_res


def _bookkeeping(
    z: Tensor, fz: Tensor, active: Tensor, best_abs: Tensor, best_rel: Tensor, nstep: Tensor, tol: float, rel: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The arithmetic of one step of :class:`_Tracker`, without the best iterate (a pure function).

    With g = F(z) - z, r_abs = ||g|| and r_rel = ||g|| / ||F(z)|| per sample, and c the stopping
    criterion (r_rel for ``rel``, else r_abs): a sample that is active and whose iterate is finite
    improves (``better``) where c < its best c so far; it stays active where, in addition,
    c > ``tol``; ``nstep`` counts one more evaluation for every active sample.

    Returns g, r_abs, r_rel, c, better, the new active mask, best r_abs, best r_rel and nstep.
    """
    g, abs_res, rel_res = residual_norms(z, fz)
    with torch.no_grad():
        crit, best_crit = (rel_res, best_rel) if rel else (abs_res, best_abs)
        # rel_res = abs_res / (a positive number), so abs_res finite is the test (NaN fails it too)
        ok = active & (abs_res < torch.inf)  # still iterating, and this iterate is finite
        better = ok & (crit < best_crit)
        best_abs = torch.where(better, abs_res, best_abs)
        best_rel = torch.where(better, rel_res, best_rel)
        nstep = nstep + active
        # not converged; a non-finite sample stops too (info() tells the two apart)
        still_active = ok & (crit > tol)
    return g, abs_res, rel_res, crit, better, still_active, best_abs, best_rel, nstep


def _fused_step(
    z: Tensor,
    fz: Tensor,
    active: Tensor,
    best_abs: Tensor,
    best_rel: Tensor,
    nstep: Tensor,
    best_z: Tensor,
    tol: float,
    rel: bool,
) -> tuple[Tensor, ...]:
    """:func:`_bookkeeping` and the best iterate, z where ``better`` else the old best, in one function
    for ``torch.compile`` to fuse (``fused=True``); returns _bookkeeping's values and the new best z."""
    out = _bookkeeping(z, fz, active, best_abs, best_rel, nstep, tol, rel)
    better = out[4]
    return (*out, torch.where(better[:, None], z, best_z))


@functools.cache
def _compiled_fused_step() -> Callable[..., tuple[Tensor, ...]]:
    """:func:`_fused_step` under ``torch.compile`` (compiled on first call, once per shape and dtype;
    dynamic shapes after a second batch size)."""
    return torch.compile(_fused_step, fullgraph=True)


class _Tracker:
    """Per-sample bookkeeping common to every solver: residuals, stopping, best iterate, kept states.

    Everything is tracked on the device with masks. The host reads the number of samples still
    iterating only every ``check_every`` evaluations of F (never with ``None``); between checks it
    assumes some sample is still active, and the solvers mask every update so that a stopped
    sample stays frozen. Extra steps after every sample stopped therefore change nothing.
    """

    def __init__(
        self,
        z0: Tensor,
        tol: float,
        stop: str,
        keep_trace: bool,
        check_every: int | None,
        keep: Sequence[int],
        max_iter: int,
        fused: bool = False,
    ):
        batch = z0.shape[0]
        device = z0.device
        self.tol = tol
        self.stop = stop
        self.check_every = check_every
        self.fused = fused
        self.best_z = z0
        self.best_abs = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.best_rel = torch.full_like(self.best_abs, float("inf"))
        self.nstep = torch.zeros(batch, dtype=torch.long, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.trace: list[Tensor] | None = [] if keep_trace else None
        self.keep = tuple(keep)
        self.max_iter = max_iter
        self.states: list[Tensor | None] = [None] * len(self.keep)
        self.keep_inverse = False  # solve(keep_inverse=True): the solver puts its estimate in inverse_jacobian
        self.inverse_jacobian: BroydenInverse | None = None
        self.evals = 0  # evaluations of F observed so far (a host counter)
        # What the host knows: any_active is False only after a check found every sample stopped;
        # all_active is True only while the last check found every sample iterating (then the
        # solvers skip their masks), and both are refreshed at every check.
        self.any_active = True
        self.all_active = True

    @property
    def keeping_now(self) -> bool:
        """Whether the state after this many evaluations was asked for (``solve(keep=...)``); the
        state after the last evaluation is the returned one, filled in by :meth:`info`."""
        return self.evals in self.keep and self.evals < self.max_iter

    def observe(self, z: Tensor, fz: Tensor) -> Tensor:
        """Record the residual of iterate ``z`` (with fn(z) = fz); return the residual fn(z) - z."""
        self.evals += 1
        check = self.check_every is not None and self.evals % self.check_every == 0
        state = (z, fz, self.active, self.best_abs, self.best_rel, self.nstep)
        rel = self.stop == "rel"
        if self.fused:
            # one compiled function: one generated kernel instead of 17 operators (inlined when
            # the caller is itself being compiled)
            step = _fused_step if torch.compiler.is_compiling() else _compiled_fused_step()
            g, _, _, crit, better, active, self.best_abs, self.best_rel, self.nstep, best_z = step(
                *state, self.best_z, self.tol, rel
            )
        else:
            g, _, _, crit, better, active, self.best_abs, self.best_rel, self.nstep = _bookkeeping(
                *state, self.tol, rel
            )
        if self.trace is not None:
            self.trace.append(torch.where(self.active, crit, torch.nan))
        n_better = None
        if check:
            with torch.no_grad():
                n_better, n_active = torch.stack((better.sum(), active.sum())).tolist()  # host sync (check_every)
            batch = better.shape[0]
            self.all_active, self.any_active = n_active == batch, n_active > 0
        else:
            self.all_active = False
        if self.fused:
            self.best_z = best_z
        elif n_better == better.shape[0]:  # every sample improved: keep a reference, copy nothing
            self.best_z = z
        elif n_better != 0:  # some did, or the host did not look
            self.best_z = torch.where(better[:, None], z, self.best_z)
        self.active = active
        return g

    def advance(self, z_next: Tensor, z: Tensor) -> Tensor:
        """The next iterate: ``z_next`` for samples still iterating, ``z`` (frozen) for the others.

        Also records it for ``solve(keep=...)`` when this step was asked for."""
        if not self.all_active:
            z_next = torch.where(self.active[:, None], z_next, z)
        if self.keeping_now:
            self.keep_state(z_next)
        return z_next

    def keep_state(self, z_next: Tensor) -> None:
        """Store the state after ``self.evals`` evaluations: ``z_next`` where the sample iterates on,
        its best iterate (what the solve returns for it) where it has stopped."""
        state = torch.where(self.active[:, None], z_next, self.best_z)
        for j, t in enumerate(self.keep):
            if t == self.evals:
                self.states[j] = state

    def info(self, fallback: Tensor) -> SolverInfo:
        crit = self.best_rel if self.stop == "rel" else self.best_abs
        converged = crit <= self.tol
        trace = self.trace
        if trace is not None and self.check_every is not None:
            trace = trace[: int(self.nstep.max())]  # host sync, only with trace=True
        return SolverInfo(
            abs_residual=self.best_abs,
            rel_residual=self.best_rel,
            nstep=self.nstep,
            converged=converged,
            # A sample stops when it converges or when an iterate is not finite; a sample that
            # stopped unconverged therefore met a non-finite value (no per-step bookkeeping needed).
            nonfinite=~(self.active | converged),
            fallback=fallback,
            trace=trace,
            # steps not reached: every sample had stopped, so its state is the returned one
            states=[self.best_z if s is None else s for s in self.states] if self.keep else None,
            inverse_jacobian=self.inverse_jacobian,
        )


class Solver(abc.ABC):
    """Base class of the fixed-point solvers: validates the common keywords and defines :meth:`solve`.

    A solver finds z with z = fn(z) for a batched map ``fn`` on flat states (B, D). A new solver
    subclasses this and implements :meth:`_iterate`, and gets one entry in ``SOLVERS``.

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
            (:func:`default_check_every` gives the reason).
        fused: run each step's bookkeeping (the residual F(z) - z, both norms, the stopping and
            best-iterate masks, the best iterate) as one ``torch.compile``'d function, one generated
            kernel instead of 17 operators: fewer kernel launches on a GPU (not measured yet); on
            a CPU it measured no faster (BENCHMARKS.md). Compiles on the first solve (seconds;
            needs a working inductor: a C++ compiler on CPU, Triton on CUDA) and again for a new
            shape or dtype. Results equal
            the unfused ones up to the rounding of the norms' sums (float reductions in another
            order). FixedPoint, Anderson and Broyden take it.
    """

    def __init__(
        self,
        *,
        max_iter: int = 50,
        tol: float = 1e-4,
        stop: Literal["rel", "abs"] = "rel",
        trace: bool = False,
        check_every: CheckEvery = "auto",
        fused: bool = False,
    ):
        self.max_iter = positive_int("max_iter", max_iter)
        self.tol = positive_float("tol (use a small positive number such as 1e-6)", tol)
        self.stop = one_of("stop", stop, ("rel", "abs"))
        self.trace = boolean("trace", trace)
        self.check_every = _check_check_every(check_every)
        self.fused = boolean("fused", fused)

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({keys})"

    def solve(
        self, fn: FlatFn, z0: Tensor, *, keep: Sequence[int] = (), keep_inverse: bool = False
    ) -> tuple[Tensor, SolverInfo]:
        """Find z = fn(z) for a batch of flat states ``z0`` of shape (B, D).

        Returns the iterate with the lowest residual seen for each sample, and its
        :class:`SolverInfo`.

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
        keep = check_start_and_keep(
            z0, keep, self.max_iter, f"the solve runs at most max_iter={self.max_iter} steps", "max_iter"
        )
        check_every = default_check_every(z0.device) if self.check_every == "auto" else self.check_every
        tracker = _Tracker(z0, self.tol, self.stop, self.trace, check_every, keep, self.max_iter, self.fused)
        fallback = torch.zeros(z0.shape[0], dtype=torch.bool, device=z0.device)
        tracker.keep_inverse = boolean("keep_inverse", keep_inverse)
        self._iterate(fn, z0, tracker, fallback)
        return tracker.best_z, tracker.info(fallback)

    @abc.abstractmethod
    def _iterate(self, fn: FlatFn, z: Tensor, tracker: _Tracker, fallback: Tensor) -> None:
        """Run the iteration from ``z`` (B, D) for at most ``self.max_iter`` evaluations of ``fn``.

        The contract: pass every evaluated iterate to ``tracker.observe(z, fn(z))`` (it returns the
        residual fn(z) - z and decides which samples stop); stop once ``tracker.any_active`` is
        False; build each next iterate with ``tracker.advance(z_next, z)``, which freezes stopped
        samples (or mask by ``tracker.active`` and call ``tracker.keep_state`` yourself). Set
        ``fallback[i]`` where sample i took a safeguard step, and where ``tracker.keep_inverse`` is
        True put an inverse-Jacobian estimate in ``tracker.inverse_jacobian``. The tracker returns the best
        iterate, so this method returns nothing.
        """
