"""Restarted GMRES for the linear fixed point z = fn(z) of an affine fn (Saad & Schultz, 1986)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import positive_int
from .base import Solver
from .loop import Loop


@dataclass
class _GMRESState:
    x0: Tensor | None = None  # the start, and fx0 = fn(x0): A v = (fn(x0 + t v) - fx0) / t
    fx0: Tensor | None = None
    t: Tensor | None = None  # (B, 1) the scale of the difference
    xc: Tensor | None = None  # the start of the current cycle and fn there
    fxc: Tensor | None = None
    basis: list[Tensor] = field(default_factory=list)  # v_0..v_k, (B, D) each (autograd path)
    images: list[Tensor] = field(default_factory=list)  # A v_0..A v_{k-1} (autograd path)
    V: Tensor | None = None  # no-grad path: (B, restart + 1, D) the basis, written in place
    AV: Tensor | None = None  # no-grad path: (B, restart, D) the images
    k: int = -1  # the basis vectors of the current cycle, less one (-1: no cycle)
    columns: list[Tensor] = field(default_factory=list)  # column j of R (rotated Hessenberg), (B, j + 1)
    rotations: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (cos, sin), (B,) each
    rhs: list[Tensor] = field(default_factory=list)  # the rotated right-hand side beta e_1, (B,) each
    fz: Tensor | None = None  # fn at the iterate just observed, and at the next one (by linearity)
    fz_next: Tensor | None = None


class GMRES(Solver):
    """Restarted GMRES on (I - A) z = b for an affine map fn(z) = A z + b (Saad & Schultz, 1986).

    The fixed point of an affine fn solves (I - A) z = b, with A v = fn(x_0 + t v) - fn(x_0)) / t
    (one evaluation of fn per step, t = max(||x_0||, ||fn(x_0)||) per sample so the difference
    keeps its relative precision). From the residual r_0 = fn(x_0) - x_0 = b - (I - A) x_0, each
    step extends the Krylov basis V of span{r_0, M r_0, ...}, M = I - A, by Arnoldi (classical
    Gram-Schmidt applied twice), rotates the new Hessenberg column with Givens rotations and
    solves the small upper-triangular system R y = Q^T beta e_1, so that x_k = x_c + V_k y
    minimises ||b - M x|| over the cycle's Krylov space. fn(x_k) = fn(x_c) + A V_k y comes by
    linearity, without an evaluation, and the loop measures the fixed-point residual
    ||fn(x_k) - x_k|| (= the GMRES residual) from it as for every solver: per-sample stopping,
    best iterate, ``check_every``, the trace and SolverInfo are those of the one loop. Every
    ``restart`` steps the basis is dropped and a new cycle starts from the current iterate.

    This is the backward solve of ``pg.Implicit``: fn(g) = J^T g + v there, so
    ``pg.Implicit(solver=pg.GMRES(...))`` solves g = (I - J^T)^{-1} v; DeepEquilibriumNetworks.jl
    and lineax use GMRES for this solve. It does not solve a nonlinear fixed point: for a
    nonlinear fn the iterates solve its linearisation at the start, and the reported residuals
    are those of that linearisation (``linear_only = True``; not a forward solver of a DEQ).

    Args:
        restart: steps per cycle (the basis holds at most ``restart + 1`` vectors), >= 1.
        max_iter, tol, stop, trace, check_every, fused: as in :class:`Solver`; ``max_iter``
            counts evaluations of fn (the first at the start, then one per step).

    Examples:
        >>> import torch, phantomgrad as pg
        >>> A = torch.tensor([[0.5, 0.9, 0.0], [-0.8, 0.4, 0.2], [0.0, 0.3, 1.1]], dtype=torch.float64)
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> fn = lambda z: z @ A.T + b  # not a contraction: fixed-point iteration diverges on it
        >>> z_star = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - A, b.T).T
        >>> z, info = pg.GMRES(max_iter=10, tol=1e-12).solve(fn, torch.zeros(2, 3, dtype=torch.float64))
        >>> torch.allclose(z, z_star), info.nstep.tolist()  # exact after 3 steps in 3 dimensions
        (True, [4, 4])
    """

    restart: int = 20

    linear_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.restart = positive_int("restart (GMRES steps per cycle)", self.restart)

    def init(self, loop: Loop, z0: Tensor) -> tuple[_GMRESState, Tensor]:
        return _GMRESState(), z0

    def evaluate(self, loop: Loop, state: _GMRESState, z: Tensor) -> Tensor:
        if state.fz_next is None or state.fz is None:  # the start: the one evaluation at an iterate
            return loop.fn(z)
        if loop.all_active:
            return state.fz_next
        return torch.where(loop.active[:, None], state.fz_next, state.fz)  # as the loop froze z

    def step(self, loop: Loop, state: _GMRESState, z: Tensor, fz: Tensor, g: Tensor) -> tuple[_GMRESState, Tensor]:
        tiny = torch.finfo(z.dtype).tiny
        if state.x0 is None:
            scale = torch.maximum(torch.linalg.vector_norm(z, dim=1), torch.linalg.vector_norm(fz, dim=1))
            state.x0, state.fx0 = z, fz
            state.t = torch.where(scale > 0, scale, 1.0)[:, None]
        assert state.fx0 is not None and state.t is not None
        state.fz = fz
        # Buffers written in place, unless autograd records through the solve (a double backward)
        differentiable = torch.is_grad_enabled() and (g.requires_grad or state.fx0.requires_grad)
        if state.k < 0:  # a new cycle from (z, fz): r = fn(z) - z = g
            beta = torch.linalg.vector_norm(g, dim=1)
            state.xc, state.fxc = z, fz
            v0 = g / torch.where(beta > tiny, beta, 1.0)[:, None]
            if differentiable:
                state.basis, state.images = [v0], []
            else:
                if state.V is None:
                    state.V = z.new_empty(z.shape[0], self.restart + 1, z.shape[1])
                    state.AV = z.new_empty(z.shape[0], self.restart, z.shape[1])
                state.V[:, 0] = v0
            state.columns, state.rotations, state.rhs, state.k = [], [], [beta], 0
        k = state.k
        v = state.basis[k] if differentiable else state.V[:, k]  # type: ignore[index]
        av = (loop.fn(state.x0 + state.t * v) - state.fx0) / state.t  # A v, one evaluation
        w = v - av  # M v
        basis = torch.stack(state.basis, 1) if differentiable else state.V[:, : k + 1]  # type: ignore[index]
        h = (basis @ w.unsqueeze(-1)).squeeze(-1)  # classical Gram-Schmidt, twice
        w = w - (h.unsqueeze(1) @ basis).squeeze(1)
        h2 = (basis @ w.unsqueeze(-1)).squeeze(-1)
        w = w - (h2.unsqueeze(1) @ basis).squeeze(1)
        h = h + h2
        h_next = torch.linalg.vector_norm(w, dim=1)
        v_next = w / torch.where(h_next > tiny, h_next, 1.0)[:, None]
        if differentiable:
            state.basis.append(v_next)
            state.images.append(av)
            images = torch.stack(state.images, 1)
        else:
            state.V[:, k + 1] = v_next  # type: ignore[index]
            state.AV[:, k] = av  # type: ignore[index]
            images = state.AV[:, : k + 1]  # type: ignore[index]
        state.k = k + 1
        entries = list(h.unbind(1))
        for j, (c, s) in enumerate(state.rotations):  # the earlier rotations, oldest first
            a, b = entries[j], entries[j + 1]
            entries[j], entries[j + 1] = c * a + s * b, c * b - s * a
        a = entries[k]
        r = torch.hypot(a, h_next)
        c = torch.where(r > 0, a / torch.where(r > 0, r, 1.0), 1.0)
        s = torch.where(r > 0, h_next / torch.where(r > 0, r, 1.0), 0.0)
        entries[k] = r
        state.rotations.append((c, s))
        state.rhs[k], rhs_next = c * state.rhs[k], -s * state.rhs[k]
        state.rhs.append(rhs_next)
        state.columns.append(torch.stack(entries, 1))
        # R y = Q^T beta e_1 (upper triangular, k + 1 unknowns); a zero pivot (exact breakdown) -> 1
        size = k + 1
        R = torch.stack([torch.nn.functional.pad(col, (0, size - col.shape[1])) for col in state.columns], 2)
        diag = R.diagonal(dim1=1, dim2=2)
        R = R + torch.diag_embed(torch.where(diag == 0, 1.0, 0.0).to(R.dtype))
        y = torch.linalg.solve_triangular(R, torch.stack(state.rhs[:size], 1).unsqueeze(-1), upper=True)
        yt = y.transpose(1, 2)  # (B, 1, k + 1)
        assert state.xc is not None and state.fxc is not None
        x = state.xc + (yt @ basis).squeeze(1)
        state.fz_next = state.fxc + (yt @ images).squeeze(1)
        if size == self.restart:  # the next step starts a new cycle from x
            state.k = -1
        return state, x


__all__ = ["GMRES"]
