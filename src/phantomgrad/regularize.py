"""Jacobian regularisation and diagnostics at the fixed point.

Both work on the layer's own structure: ``f(z, x)`` with ``z`` a tensor or a tuple
of tensors (batch on dim 0), as for :class:`phantomgrad.DEQ`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backward import keep_saved_tensors
from .deq import State, _Packer


def _graph_at(f, z: State, x) -> tuple[Tensor, Tensor, _Packer]:
    """Flat F(z) with a graph to a fresh leaf standing for z (and to the parameters)."""
    packer = _Packer(z)
    z_req = packer.pack(z).detach().requires_grad_()
    with torch.enable_grad(), keep_saved_tensors():  # repeated VJPs through a compiled F: no donated buffers
        out = f(packer.unpack(z_req), x)
        packer.check(out, "f(z, x)")
        fz = packer.pack(out)
    return fz, z_req, packer


def jacobian_penalty(f, z: State, x, n_samples: int = 1) -> Tensor:
    """Hutchinson estimate of ||dF/dz||_F^2 / D at z, averaged over the batch.

    For eps ~ N(0, I), E ||eps^T J||^2 = ||J||_F^2. The estimate is differentiable in the
    parameters of f (double backward), so ``loss + w * jacobian_penalty(...)`` pushes
    F towards a contraction, as in Bai et al. (2021), "Stabilizing Equilibrium Models
    by Jacobian Regularization". D is the state size per sample.

    Examples:
        >>> import torch, phantomgrad as pg
        >>> from phantomgrad.models.toy import TanhMap
        >>> f = TanhMap(dim=6, in_dim=4, lipschitz=0.5, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        >>> z0 = torch.zeros(3, 6, dtype=torch.float64)
        >>> z, _ = pg.DEQ(f, solver=pg.Anderson(max_iter=30, tol=1e-8))(x, z0)
        >>> penalty = pg.jacobian_penalty(f, z, x)  # add w * penalty to the loss
        >>> penalty.dim(), penalty.requires_grad, bool(penalty > 0)
        (0, True, True)
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples!r}")
    fz, z_req, packer = _graph_at(f, z, x)
    total = fz.new_zeros(())
    for _ in range(n_samples):
        eps = torch.randn_like(fz)
        with keep_saved_tensors():
            (vjp,) = torch.autograd.grad(fz, z_req, eps, create_graph=True, retain_graph=True)
        total = total + vjp.pow(2).sum() / vjp.numel()
    return total / n_samples


@torch.no_grad()
def spectral_radius(f, z: State, x, iters: int = 20) -> Tensor:
    """Per-sample estimate of the spectral radius of dF/dz at z by power iteration.

    v_{t+1} = J^T v_t / ||J^T v_t|| (J^T has the eigenvalues of J); the estimate is
    ||J^T v|| after ``iters`` steps. Returns a tensor of shape (B,). A value near or
    above 1 means F is close to losing its contraction at this point.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters!r}")
    fz, z_req, _ = _graph_at(f, z, x)
    v = torch.randn_like(fz)
    v = v / v.norm(dim=1, keepdim=True)
    radius = torch.zeros(fz.shape[0], dtype=fz.dtype, device=fz.device)
    with torch.enable_grad(), keep_saved_tensors():
        for _ in range(iters):
            (jv,) = torch.autograd.grad(fz, z_req, v, retain_graph=True)
            radius = jv.norm(dim=1)
            v = jv / radius.clamp_min(torch.finfo(jv.dtype).tiny)[:, None]
    return radius
