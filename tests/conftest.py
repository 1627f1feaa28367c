"""Small contractive maps shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phantomgrad.models.toy import TanhMap


def TanhLayer(dim: int = 6, in_dim: int = 4, lipschitz: float = 0.6, dtype=torch.float64) -> TanhMap:  # noqa: N802
    """F(z, x) = tanh(W z + U x + b) with ||W||_2 = lipschitz (a contraction for lipschitz < 1), drawn
    from the global generator (seeded per test): the library's TanhMap with the tests' small defaults."""
    return TanhMap(dim, in_dim, lipschitz, dtype=dtype)


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


# The MDEQ of tests/test_train.py's end-to-end runs (threads=2: the runs time nothing), shared with test_batch.py
TRAIN_TINY = [
    "arch.channels=[8,8]",
    "arch.head_channels=[4,8]",
    "arch.final_channels=32",
    "batch_size=128",
    "solver_max_iter=6",
    "progress=false",
    "threads=2",
]


def tiny_overrides(*, train_subset: int = 192, backward_max_iter: int = 4) -> list[str]:
    """``phantomgrad train`` overrides for a run of seconds: a small MDEQ on a digits subset, one thread."""
    return [
        "arch.channels=[8,8]",
        "arch.head_channels=[4,8]",
        "arch.final_channels=32",
        "batch_size=64",
        "solver_max_iter=6",
        f"backward_max_iter={backward_max_iter}",
        "progress=false",
        "threads=1",
        f"data_options.train_subset={train_subset}",
        "data_options.test_subset=64",
    ]


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
