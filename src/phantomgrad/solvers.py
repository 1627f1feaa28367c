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
import math
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
        self.any_active = self.all_active = True

    def observe(self, z: Tensor, fz: Tensor) -> Tensor:
        """Record the residual of iterate ``z`` (with fn(z) = fz); return residual fn(z) - z.

        Afterwards ``any_active`` / ``all_active`` say (as Python bools, from one host
        sync) whether some / every sample still iterates, so solvers can skip masking.
        """
        g = fz - z
        with torch.no_grad():
            # Few kernels on purpose: on a GPU a small F is launch-bound, and this runs every step.
            abs_res = torch.linalg.vector_norm(g.detach(), dim=1).double()
            rel_res = abs_res / torch.linalg.vector_norm(fz.detach(), dim=1).double().clamp_min(torch.finfo(torch.float64).tiny)
            finite = (abs_res + rel_res) < math.inf  # both are >= 0: the sum is finite iff both are (NaN fails too)
            ok = self.active & finite  # still iterating, and this iterate is finite
            self.nonfinite |= self.active ^ ok  # active but not finite
            crit = rel_res if self.stop == "rel" else abs_res
            better = ok & (crit < (self.best_rel if self.stop == "rel" else self.best_abs))
            self.best_abs = torch.where(better, abs_res, self.best_abs)
            self.best_rel = torch.where(better, rel_res, self.best_rel)
            self.nstep += self.active
            if self.trace is not None:
                self.trace.append(torch.where(self.active, crit, torch.nan))
            active = ok & (crit > self.tol)  # not converged; a non-finite sample stops too
            n_better, n_active = torch.stack((better.sum(), active.sum())).tolist()  # the one host sync per step
            batch = better.shape[0]
            all_better, any_better = n_better == batch, n_better > 0
            self.all_active, self.any_active = n_active == batch, n_active > 0
        if all_better:  # the common case: keep a reference, copy nothing
            self.best_z = z
        elif any_better:
            self.best_z = torch.where(better[:, None], z, self.best_z)
        self.active = active
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
            if not tracker.any_active:
                return
            # z + 1 * (F(z) - z) is F(z): no arithmetic for the undamped step
            z_next = fz if self.damping == 1.0 else torch.add(z, g, alpha=self.damping)
            z = z_next if tracker.all_active else torch.where(tracker.active[:, None], z_next, z)


def _write(buf: Tensor, slot: int, value: Tensor) -> Tensor:
    """buf[:, slot] = value, in place unless autograd needs the old buffer."""
    if buf.requires_grad or value.requires_grad:
        index = torch.tensor([slot], device=buf.device)
        return buf.index_copy(1, index, value.unsqueeze(1).to(buf.dtype))
    buf[:, slot] = value
    return buf


def _write_diff(buf: Tensor, slot: int, a: Tensor, b: Tensor) -> Tensor:
    """buf[:, slot] = a - b, computed straight into the buffer unless autograd needs the old buffer."""
    if buf.requires_grad or a.requires_grad or b.requires_grad:
        return _write(buf, slot, a - b)
    torch.sub(a, b, out=buf[:, slot])
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

    Implementation (one pass over the history per product): the history stores dG and
    dY = dZ + mixing * dG, the differences of the plain steps y_i = z_i + mixing * g_i
    (y_i = F(z_i) when mixing = 1), so z_{n+1} = y_n - dY gamma needs no temporary; the
    current residual sits in an extra row of the dG buffer, so one batched product gives
    both the Gram matrix dG^T dG and the right-hand side dG^T g_n.
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
        G = z.new_zeros(batch, m + 1, dim)  # rows 0..m-1: dG ring buffer; row m: the current residual
        dY = z.new_zeros(batch, m, dim)
        y_prev = None
        tiny = torch.finfo(z.dtype).tiny
        for n in range(self.max_iter):
            fz = fn(z)
            g = tracker.observe(z, fz)
            if not tracker.any_active:
                return
            y = fz if self.mixing == 1.0 else torch.add(z, g, alpha=self.mixing)
            if y_prev is not None:
                slot = (n - 1) % m
                G = _write_diff(G, slot, g, G[:, m])
                dY = _write_diff(dY, slot, y, y_prev)
            G = _write(G, m, g)
            y_prev = y
            used = min(n, m)
            z_next = y
            if used > 0:
                prod = G @ G.transpose(1, 2)  # (B, m+1, m+1): Gram matrix and right-hand side at once
                gram, rhs = prod[:, :used, :used], prod[:, :used, m:]  # the ring fills slots 0, 1, ... in order
                diag = gram.diagonal(dim1=1, dim2=2)
                scale = diag.sum(-1) / used
                diag.add_((self.ridge * scale + tiny)[:, None])  # the ridge, in place: prod is this step's own
                gamma, status = torch.linalg.solve_ex(gram, rhs)
                # finite iff its largest |entry| is (NaN propagates through amax)
                ok = (status == 0) & (torch.linalg.vector_norm(gamma, ord=math.inf, dim=(1, 2)) < math.inf)
                gamma = torch.where(ok[:, None, None], gamma, 0.0)
                fallback |= ~ok & tracker.active
                # z_next = y - dY^T gamma, in one fused kernel
                z_next = torch.baddbmm(y.unsqueeze(1), gamma.transpose(1, 2), dY[:, :used], alpha=-1).squeeze(1)
            z = z_next if tracker.all_active else torch.where(tracker.active[:, None], z_next, z)


class Broyden(Solver):
    """Limited-memory 'good' Broyden method on g(z) = F(z) - z.

    Keeps an approximation H of the inverse Jacobian of g, H = -I + sum_i u_i v_i^T,
    and steps z_{n+1} = z_n - H g_n. After a step dz with change dg in g, the
    Sherman-Morrison update is

        u = (dz - H dg) / (dz^T H dg),   v^T = dz^T H.

    The rank-one pairs live in a ring buffer of ``memory`` slots: memory does not
    grow with ``max_iter``; once full, the oldest update is forgotten.

    Implementation (compact form, only the steps are stored). Every step is a full step
    s_n = -H_n g_n, so with w = H_n g_{n+1}: H_n dg = w + s_n, u_n = -w / (s_n^T (w + s_n))
    and the next step is s_{n+1} = -w ||s_n||^2 / (s_n^T (w + s_n)) = u_n ||s_n||^2. Hence

        H_{n+1} = H_n + u_n s_n^T H_n = (I + c_n s_{n+1} s_n^T) H_n,   c_n = 1 / ||s_n||^2

    (c_n = 0 where the update is skipped), and H y = -y + sum_j c_j beta_j s_{j+1} where
    beta solves a small unit lower-triangular system built from the steps' Gram matrix
    and beta's right-hand side is -S^T y. One step of the solver therefore reads the
    stored steps twice (one product S^T [g, s] that also yields the new Gram row, one
    expansion) where the (u, v) form reads 2 x ``memory`` vectors four times, and it stores
    one vector per update instead of two. Up to rounding, the iterates are those of the
    (u, v) form as long as no update has been forgotten; once the ring is full the oldest
    factor is dropped. Under autograd (``pg.Backprop``) the steps are kept as separate
    tensors and the products are taken vector by vector, so the graph holds each step
    once instead of a copy of the buffer per iteration.
    """

    def __init__(self, memory: int = 20, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be an integer >= 1, got {memory!r}")
        self.memory = memory

    def _iterate(self, fn, z, tracker, fallback):
        batch, dim = z.shape
        mem = self.memory
        eps = torch.finfo(z.dtype).eps
        fz = fn(z)
        g = tracker.observe(z, fz)
        # The autograd path only where a graph is being built (pg.Backprop): grad mode alone is
        # not enough, e.g. Implicit's backward solve runs under enable_grad on VJPs without graphs.
        differentiable = torch.is_grad_enabled() and g.requires_grad
        steps: list[Tensor | None] = [None] * mem  # autograd path: the stored steps by slot
        S = None if differentiable else z.new_zeros(batch, mem, dim)  # no-grad path: the stored steps by slot
        P = z.new_zeros(batch, mem, mem)  # Gram matrix of the stored steps, by slot
        c = z.new_zeros(batch, mem)  # c_j of the factor (I + c_j s_{j+1} s_j^T), at the slot of s_j
        written = 0  # steps written to the ring so far
        # rotations[r] = (r, r+1, ..., mem-1, 0, ..., r-1): the slots oldest first once the ring is full
        ar = torch.arange(mem, device=z.device)
        rotations = (ar[:, None] + ar[None, :]) % mem
        s = g if tracker.all_active else torch.where(tracker.active[:, None], g, 0.0)  # s_0 = -H_0 g_0, H_0 = -I
        for n in range(1, self.max_iter):
            if not tracker.any_active:
                return
            active = tracker.active[:, None]  # the samples that take step s
            z = z + s
            fz = fn(z)
            g = tracker.observe(z, fz)

            # w = H g with the q stored factors, oldest first: slots first, first + 1, ... (mod mem).
            # Until the ring is full these are slots 0..q-1 (plain slices); afterwards a rotation,
            # indexed with a row of `rotations` that already lives on z's device (a Python list as
            # index would be copied to the GPU, and wait for it, several times per step).
            q = min(written, mem)
            first = (written - q) % mem  # the oldest stored step's slot
            full = q == mem and first != 0
            order_t = rotations[first] if full else None

            def by_order(t: Tensor, dim: int) -> Tensor:
                return t.index_select(dim, order_t) if full else t.narrow(dim, 0, q)

            if q == 0:
                w = -g
                dots_s = None
            else:
                if differentiable:
                    stored = [steps[(first + t) % mem] for t in range(q)]
                    dots_g = torch.stack([(sk * g).sum(-1) for sk in stored], 1)  # s_k^T g, (B, q)
                    dots_s = torch.stack([(sk * s).sum(-1) for sk in stored], 1)  # s_k^T s, the new Gram row
                else:
                    rows = S if q == mem else S[:, :q]
                    # The layout of this skinny product matters (B=32, q=20, D=30720): cuBLAS runs it
                    # about 15x slower than two matrix-vector products (1.03 ms vs 70 us on an H200);
                    # on CPU one product with a column-major (D x 2) operand is fastest (3.0 ms, vs
                    # 9.2 ms row-major and 16 ms as two matrix-vector products). scripts/gpu_bmm_layouts.py
                    if rows.is_cuda:
                        prod = torch.cat((rows @ g.unsqueeze(-1), rows @ s.unsqueeze(-1)), -1)
                    else:
                        prod = rows @ torch.stack((g, s), 1).mT
                    prod = by_order(prod, 1)  # (B, q, 2)
                    dots_g, dots_s = prod[..., 0], prod[..., 1]
                cq = by_order(c, 1)
                gram = by_order(by_order(P, 1), 2)
                # (I - L) beta = -S^T g,  L[j, i] = c_i s_j^T s_{i+1} for i < j. The solver reads only
                # the strictly lower triangle (unit diagonal), so it gets -L in columns 0..q-2 and
                # whatever is above the diagonal, with no eye, tril or zero fill.
                if q == 1:
                    minus_low = gram  # 1 x 1: only the (implied) unit diagonal is used
                else:  # the last column is above the diagonal: any values do
                    minus_low = torch.cat((gram[:, :, 1:] * cq[:, None, : q - 1].neg(), gram[:, :, :1]), -1)
                beta = torch.linalg.solve_triangular(minus_low, dots_g.neg().unsqueeze(-1), upper=False, unitriangular=True)
                e = cq * beta.squeeze(-1)  # coefficient of s_{j+1} for factor j; the newest multiplies s
                if differentiable:
                    w = -g + e[:, q - 1 : q] * s
                    for j in range(q - 1):
                        w = w + e[:, j : j + 1] * stored[j + 1]
                else:
                    if full:  # the coefficients scattered to the slots of s_{j+1}
                        coef = z.new_zeros(batch, mem).index_copy_(1, order_t[1:], e[:, : q - 1])
                        w = torch.baddbmm(g.unsqueeze(1), coef.unsqueeze(1), rows, beta=-1).squeeze(1)
                    elif q > 1:  # s_{j+1} sits in slot j + 1: a slice, no scatter
                        w = torch.baddbmm(g.unsqueeze(1), e[:, None, : q - 1], rows[:, 1:q], beta=-1).squeeze(1)
                    else:
                        w = -g
                    w = torch.addcmul(w, s, e[:, q - 1 : q])

            # the update with step s: skipped where the denominator is tiny or not finite
            h_dg = w + s
            denom = (s * h_dg).sum(-1, keepdim=True)
            ss = (s * s).sum(-1, keepdim=True)
            abs_denom = denom.abs()
            good = active & (abs_denom > eps * ss.sqrt() * torch.linalg.vector_norm(h_dg, dim=-1, keepdim=True)) & (abs_denom < math.inf)
            safe_ss = torch.where(good, ss, 1.0)
            c_new = torch.where(good, safe_ss.reciprocal(), 0.0).squeeze(-1)
            s_next = w * torch.where(good, ss.neg() / torch.where(good, denom, 1.0), -1.0)  # -H_{n+1} g

            # store s (it becomes s_j of the newest factor), its Gram row and c
            slot = written % mem
            if differentiable:
                P, c = P.clone(), c.clone()
                steps[slot] = s
            else:
                S[:, slot] = s
            if dots_s is not None:
                if full:
                    P[:, slot].index_copy_(1, order_t, dots_s)
                    P[:, :, slot].index_copy_(1, order_t, dots_s)
                else:
                    P[:, slot, :q] = dots_s
                    P[:, :q, slot] = dots_s
            P[:, slot, slot] = ss.squeeze(-1)
            c[:, slot] = c_new
            written += 1
            s = s_next if tracker.all_active else torch.where(tracker.active[:, None], s_next, 0.0)


SOLVERS: dict[str, type[Solver]] = {"fixed_point": FixedPoint, "anderson": Anderson, "broyden": Broyden}


def make_solver(name: str, **kwargs) -> Solver:
    """Build a solver by name (``fixed_point``, ``anderson``, ``broyden``), for configs."""
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
    return cls(**kwargs)
