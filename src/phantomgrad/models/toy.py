"""A small contractive map for examples, tests and the synthetic studies.

    F(z, x) = tanh(W z + U x + b),     ||W||_2 = lipschitz

tanh is 1-Lipschitz, so F is a contraction in z with constant ``lipschitz`` when
``lipschitz < 1``: the fixed point z* = F(z*, x) exists, is unique, and fixed-point
iteration converges to it from any start. This is the layer of the paper's synthetic
study (Geng et al., NeurIPS 2021, Fig. 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TanhMap(nn.Module):
    """F(z, x) = tanh(W z + U x + b) on states (B, dim) and inputs (B, in_dim).

    W is drawn from N(0, 1) and rescaled to spectral norm ``lipschitz`` exactly (its top
    singular value), U from N(0, 1 / in_dim), b from N(0, 0.01); the draws come from
    ``generator`` (the global generator when None), in that order.

    Args:
        dim: state size.
        in_dim: input size.
        lipschitz: ||W||_2, the contraction constant of F in z (a contraction when < 1).
        bias: learn b (when False, F(z, x) = tanh(W z + U x) and no b is drawn).
        generator: source of the random weights.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        lipschitz: float = 0.9,
        *,
        bias: bool = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("in_dim", in_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not lipschitz > 0:
            raise ValueError(f"lipschitz must be > 0 (the spectral norm of W), got {lipschitz!r}")
        w = torch.randn(dim, dim, generator=generator, dtype=dtype)
        self.W = nn.Parameter(lipschitz * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(dim, in_dim, generator=generator, dtype=dtype) / in_dim**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(dim, generator=generator, dtype=dtype)) if bias else None

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        pre = z @ self.W.T + x @ self.U.T
        return torch.tanh(pre if self.b is None else pre + self.b)

    def extra_repr(self) -> str:
        return f"dim={self.W.shape[0]}, in_dim={self.U.shape[1]}, bias={self.b is not None}"


__all__ = ["TanhMap"]
