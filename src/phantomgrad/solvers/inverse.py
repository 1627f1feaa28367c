"""Broyden's inverse-Jacobian estimate (:class:`BroydenInverse`), kept apart from the solver so that
the loop and :class:`~phantomgrad.solvers.info.SolverInfo` can name it without importing the solver."""

from __future__ import annotations

import torch
from torch import Tensor


class BroydenInverse:
    """Broyden's low-rank estimate H of (J_F - I)^{-1} at the end of a solve, per sample.

    With g(z) = F(z) - z, the solver keeps H ~ (dg/dz)^{-1} = (J_F - I)^{-1} in product form

        H = -(I + c_{q-1} a_{q-1} b_{q-1}^T) ... (I + c_0 a_0 b_0^T),

    one factor per step the sample took, the last ``memory`` of them (oldest first): b_t is the
    step s_j = z_{j+1} - z_j of factor t, a_t the step that followed it, s_{j+1} = -H_{j+1} g_{j+1}
    (for the newest factor, the step the solve would have taken next), and
    c_t = 1 / ||s_j||^2, or 0 where the update was skipped. This is the good-Broyden update
    H_{j+1} = H_j + (s_j - H_j dg_j) s_j^T H_j / (s_j^T H_j dg_j) from H_0 = -I, so
    H_{j+1} dg_j = s_j (the secant condition, dg_j = g_{j+1} - g_j) holds for the newest step.

    For a sample that stopped early, H is its estimate when it stopped. For the implicit
    gradient, v^T (I - J_F)^{-1} ~ -v^T H = -``rmatvec(v)`` (SHINE, Ramzi et al., ICLR 2022).

    Attributes (the raw factors; :meth:`factors` orders them):
        steps: (B, memory, D) ring buffer of the steps, by slot.
        coef: (B, memory) the c of the factor whose b is in that slot.
        tail: (B, D) the step after the newest stored one.
        count: (B,) the number of factors each sample wrote (the newest ``memory`` are kept).
    """

    def __init__(self, steps: Tensor, coef: Tensor, tail: Tensor, count: Tensor):
        self.steps, self.coef, self.tail, self.count = steps, coef, tail, count
        self.memory = steps.shape[1]

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, c) oldest first, shapes (B, memory, D), (B, memory, D), (B, memory), with
        H = -prod_t (I + c_t a_t b_t^T) (newest on the left); unused factors have c_t = 0."""
        batch, mem, dim = self.steps.shape
        t = torch.arange(mem, device=self.steps.device)
        q = self.count.clamp(max=mem)[:, None]  # factors kept
        slots = (self.count[:, None] - q + t) % mem  # oldest first
        b = self.steps.gather(1, slots[..., None].expand(batch, mem, dim))
        c = torch.where(t < q, self.coef.gather(1, slots), 0.0)
        a = torch.cat((b[:, 1:], self.tail[:, None]), 1)
        a = torch.where((t == q - 1)[..., None], self.tail[:, None], a)
        return a, b, c

    def matvec(self, v: Tensor) -> Tensor:
        """H v per sample, for v of shape (B, D)."""
        a, b, c = self.factors()
        x = v
        for t in range(self.memory):  # the oldest factor acts first
            x = x + (c[:, t, None] * (b[:, t] * x).sum(-1, keepdim=True)) * a[:, t]
        return -x

    def rmatvec(self, v: Tensor) -> Tensor:
        """H^T v (i.e. v^T H) per sample, for v of shape (B, D)."""
        a, b, c = self.factors()
        x = v
        for t in reversed(range(self.memory)):  # transposed: the newest factor acts first
            x = x + (c[:, t, None] * (a[:, t] * x).sum(-1, keepdim=True)) * b[:, t]
        return -x

    def to_dense(self) -> Tensor:
        """H as a (B, D, D) tensor (for tests and small problems)."""
        batch, _, dim = self.steps.shape
        eye = torch.eye(dim, dtype=self.steps.dtype, device=self.steps.device)
        return torch.stack([self.matvec(eye[i].expand(batch, dim)) for i in range(dim)], -1)


__all__ = ["BroydenInverse"]
