"""Anderson acceleration (type II) with a scale-aware ridge."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import nonneg_float, positive_int
from .base import Solver, _check_damping
from .loop import Loop


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
    if torch.compiler.is_compiling():  # Dynamo refuses out= on a strided view; the compiler fuses this anyway
        buf[:, slot] = a - b
    else:
        torch.sub(a, b, out=buf[:, slot])
    return buf


@dataclass
class _AndersonState:
    G: Tensor  # (B, m+1, D): rows 0..m-1 the differences of the residuals by slot, row m the current one
    dY: Tensor  # (B, m, D): the differences of the plain steps y_i by slot
    y_prev: Tensor | None = None
    n: int = 0  # steps taken


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

    Args:
        m: history size (number of stored differences), >= 1.
        ridge: relative Tikhonov regularisation of the small system, >= 0.
        mixing: the damping of the plain step, in (0, 1].
        max_iter, tol, stop, trace, check_every, fused: as in :class:`Solver`.

    Examples:
        >>> import torch, phantomgrad as pg
        >>> A = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.4, 0.2], [0.0, 0.3, 0.3]], dtype=torch.float64)
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> fn = lambda z: z @ A.T + b  # F(z) = A z + b on a batch of 2; z* solves (I - A) z* = b
        >>> z_star = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - A, b.T).T
        >>> z0 = torch.zeros(2, 3, dtype=torch.float64)
        >>> z, info = pg.Anderson(m=3, max_iter=50, tol=1e-12).solve(fn, z0)
        >>> torch.allclose(z, z_star), bool(info.converged.all())
        (True, True)
    """

    m: int = 5
    ridge: float = 1e-4
    mixing: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.m = positive_int("m (Anderson history size)", self.m)
        self.ridge = nonneg_float("ridge", self.ridge)
        self.mixing = _check_damping("mixing", self.mixing)

    def init(self, loop: Loop, z0: Tensor) -> tuple[_AndersonState, Tensor]:
        batch, dim = z0.shape
        # G rows 0..m-1: the dG ring buffer; row m: the current residual
        return _AndersonState(G=z0.new_zeros(batch, self.m + 1, dim), dY=z0.new_zeros(batch, self.m, dim)), z0

    def step(
        self, loop: Loop, state: _AndersonState, z: Tensor, fz: Tensor, g: Tensor
    ) -> tuple[_AndersonState, Tensor]:
        m, n = self.m, state.n
        G, dY = state.G, state.dY
        y = fz if self.mixing == 1.0 else torch.add(z, g, alpha=self.mixing)
        if state.y_prev is not None:
            slot = (n - 1) % m
            G = _write_diff(G, slot, g, G[:, m])
            dY = _write_diff(dY, slot, y, state.y_prev)
        G = _write(G, m, g)
        state.G, state.dY, state.y_prev, state.n = G, dY, y, n + 1
        used = min(n, m)
        if used == 0:
            return state, y
        prod = G @ G.transpose(1, 2)  # (B, m+1, m+1): Gram matrix and right-hand side at once
        gram, rhs = prod[:, :used, :used], prod[:, :used, m:]  # the ring fills slots 0, 1, ... in order
        diag = gram.diagonal(dim1=1, dim2=2)
        scale = diag.sum(-1) / used
        diag.add_((self.ridge * scale + torch.finfo(z.dtype).tiny)[:, None])  # the ridge, in place: prod is ours
        gamma, status = torch.linalg.solve_ex(gram, rhs)
        # finite iff its largest |entry| is (NaN propagates through amax)
        ok = (status == 0) & (torch.linalg.vector_norm(gamma, ord=math.inf, dim=(1, 2)) < math.inf)
        gamma = torch.where(ok[:, None, None], gamma, 0.0)
        loop.fallback |= loop.active > ok  # active and not ok (on bools, a > b is a & ~b)
        # z_next = y - dY^T gamma, in one fused kernel
        return state, torch.baddbmm(y.unsqueeze(1), gamma.transpose(1, 2), dY[:, :used], alpha=-1).squeeze(1)
