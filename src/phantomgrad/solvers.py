"""Forward (and backward) fixed-point solvers.

Every solver finds z with z = fn(z) for a batched map ``fn`` on flat states of
shape ``(B, D)`` (the DEQ layer packs tuple states into that form). A solver
knows nothing about gradients: it is handed a function and a start and returns
the best iterate it saw together with a :class:`SolverInfo`.

Conventions shared by all solvers
---------------------------------
* ``max_iter`` is the largest number of evaluations of ``fn``; the iterate
  returned is one whose residual was measured, so the reported residual belongs
  to the returned state exactly.
* The residual of an iterate z is r(z) = ||fn(z) - z|| (per sample, 2-norm over D).
  ``stop="abs"`` stops a sample when r(z) <= tol, ``stop="rel"`` when
  r(z) / ||fn(z)|| <= tol.
* Samples stop independently: once a sample meets the tolerance it is frozen, and
  for every sample the iterate with the lowest residual seen is returned.
* Non-finite residuals never become the best iterate; ``info.nonfinite`` flags a
  sample for which a non-finite value was produced.
* When autograd is recording (``pg.Backprop``) the solvers stay differentiable:
  history buffers are written out of place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FlatFn = Callable[[Tensor], Tensor]


@dataclass
class SolverInfo:
    """What a solve returns besides the state; every field is per sample, shape (B,)."""

    abs_residual: Tensor
    rel_residual: Tensor
    nstep: Tensor
    converged: Tensor
    nonfinite: Tensor
    fallback: Tensor
    trace: list[Tensor] | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> dict[str, float]:
        """Batch means as plain floats, for logs and progress bars."""
        return {
            "abs_residual": float(self.abs_residual.float().mean()),
            "rel_residual": float(self.rel_residual.float().mean()),
            "nstep": float(self.nstep.float().mean()),
            "converged": float(self.converged.float().mean()),
            "nonfinite": int(self.nonfinite.sum()),
            "fallback": int(self.fallback.sum()),
        }


class _Tracker:
    """Per-sample bookkeeping common to every solver: residuals, stopping, best iterate."""

    def __init__(self, z0: Tensor, tol: float, stop: str, keep_trace: bool):
        batch = z0.shape[0]
        device = z0.device
        self.tol = tol
        self.stop = stop
        self.best_z = z0
        self.best_abs = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.best_rel = torch.full_like(self.best_abs, float("inf"))
        self.nstep = torch.zeros(batch, dtype=torch.long, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
        self.trace: list[Tensor] | None = [] if keep_trace else None

    def observe(self, z: Tensor, fz: Tensor) -> Tensor:
        """Record the residual of iterate ``z`` (with fn(z) = fz); return residual fn(z) - z."""
        g = fz - z
        with torch.no_grad():
            abs_res = g.detach().norm(dim=1).double()
            rel_res = abs_res / fz.detach().norm(dim=1).double().clamp_min(torch.finfo(torch.float64).tiny)
            finite = torch.isfinite(abs_res) & torch.isfinite(rel_res)
            self.nonfinite |= ~finite & self.active
            crit = rel_res if self.stop == "rel" else abs_res
            better = self.active & finite & (crit < (self.best_rel if self.stop == "rel" else self.best_abs))
            self.best_abs = torch.where(better, abs_res, self.best_abs)
            self.best_rel = torch.where(better, rel_res, self.best_rel)
            self.nstep = self.nstep + self.active.long()
            if self.trace is not None:
                self.trace.append(torch.where(self.active, crit, torch.nan))
            done = finite & (crit <= self.tol)
        self.best_z = torch.where(better[:, None], z, self.best_z)
        self.active = self.active & ~done & finite
        return g

    def info(self, fallback: Tensor) -> SolverInfo:
        crit = self.best_rel if self.stop == "rel" else self.best_abs
        return SolverInfo(
            abs_residual=self.best_abs,
            rel_residual=self.best_rel,
            nstep=self.nstep,
            converged=crit <= self.tol,
            nonfinite=self.nonfinite,
            fallback=fallback,
            trace=self.trace,
        )


class Solver:
    """Base class: validates the common keywords and defines ``solve``.

    Args:
        max_iter: largest number of evaluations of the map.
        tol: stopping tolerance on the residual (see ``stop``).
        stop: ``"rel"`` for ||F(z)-z|| / ||F(z)|| <= tol, ``"abs"`` for ||F(z)-z|| <= tol.
        trace: keep the per-iteration residual of every sample in ``info.trace``.
    """

    def __init__(self, max_iter: int = 50, tol: float = 1e-4, stop: Literal["rel", "abs"] = "rel", trace: bool = False):
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}; use a small positive number such as 1e-6")
        if stop not in ("rel", "abs"):
            raise ValueError(f"stop must be 'rel' or 'abs', got {stop!r}")
        self.max_iter = max_iter
        self.tol = float(tol)
        self.stop = stop
        self.trace = trace

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({keys})"

    def solve(self, fn: FlatFn, z0: Tensor) -> tuple[Tensor, SolverInfo]:
        """Find z = fn(z) for a batch of flat states ``z0`` of shape (B, D)."""
        if z0.dim() != 2:
            raise ValueError(f"solvers work on flat states of shape (batch, dim), got shape {tuple(z0.shape)}")
        tracker = _Tracker(z0, self.tol, self.stop, self.trace)
        fallback = torch.zeros(z0.shape[0], dtype=torch.bool, device=z0.device)
        self._iterate(fn, z0, tracker, fallback)
        return tracker.best_z, tracker.info(fallback)

    def _iterate(self, fn: FlatFn, z: Tensor, tracker: _Tracker, fallback: Tensor) -> None:
        raise NotImplementedError


def _check_damping(name: str, value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


class FixedPoint(Solver):
    """Damped fixed-point (Picard/Krasnosel'skii-Mann) iteration.

    z_{n+1} = z_n + damping * (F(z_n) - z_n). Converges for a contraction F and any
    damping in (0, 1]; smaller damping trades speed for stability.
    """

    def __init__(self, damping: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.damping = _check_damping("damping", damping)

    def _iterate(self, fn, z, tracker, fallback):
        for _ in range(self.max_iter):
            fz = fn(z)
            g = tracker.observe(z, fz)
            if not tracker.active.any():
                return
            step = g if self.damping == 1.0 else self.damping * g
            z = torch.where(tracker.active[:, None], z + step, z)


def _write(buf: Tensor, slot: int, value: Tensor) -> Tensor:
    """buf[:, slot] = value, in place unless autograd needs the old buffer."""
    if buf.requires_grad or value.requires_grad:
        index = torch.tensor([slot], device=buf.device)
        return buf.index_copy(1, index, value.unsqueeze(1).to(buf.dtype))
    buf[:, slot] = value
    return buf


class Anderson(Solver):
    """Anderson acceleration (type II) with a scale-aware ridge.

    With residuals g_i = F(z_i) - z_i, the next iterate mixes the last ``m`` iterates:
    in difference form (Walker & Ni 2011), with dG, dZ the differences of the
    stored residuals and iterates,

        gamma   = argmin ||g_n - dG gamma||^2 + ridge * s * ||gamma||^2
        z_{n+1} = z_n + mixing * g_n - (dZ + mixing * dG) gamma,

    where s = trace(dG^T dG) / m makes the ridge relative to the current scale of
    the residuals, so the regularisation shrinks as the solve converges and it still
    reaches 1e-10 relative residual in float64 (a fixed absolute ridge stalls).
    Where the small m x m system is singular or not finite anyway, that sample takes
    a plain damped step instead, and ``info.fallback`` reports it.
    """

    def __init__(self, m: int = 5, ridge: float = 1e-4, mixing: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"m (Anderson history size) must be an integer >= 1, got {m!r}")
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge!r}")
        self.m = m
        self.ridge = float(ridge)
        self.mixing = _check_damping("mixing", mixing)

    def _iterate(self, fn, z, tracker, fallback):
        batch, dim = z.shape
        m = self.m
        dZ = z.new_zeros(batch, m, dim)
        dG = z.new_zeros(batch, m, dim)
        z_prev = g_prev = None
        tiny = torch.finfo(z.dtype).tiny
        for n in range(self.max_iter):
            fz = fn(z)
            g = tracker.observe(z, fz)
            if not tracker.active.any():
                return
            if g_prev is not None:
                slot = (n - 1) % m
                dZ = _write(dZ, slot, z - z_prev)
                dG = _write(dG, slot, g - g_prev)
            z_prev, g_prev = z, g
            used = min(n, m)
            z_next = z + self.mixing * g
            if used > 0:
                Gu, Zu = dG[:, :used], dZ[:, :used]
                gram = Gu @ Gu.transpose(1, 2)  # (B, used, used)
                scale = gram.diagonal(dim1=1, dim2=2).sum(-1) / used
                eye = torch.eye(used, dtype=z.dtype, device=z.device)
                reg = (self.ridge * scale + tiny)[:, None, None] * eye
                rhs = (Gu @ g.unsqueeze(-1))  # (B, used, 1)
                gamma, status = torch.linalg.solve_ex(gram + reg, rhs)
                ok = (status == 0) & torch.isfinite(gamma).all(dim=(1, 2))
                gamma = torch.where(ok[:, None, None], gamma, torch.zeros_like(gamma))
                fallback |= ~ok & tracker.active
                correction = ((Zu + self.mixing * Gu).transpose(1, 2) @ gamma).squeeze(-1)
                z_next = z_next - correction
            z = torch.where(tracker.active[:, None], z_next, z)


class Broyden(Solver):
    """Limited-memory 'good' Broyden method on g(z) = F(z) - z.

    Keeps an approximation H of the inverse Jacobian of g, H = -I + sum_i u_i v_i^T,
    and steps z_{n+1} = z_n - H g_n. After a step dz with change dg in g, the
    Sherman-Morrison update is

        u = (dz - H dg) / (dz^T H dg),   v^T = dz^T H.

    The rank-one pairs live in a ring buffer of ``memory`` slots: memory does not
    grow with ``max_iter``; once full, the oldest pair is overwritten.
    """

    def __init__(self, memory: int = 20, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be an integer >= 1, got {memory!r}")
        self.memory = memory

    def _iterate(self, fn, z, tracker, fallback):
        batch, dim = z.shape
        U = z.new_zeros(batch, self.memory, dim)
        V = z.new_zeros(batch, self.memory, dim)
        eps = torch.finfo(z.dtype).eps

        def apply_h(y: Tensor) -> Tensor:  # H y = -y + U^T... (per sample)
            return -y + ((V @ y.unsqueeze(-1)).transpose(1, 2) @ U).squeeze(1)

        def apply_ht(x: Tensor) -> Tensor:  # x^T H
            return -x + ((U @ x.unsqueeze(-1)).transpose(1, 2) @ V).squeeze(1)

        fz = fn(z)
        g = tracker.observe(z, fz)
        for n in range(1, self.max_iter):
            if not tracker.active.any():
                return
            active = tracker.active[:, None]
            dz = torch.where(active, -apply_h(g), torch.zeros_like(g))
            z = z + dz
            fz = fn(z)
            g_new = tracker.observe(z, fz)
            dg = g_new - g
            g = g_new
            h_dg = apply_h(dg)
            denom = (dz * h_dg).sum(-1, keepdim=True)
            good = active & (denom.abs() > eps * dz.norm(dim=-1, keepdim=True) * h_dg.norm(dim=-1, keepdim=True)) & torch.isfinite(denom)
            safe = torch.where(good, denom, torch.ones_like(denom))
            u = torch.where(good, (dz - h_dg) / safe, torch.zeros_like(dz))
            v = torch.where(good, apply_ht(dz), torch.zeros_like(dz))
            slot = (n - 1) % self.memory
            U = _write(U, slot, u)
            V = _write(V, slot, v)


SOLVERS: dict[str, type[Solver]] = {"fixed_point": FixedPoint, "anderson": Anderson, "broyden": Broyden}


def make_solver(name: str, **kwargs) -> Solver:
    """Build a solver by name (``fixed_point``, ``anderson``, ``broyden``), for configs."""
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
    return cls(**kwargs)
