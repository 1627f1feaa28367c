"""The bookkeeping of the one solver loop (:meth:`phantomgrad.solvers.Solver.solve`): residuals,
per-sample stopping, the best iterate, host checks, the trace and the kept states, in :class:`Loop`."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import Tensor

from .._checks import positive_int
from .info import SolverInfo
from .inverse import BroydenInverse

FlatFn = Callable[[Tensor], Tensor]


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
    """The arithmetic of one step of :class:`Loop`, without the best iterate (a pure function).

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


class Loop:
    """What the one loop of :meth:`Solver.solve` knows, handed to a solver's ``init`` and ``step``.

    Everything is tracked on the device with masks. The host reads the number of samples still
    iterating only every ``check_every`` steps (never with ``None``); between checks it assumes some
    sample is still active, and every update is masked so that a stopped sample stays frozen. Extra
    steps after every sample stopped therefore change nothing.

    A solver's ``step`` may read: ``active`` (B,) the samples still iterating after the iterate just
    observed, ``all_active`` (the host knows every sample iterates: masks may be skipped),
    ``prev_active``/``prev_all_active`` (the same before that observation: the samples that took
    the step to it), ``fn`` (the map, for a solver that evaluates it more than once per step),
    ``keep_inverse``; it may set ``fallback[i]`` (sample i took a safeguard step) and
    ``inverse_jacobian``.

    In ``lockstep`` (:class:`Unrolled`, :class:`Reversible`) every sample takes every step: there is
    no freezing and no best iterate; the info describes the last iterate observed, ``nonfinite``
    flags a sample that met a non-finite residual at any step, and the host stops once every sample
    has converged or gone non-finite.
    """

    def __init__(
        self,
        fn: FlatFn,
        z0: Tensor,
        *,
        tol: float,
        stop: str,
        trace: bool,
        check_every: int | None,
        keep: Sequence[int],
        max_iter: int,
        fused: bool = False,
        lockstep: bool = False,
        evals_per_step: int = 1,
        keep_inverse: bool = False,
    ):
        batch = z0.shape[0]
        device = z0.device
        self.fn = fn
        self.tol = tol
        self.rel = stop == "rel"
        self.check_every = check_every
        self.fused = fused
        self.lockstep = lockstep
        self.evals_per_step = evals_per_step
        self.best_z = z0
        self.best_abs = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.best_rel = torch.full_like(self.best_abs, float("inf"))
        self.nstep = torch.zeros(batch, dtype=torch.long, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.prev_active = self.active
        self.fallback = torch.zeros(batch, dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)  # lockstep: any step non-finite
        self.finite = torch.ones(batch, dtype=torch.bool, device=device)  # lockstep: the last step finite
        self.trace: list[Tensor] | None = [] if trace else None
        self.keep = tuple(keep)
        self.max_iter = max_iter
        self.states: list[Tensor | None] = [None] * len(self.keep)
        self.keep_inverse = keep_inverse  # solve(keep_inverse=True): the solver puts its estimate here
        self.inverse_jacobian: BroydenInverse | None = None
        self.evals = 0  # iterates observed so far (a host counter)
        # What the host knows: any_active is False only after a check found every sample stopped;
        # all_active is True only while the last check found every sample iterating (then the
        # solvers skip their masks), and both are refreshed at every check.
        self.any_active = True
        self.all_active = True
        self.prev_all_active = True

    @property
    def keeping_now(self) -> bool:
        """Whether the state after this many evaluations was asked for (``solve(keep=...)``); the
        state after the last evaluation is the returned one, filled in by :meth:`info`."""
        return self.evals in self.keep and self.evals < self.max_iter

    def observe(self, z: Tensor, fz: Tensor) -> Tensor:
        """Record the residual of iterate ``z`` (with fn(z) = fz); return the residual fn(z) - z."""
        self.evals += 1
        self.prev_active, self.prev_all_active = self.active, self.all_active
        check = self.check_every is not None and self.evals % self.check_every == 0
        if self.lockstep:
            return self._observe_lockstep(z, fz, check)
        state = (z, fz, self.active, self.best_abs, self.best_rel, self.nstep)
        if self.fused:
            # one compiled function: one generated kernel instead of 17 operators (inlined when
            # the caller is itself being compiled)
            step = _fused_step if torch.compiler.is_compiling() else _compiled_fused_step()
            g, _, _, crit, better, active, self.best_abs, self.best_rel, self.nstep, best_z = step(
                *state, self.best_z, self.tol, self.rel
            )
        else:
            g, _, _, crit, better, active, self.best_abs, self.best_rel, self.nstep = _bookkeeping(
                *state, self.tol, self.rel
            )
        if self.trace is not None:
            self.trace.append(torch.where(self.active, crit, torch.nan))
        n_better = None
        if check:
            with torch.no_grad():
                n_better, n_active = torch.stack((better, active)).sum(1).tolist()  # host sync (check_every)
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

    def _observe_lockstep(self, z: Tensor, fz: Tensor, check: bool) -> Tensor:
        with torch.no_grad():
            g, abs_res, rel_res = residual_norms(z, fz)
            crit = rel_res if self.rel else abs_res
            self.finite = (abs_res + rel_res) < torch.inf
            self.nonfinite = self.nonfinite | ~self.finite
            self.best_abs, self.best_rel, self.best_z = abs_res, rel_res, z
            if self.trace is not None:
                self.trace.append(crit)
            if check:  # host sync (check_every): stop once every sample converged or went non-finite
                self.active = (crit > self.tol) & ~self.nonfinite
                self.any_active = bool(self.active.any())
        self.all_active = True  # every sample steps
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
        state = z_next if self.lockstep else torch.where(self.active[:, None], z_next, self.best_z)
        for j, t in enumerate(self.keep):
            if t == self.evals:
                self.states[j] = state

    def info(self, z_out: Tensor) -> SolverInfo:
        """The :class:`SolverInfo` of a solve that returns ``z_out``."""
        crit = self.best_rel if self.rel else self.best_abs
        trace = self.trace
        if self.lockstep:
            converged = self.finite & (crit <= self.tol)
            nonfinite = self.nonfinite
            nstep = torch.full_like(self.nstep, self.evals * self.evals_per_step)
        else:
            converged = crit <= self.tol
            # A sample stops when it converges or when an iterate is not finite; a sample that
            # stopped unconverged therefore met a non-finite value (no per-step bookkeeping needed).
            nonfinite = ~(self.active | converged)
            nstep = self.nstep
            if trace is not None and self.check_every is not None:
                trace = trace[: int(self.nstep.max())]  # host sync, only with trace=True
        return SolverInfo(
            abs_residual=self.best_abs,
            rel_residual=self.best_rel,
            nstep=nstep,
            converged=converged,
            nonfinite=nonfinite,
            fallback=self.fallback,
            trace=trace,
            # steps not reached: every sample had stopped, so its state is the returned one
            states=[z_out if s is None else s for s in self.states] if self.keep else None,
            inverse_jacobian=self.inverse_jacobian,
        )


__all__ = ["Loop", "FlatFn", "check_start_and_keep", "residual_norms"]
