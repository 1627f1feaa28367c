"""Monotone operator equilibrium networks (monDEQ; Winston & Kolter, NeurIPS 2020).

The layer is z* = relu(W z* + U x + b) with the weight parametrised as

    W = (1 - m) I - A^T A + B - B^T,        m > 0,

so that I - W = m I + A^T A - (B - B^T) is strongly monotone: (I - W) + (I - W)^T >= 2 m I for every
A and B (A^T A is positive semi-definite, B - B^T skew). Written as the monotone inclusion
0 in (I - W) z - (U x + b) + N(z) (N the normal cone of the non-negative orthant, whose resolvent is
ReLU), the equilibrium exists and is unique for every input and every value of the parameters: no
training run can lose it, which is the point of the family.

The operator-splitting methods of the paper find it; each is written here as a fixed-point map
whose fixed points are exactly the equilibrium, so any phantomgrad solver iterates it
(``pg.FixedPoint()`` runs the splitting method itself, ``pg.Anderson`` accelerates it) and every
backward mode differentiates it (the implicit function theorem gives the same dz*/dtheta for every
map with the same fixed points, so ``pg.Implicit`` is the exact monDEQ gradient):

* forward-backward (``splitting="forward_backward"``):
  z <- relu((1 - alpha) z + alpha (W z + U x + b)); it converges for
  0 < alpha < 2 m / ||I - W||^2 (``alpha=None``: m / ||I - W||^2, recomputed at every forward,
  exactly for the fully connected form, by power iteration for the convolutional one). Its step
  T(z) - z is about alpha times the natural residual relu(W z + U x + b) - z, so the solver's
  tolerance on it is a tolerance on alpha times that residual: with a small alpha, set it smaller.
* Peaceman-Rachford (``splitting="peaceman_rachford"``), on the auxiliary state u with z = relu(u):
  v = 2 relu(u) - u,  u <- 2 V (v + alpha (U x + b)) - v,  V = (I + alpha (I - W))^{-1}; it converges
  for every alpha > 0 (default 1). V is formed once per forward (fully connected form only).

Fully connected (``form="linear"``: x of shape (B, in_features), z of shape (B, hidden_features)) and
convolutional (``form="conv"``: A, B and U are k x k convolutions, A^T and B^T their adjoints, on
images (B, in_features, H, W) and states (B, hidden_features, H, W)).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backward import BackwardMode
from ..deq import DEQ, DEQInfo
from ..init import model_start
from ..solvers import Anderson, Solver

SPLITTINGS = ("forward_backward", "peaceman_rachford")
FORMS = ("linear", "conv")
POWER_ITERS = 8  # power-iteration steps for ||I - W|| of the convolutional form (warm-started)


class MonotoneLinear(nn.Module):
    """z -> W z with W = (1 - m) I - A^T A + B - B^T (fully connected)."""

    def __init__(self, features: int, m: float):
        super().__init__()
        self.m = m
        bound = 1 / math.sqrt(features)
        self.A = nn.Parameter(torch.empty(features, features).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.empty(features, features).uniform_(-bound, bound))

    def weight(self) -> Tensor:
        """The matrix W (differentiable in A and B)."""
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        return (1 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.weight().T

    def lipschitz(self) -> Tensor:
        """||I - W||_2, exactly (no gradient)."""
        with torch.no_grad():
            eye = torch.eye(self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
            return torch.linalg.matrix_norm(eye - self.weight(), ord=2)


class MonotoneConv(nn.Module):
    """z -> W z = (1 - m) z - A^T A z + B z - B^T z with A, B k x k convolutions (stride 1, same
    padding) and A^T, B^T their adjoints (transposed convolutions with the same weights)."""

    def __init__(self, channels: int, m: float, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (same padding), got {kernel_size!r}")
        self.m = m
        self.pad = kernel_size // 2
        bound = 1 / math.sqrt(channels * kernel_size**2)
        shape = (channels, channels, kernel_size, kernel_size)
        self.A = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self._v: Tensor
        self.register_buffer("_v", torch.empty(0), persistent=False)  # power-iteration vector, warm start

    def forward(self, z: Tensor) -> Tensor:
        az = F.conv2d(z, self.A, padding=self.pad)
        return (
            (1 - self.m) * z
            - F.conv_transpose2d(az, self.A, padding=self.pad)
            + F.conv2d(z, self.B, padding=self.pad)
            - F.conv_transpose2d(z, self.B, padding=self.pad)
        )

    def lipschitz(self, like: Tensor) -> Tensor:
        """A power-iteration estimate of ||I - W||_2 on states shaped like one sample of ``like``
        (warm-started from the last call; no gradient, no host sync)."""
        with torch.no_grad():
            shape = (1, *like.shape[1:])
            v = self._v if self._v.shape == shape else torch.randn(shape, dtype=like.dtype, device=like.device)
            v = v.to(like.dtype)
            n = v.norm()
            for _ in range(POWER_ITERS):  # ||M||^2 is the top eigenvalue of M^T M, M = I - W
                v = v / n.clamp_min(1e-30)
                mv = v - self(v)
                mtmv = mv - _adjoint(self, mv)
                n = mtmv.norm()
                v = mtmv
            self._v = v / n.clamp_min(1e-30)
            return n.sqrt()


def _adjoint(op: MonotoneConv, y: Tensor) -> Tensor:
    """W^T y = (1 - m) y - A^T A y - B y + B^T y."""
    ay = F.conv2d(y, op.A, padding=op.pad)
    return (
        (1 - op.m) * y
        - F.conv_transpose2d(ay, op.A, padding=op.pad)
        - F.conv2d(y, op.B, padding=op.pad)
        + F.conv_transpose2d(y, op.B, padding=op.pad)
    )


class ForwardBackwardMap(nn.Module):
    """F(z, (u, alpha)) = relu((1 - alpha) z + alpha (W z + u)), u = U x + b: one forward-backward
    splitting step. Its fixed points are those of z = relu(W z + u)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, z: Tensor, x: tuple[Tensor, Tensor]) -> Tensor:
        u, alpha = x
        return torch.relu((1 - alpha) * z + alpha * (self.linear(z) + u))


class PeacemanRachfordMap(nn.Module):
    """F(s, (u, alpha, V)) = 2 V (v + alpha u) - v with v = 2 relu(s) - s and V = (I + alpha (I - W))^{-1}:
    one Peaceman-Rachford step on the auxiliary state s. At its fixed point s*, z* = relu(s*) solves
    z* = relu(W z* + u) (see the module docstring)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, s: Tensor, x: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        u, alpha, V = x
        v = 2 * torch.relu(s) - s
        return 2 * (v + alpha * u) @ V.T - v


class MonDEQ(nn.Module):
    """A monotone operator equilibrium layer: ``z, info = MonDEQ(in_features, hidden_features)(x)``.

    Solves z* = relu(W z* + U x + b), W = (1 - m) I - A^T A + B - B^T (module docstring), with the
    chosen operator splitting as the fixed-point map of a :class:`phantomgrad.DEQ`; the gradient is
    that DEQ's backward mode (``pg.Implicit()`` is exact).

    Args:
        in_features: input features (``form="linear"``) or channels (``form="conv"``).
        hidden_features: state size or channels.
        m: the strong-monotonicity margin (> 0): I - W >= m I.
        splitting: ``"peaceman_rachford"`` (fully connected form only; converges for every alpha, in
            about 25 steps at alpha = 1 on a 100-unit layer at initialisation) or ``"forward_backward"``
            (the only one of the convolutional form; its guaranteed step m / ||I - W||^2 is small, so it
            needs hundreds of steps with m = 0.05: pass a larger ``alpha`` at your own risk, or a larger m).
        alpha: the splitting's step (> 0); None: m / ||I - W||^2 (forward-backward), 1 (Peaceman-Rachford).
        form: ``"linear"`` or ``"conv"``; ``kernel_size`` for the latter.
        solver: iterates the splitting map (default ``pg.Anderson(max_iter=50, tol=1e-4)``;
            ``pg.FixedPoint()`` runs the plain splitting method).
        backward: the DEQ's backward mode (default: ``pg.DEQ``'s).

    Examples:
        >>> import torch, phantomgrad as pg
        >>> from phantomgrad.models import MonDEQ
        >>> layer = MonDEQ(4, 8, splitting="peaceman_rachford", solver=pg.FixedPoint(max_iter=200, tol=1e-6))
        >>> z, info = layer(torch.randn(3, 4))
        >>> z.shape, bool(info.converged.all()), bool((z >= 0).all())
        (torch.Size([3, 8]), True, True)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        m: float = 0.05,
        splitting: Literal["forward_backward", "peaceman_rachford"] = "peaceman_rachford",
        alpha: float | None = None,
        form: Literal["linear", "conv"] = "linear",
        kernel_size: int = 3,
        solver: Solver | None = None,
        backward: BackwardMode | None = None,
    ):
        super().__init__()
        if splitting not in SPLITTINGS:
            raise ValueError(f"splitting must be one of {', '.join(SPLITTINGS)}, got {splitting!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        if not (isinstance(m, (int, float)) and 0 < m < 1):
            raise ValueError(f"m must be in (0, 1) (the monotonicity margin of I - W), got {m!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a positive step (or None for the default), got {alpha!r}")
        if form == "conv" and splitting == "peaceman_rachford":
            raise ValueError(
                "splitting='peaceman_rachford' needs the resolvent (I + alpha (I - W))^{-1}, which the "
                "convolutional form does not form; use splitting='forward_backward' with form='conv'"
            )
        for name, n in (("in_features", in_features), ("hidden_features", hidden_features)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        self.splitting, self.form, self.alpha, self.m = splitting, form, alpha, float(m)
        self.linear: nn.Module
        if form == "linear":
            self.inject: nn.Module = nn.Linear(in_features, hidden_features)
            self.linear = MonotoneLinear(hidden_features, self.m)
        else:
            self.inject = nn.Conv2d(in_features, hidden_features, kernel_size, padding=kernel_size // 2)
            self.linear = MonotoneConv(hidden_features, self.m, kernel_size)
        step = ForwardBackwardMap(self.linear) if splitting == "forward_backward" else PeacemanRachfordMap(self.linear)
        self.deq = DEQ(step, solver=solver or Anderson(max_iter=50, tol=1e-4), backward=backward)

    def extra_repr(self) -> str:
        return f"splitting={self.splitting}, form={self.form}, m={self.m}, alpha={self.alpha}"

    def weight(self) -> Tensor:
        """The matrix W of the fully connected form."""
        if not isinstance(self.linear, MonotoneLinear):
            raise ValueError("weight() is the fully connected form's matrix; the convolutional form has no matrix")
        return self.linear.weight()

    def step_size(self, u: Tensor) -> Tensor:
        """The splitting's alpha for this forward, a 0-dim tensor on u's device (no host sync)."""
        if self.alpha is not None:
            return torch.tensor(self.alpha, dtype=u.dtype, device=u.device)
        if self.splitting == "peaceman_rachford":
            return torch.ones((), dtype=u.dtype, device=u.device)
        linear = self.linear
        lip = linear.lipschitz() if isinstance(linear, MonotoneLinear) else cast(MonotoneConv, linear).lipschitz(u)
        return (self.m / lip.pow(2)).to(u.dtype)

    def forward(self, x: Tensor, z0: Any = None, states: Sequence[int] | None = None) -> tuple[Any, DEQInfo]:
        """``(z*, info)`` for inputs x: z* = relu(W z* + U x + b) (with the backward mode's gradient).

        ``z0``: where the solve starts (None: zeros; a state, or a start provider ``z0(zeros) -> state``
        such as :meth:`phantomgrad.FixedPointCache.start`); for Peaceman-Rachford it is the auxiliary
        state s, whose relu is z. ``states=(t_1, ...)``: also the states after those solver steps
        (trajectory supervision, see ``pg.DEQ.forward``), returned as a list ending with z*."""
        u = self.inject(x)
        alpha = self.step_size(u)
        start = model_start(z0, torch.zeros_like(u), self.deq)
        if self.splitting == "forward_backward":
            return self.deq((u, alpha), start, states=states)
        eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
        V = torch.linalg.inv(eye + alpha * (eye - self.weight()))  # once per forward, differentiable
        s, info = self.deq((u, alpha, V), start, states=states)
        return ([torch.relu(t) for t in s] if isinstance(s, list) else torch.relu(s)), info


class MonDEQClassifier(nn.Module):
    """An image classifier around :class:`MonDEQ`: ``logits, info = model(images)``.

    ``form="linear"``: images flattened -> monDEQ -> linear head (the paper's fully connected MNIST model).
    ``form="conv"``: a convolutional monDEQ on the image -> average pooling to ``pool`` x ``pool`` ->
    linear head (the paper's single-convolution model).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int,
        hidden: int = 100,
        form: Literal["linear", "conv"] = "linear",
        m: float = 0.05,
        splitting: Literal["forward_backward", "peaceman_rachford"] = "peaceman_rachford",
        alpha: float | None = None,
        kernel_size: int = 3,
        pool: int = 4,
        solver: Solver | None = None,
        backward: BackwardMode | None = None,
    ):
        super().__init__()
        self.in_shape = (in_channels, *image_size)
        features = in_channels * image_size[0] * image_size[1] if form == "linear" else in_channels
        self.mon = MonDEQ(features, hidden, m, splitting, alpha, form, kernel_size, solver, backward)
        self.pool = nn.AdaptiveAvgPool2d(pool) if form == "conv" else nn.Identity()
        self.head = nn.Linear(hidden * (pool * pool if form == "conv" else 1), num_classes)

    def forward(self, x: Tensor, z0: Any = None, states: Sequence[int] | None = None) -> tuple[Any, DEQInfo]:
        """``(logits, info)``; ``z0`` the solve's start, ``states`` trajectory supervision (a list of
        logits, one per requested state and the final one), as in :meth:`MonDEQ.forward`."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"MonDEQClassifier expects images of shape (B, {self.in_shape}), got {tuple(x.shape)}")
        inp = x.flatten(1) if self.mon.form == "linear" else x
        z, info = self.mon(inp, z0, states)
        if isinstance(z, list):
            return [self.head(self.pool(t).flatten(1)) for t in z], info
        return self.head(self.pool(z).flatten(1)), info


# the image task's monDEQ presets: MonDEQClassifier keywords (arch.* overrides them)
PRESETS: dict[str, dict[str, Any]] = {
    # m = 0.5, not the paper's 0.05: on digits it converges (11 of 20 steps, 97.2%) where m = 0.05 does not
    # (20 of 20, relative residual 0.016, 96.9%); docs/convergence.md has the measurement
    "mondeq": {"form": "linear", "hidden": 100, "m": 0.5},
    "mondeq-conv": {"form": "conv", "hidden": 32, "pool": 4, "splitting": "forward_backward"},
}


def build_classifier(
    name: str,
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    arch: dict[str, Any],
    solver: Solver | None = None,
    backward: BackwardMode | None = None,
) -> MonDEQClassifier:
    """The preset ``name`` with ``arch`` overrides (hidden, m, splitting, alpha, kernel_size, pool)."""
    allowed = {"hidden", "m", "splitting", "alpha", "kernel_size", "pool"}
    unknown = sorted(set(arch) - allowed)
    if unknown:
        raise ValueError(f"unknown arch keys {unknown} for {name}; it takes {', '.join(sorted(allowed))}")
    return MonDEQClassifier(
        in_channels, image_size, num_classes, **{**PRESETS[name], **arch}, solver=solver, backward=backward
    )


__all__ = [
    "MonDEQ",
    "MonDEQClassifier",
    "MonotoneLinear",
    "MonotoneConv",
    "ForwardBackwardMap",
    "PeacemanRachfordMap",
    "PRESETS",
    "SPLITTINGS",
    "build_classifier",
]
