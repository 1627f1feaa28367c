"""Small contractive maps shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TanhLayer(nn.Module):
    """F(z, x) = tanh(W z + U x + b) with ||W||_2 = lipschitz, a contraction for lipschitz < 1."""

    def __init__(self, dim: int = 6, in_dim: int = 4, lipschitz: float = 0.6, dtype=torch.float64):
        super().__init__()
        w = torch.randn(dim, dim, dtype=dtype)
        self.W = nn.Parameter(lipschitz * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(dim, in_dim, dtype=dtype) / in_dim**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(dim, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class TupleLayer(nn.Module):
    """A two-part state (like MDEQ's resolutions): F((a, b), x) = (tanh(A a + C b + x), tanh(B b + D a))."""

    def __init__(self, dim_a: int = 4, dim_b: int = 3, scale: float = 0.4, dtype=torch.float64):
        super().__init__()

        def mat(n, m):
            w = torch.randn(n, m, dtype=dtype)
            return nn.Parameter(scale * w / torch.linalg.matrix_norm(w, ord=2))

        self.A, self.C, self.B, self.D = mat(dim_a, dim_a), mat(dim_a, dim_b), mat(dim_b, dim_b), mat(dim_b, dim_a)

    def forward(self, z, x):
        a, b = z
        return torch.tanh(a @ self.A.T + b @ self.C.T + x), torch.tanh(b @ self.B.T + a @ self.D.T)


def forward_solver(mode, max_iter: int, tol: float):
    """The forward solver of the shared contract tests: Anderson, or Broyden for a mode that needs
    Broyden's inverse-Jacobian estimate (SHINE)."""
    import phantomgrad as pg

    if mode.needs_inverse_jacobian:
        return pg.Broyden(max_iter=max_iter, tol=tol)
    return pg.Anderson(max_iter=max_iter, tol=tol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tanh_layer():
    return TanhLayer()


def train_killed_in_epoch(cfg, epoch: int = 1) -> None:
    """Run ``train(cfg)`` as if the process were killed when epoch ``epoch`` (0-based) starts: the
    checkpoints of the epochs before it are on disk, nothing of it is. Trainer is left unpatched."""
    from phantomgrad.train.trainer import Trainer, train

    original = Trainer.train_epoch

    def killed(self, e):
        if e == epoch:
            raise KeyboardInterrupt("killed")
        return original(self, e)

    Trainer.train_epoch = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        Trainer.train_epoch = original
