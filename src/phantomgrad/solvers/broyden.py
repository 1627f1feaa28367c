"""Limited-memory 'good' Broyden method; its inverse-Jacobian estimate, :class:`BroydenInverse`, lives in
:mod:`phantomgrad.solvers.inverse` (re-exported here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from .._checks import positive_int
from .base import Solver
from .inverse import BroydenInverse
from .loop import Loop


@dataclass
class _BroydenState:
    P: Tensor  # (B, memory, memory): the Gram matrix of the stored steps, by slot
    c: Tensor  # (B, memory): c_j of the factor (I + c_j s_{j+1} s_j^T), at the slot of s_j
    rotations: Tensor  # (memory, memory): row r lists the slots oldest first when the oldest is in slot r
    S: Tensor | None = None  # no-grad path: (B, memory, D) the stored steps by slot
    steps: list[Tensor | None] = field(default_factory=list)  # autograd path: the stored steps by slot
    s: Tensor | None = None  # the step taken from the last iterate (None before the first)
    written: int = 0  # steps written to the ring


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

    With ``solve(..., keep_inverse=True)`` a sample that stops keeps its stored steps (later
    writes to the ring are masked for it, at a few more operations per step), and
    ``info.inverse_jacobian`` holds each sample's estimate H at the point where it stopped
    (:class:`BroydenInverse`).

    Args:
        memory: the number of rank-one updates kept, >= 1.
        max_iter, tol, stop, trace, check_every, fused: as in :class:`Solver`.

    Examples:
        >>> import torch, phantomgrad as pg
        >>> A = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.4, 0.2], [0.0, 0.3, 0.3]], dtype=torch.float64)
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> fn = lambda z: z @ A.T + b  # F(z) = A z + b on a batch of 2; z* solves (I - A) z* = b
        >>> z_star = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - A, b.T).T
        >>> z0 = torch.zeros(2, 3, dtype=torch.float64)
        >>> z, info = pg.Broyden(memory=10, max_iter=50, tol=1e-12).solve(fn, z0)
        >>> torch.allclose(z, z_star), bool(info.converged.all())
        (True, True)
    """

    memory: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        self.memory = positive_int("memory (Broyden's number of stored updates)", self.memory)

    def init(self, loop: Loop, z0: Tensor) -> tuple[_BroydenState, Tensor]:
        batch, mem = z0.shape[0], self.memory
        # rotations[r] = (r, r+1, ..., mem-1, 0, ..., r-1): the slots oldest first once the ring is full
        ar = torch.arange(mem, device=z0.device)
        state = _BroydenState(
            P=z0.new_zeros(batch, mem, mem), c=z0.new_zeros(batch, mem), rotations=(ar[:, None] + ar[None, :]) % mem
        )
        return state, z0

    def step(self, loop: Loop, state: _BroydenState, z: Tensor, fz: Tensor, g: Tensor) -> tuple[_BroydenState, Tensor]:
        self._update(loop, state, g)
        assert state.s is not None
        return state, z + state.s  # the loop freezes the samples that stopped

    def finish(self, loop: Loop, state: _BroydenState, z: Tensor, fz: Tensor, g: Tensor) -> Tensor:
        if loop.keep_inverse:  # the estimate's newest factor needs the step after the last iterate
            self._update(loop, state, g)
            assert state.s is not None
            if state.S is None:
                ring = torch.stack([t if t is not None else torch.zeros_like(state.s) for t in state.steps], 1)
            else:
                ring = state.S
            loop.inverse_jacobian = BroydenInverse(ring, state.c, state.s, loop.nstep - 1)
        return loop.best_z

    def _update(self, loop: Loop, state: _BroydenState, g: Tensor) -> None:
        """The next step s from the residual g just observed (and, after the first, the update of H
        with the step that led to it): state.s, the ring, its Gram matrix and the c's."""
        batch, dim = g.shape
        mem = self.memory
        # With keep_inverse, a stopped sample holds its factors and its next step (masked writes);
        # without, its history runs on unread (the loop keeps its iterate and best iterate).
        hold = loop.keep_inverse
        if state.s is None:
            # The autograd path only where a graph is being built (pg.Backprop): grad mode alone is
            # not enough, e.g. Implicit's backward solve runs under enable_grad on VJPs without graphs.
            differentiable = torch.is_grad_enabled() and g.requires_grad
            state.steps = [None] * mem  # autograd path: the stored steps by slot
            state.S = None if differentiable else g.new_zeros(batch, mem, dim)  # no-grad path: the steps by slot
            state.s = g  # s_0 = -H_0 g_0 with H_0 = -I (the loop freezes a sample that stopped)
            return
        s, S, P, c, steps, rotations = state.s, state.S, state.P, state.c, state.steps, state.rotations
        differentiable = S is None
        eps = torch.finfo(g.dtype).eps
        written = state.written  # steps written to the ring so far
        # Samples that stopped are frozen by masks unless the host knew every sample iterated.
        masked = not loop.prev_all_active
        took = loop.prev_active[:, None]  # the samples that took step s
        hold_masked = hold and masked

        # w = H g with the q stored factors, oldest first: slots first, first + 1, ... (mod mem).
        # Until the ring is full these are slots 0..q-1 (plain slices); afterwards a rotation,
        # indexed with a row of `rotations` that already lives on g's device (a Python list as
        # index would be copied to the GPU, and wait for it, several times per step).
        q = min(written, mem)
        first = (written - q) % mem  # the oldest stored step's slot
        full = q == mem and first != 0
        order_t = rotations[first] if full else None

        def by_order(t: Tensor, dim: int) -> Tensor:
            return t.index_select(dim, order_t) if order_t is not None else t.narrow(dim, 0, q)

        if q == 0:
            w = -g
            dots_s = None
        else:
            if S is None:
                stored = [cast(Tensor, steps[(first + t) % mem]) for t in range(q)]  # all written
                dots_g = torch.stack([(sk * g).sum(-1) for sk in stored], 1)  # s_k^T g, (B, q)
                dots_s = torch.stack([(sk * s).sum(-1) for sk in stored], 1)  # s_k^T s, the new Gram row
            else:
                rows = S if q == mem else S[:, :q]
                # The layout of this skinny product matters: cuBLAS is much slower on it than on
                # two matrix-vector products, while on CPU one product with a column-major (D x 2)
                # operand is fastest (see BENCHMARKS.md and scripts/gpu_bmm_layouts.py).
                if rows.is_cuda:
                    prod = torch.cat((rows @ g.unsqueeze(-1), rows @ s.unsqueeze(-1)), -1)
                else:
                    prod = rows @ torch.stack((g, s), 1).mT
                prod = by_order(prod, 1)  # (B, q, 2)
                dots_g, dots_s = prod[..., 0], prod[..., 1]
            if hold_masked:  # a stopped sample solves with a zero right-hand side: w = -g, finite
                dots_g = torch.where(took, dots_g, 0.0)
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
            if S is None:
                w = -g + e[:, q - 1 : q] * s
                for j in range(q - 1):
                    w = w + e[:, j : j + 1] * stored[j + 1]
            else:
                if order_t is not None:  # the coefficients scattered to the slots of s_{j+1}
                    coef = g.new_zeros(batch, mem).index_copy_(1, order_t[1:], e[:, : q - 1])
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
        good = (
            took
            & (abs_denom > eps * ss.sqrt() * torch.linalg.vector_norm(h_dg, dim=-1, keepdim=True))
            & (abs_denom < math.inf)
        )
        if differentiable:  # divide by safe values: the unused branch of a where still gets a gradient
            ss_, denom_ = torch.where(good, ss, 1.0), torch.where(good, denom, 1.0)
        else:
            ss_, denom_ = ss, denom
        c_new = torch.where(good, ss_.reciprocal(), 0.0).squeeze(-1)
        s_next = w * torch.where(good, ss_.neg() / denom_, -1.0)  # -H_{n+1} g

        # store s (it becomes s_j of the newest factor), its Gram row and c; a stopped sample
        # keeps its stored steps and c (its estimate stays that of the point where it stopped)
        slot = written % mem
        if S is None:
            P, c = P.clone(), c.clone()
            if hold_masked:
                old = steps[slot]
                steps[slot] = torch.where(took, s, old if old is not None else torch.zeros_like(s))
            else:
                steps[slot] = s
        else:
            S[:, slot] = torch.where(took, s, S[:, slot]) if hold_masked else s
        if dots_s is not None:
            if order_t is not None:
                P[:, slot].index_copy_(1, order_t, dots_s)
                P[:, :, slot].index_copy_(1, order_t, dots_s)
            else:
                P[:, slot, :q] = dots_s
                P[:, :q, slot] = dots_s
        P[:, slot, slot] = ss.squeeze(-1)
        c[:, slot] = torch.where(took.squeeze(-1), c_new, c[:, slot]) if hold_masked else c_new
        state.written = written + 1
        if hold and masked:  # a sample that had stopped keeps its s (its estimate's newest factor needs it)
            s_next = torch.where(took, s_next, s)
        # without keep_inverse a stopped sample's steps are never read: the loop freezes its iterate
        state.s, state.P, state.c = s_next, P, c


__all__ = ["Broyden", "BroydenInverse"]
