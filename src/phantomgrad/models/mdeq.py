"""The multiscale deep equilibrium model (MDEQ) for image classification.

Bai, Koltun, Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020
(reference code: github.com/locuslab/mdeq); the phantom-gradient paper (Geng et al.,
NeurIPS 2021) trains it on CIFAR-10 and ImageNet with the configurations of its
authors' code (github.com/Gsunshine/phantom_grad), which the presets here follow.

Data path::

    image --MDEQStem--> injection u = (u_0, None, ..., None)
          --DEQ--> z* = F(z*, u),  z = (z_0, ..., z_{n-1}),  z_i of c_i channels at resolution ~ H / 2^(d+i)
          --MDEQHead--> logits

where d = ``downsample_times`` (stride-2 stem convolutions) and sizes halve by
ceil(s / 2) from one branch to the next, so any image size works.

The equilibrium map F (:class:`MDEQBlock`) is one layer with n parallel resolution
streams and two steps:

1. per branch a residual block (:class:`ResidualBlock`), with GN = GroupNorm::

       y_i = GN3(ReLU(GN2(drop(conv3x3(ReLU(GN1(conv3x3(z_i))))) + u_i) + z_i))

2. multiscale fusion: every branch receives every branch, resampled to its
   resolution, then a post-fuse step (:class:`PostFuse`)::

       z_i' = GN(conv1x1(ReLU(sum_j T_ij(y_j))))

   with T_ii the identity, T_ij for a coarser j > i a 1x1 conv + GN + nearest
   upsampling (:class:`FuseUp`), and T_ij for a finer j < i a chain of i - j stride-2
   3x3 convs with GN, ReLU between them (:class:`FuseDown`).

Choices, each as in the authors' code:

* Injection: only the highest resolution receives the image's features; every other
  branch gets no injection (MDEQ adds zeros there; here ``None`` skips the add).
* The post-fuse step has a 1x1 conv before its GroupNorm (GroupNorm with half the
  groups), as in locuslab/mdeq.
* Weight normalisation (``torch.nn.utils.parametrizations.weight_norm``, dim 0) on the
  two convs of every residual block and the post-fuse 1x1 convs. The fusion convs
  are followed by GroupNorm, which makes their scale irrelevant, and are left plain.
* Initialisation: PyTorch's defaults. The reference code draws convs from N(0, 0.01)
  *after* weight-normalising them, which only overwrites a cached weight; the
  weight-normalised convs therefore keep the default init, and every other conv is
  followed by a norm that removes its scale. Note that the untrained map is *not* a
  contraction once there are two or more branches: the normalised cross-resolution
  fusion amplifies, and a solve from z0 = 0 stalls near a relative residual of 0.1
  (a one-branch map converges). The same holds for the reference code's
  architecture; watch ``info.rel_residual`` during training.
* Stem and head use BatchNorm; they run once per forward, outside the equilibrium,
  so batch statistics never enter F, which uses GroupNorm only.
* Dropout: :class:`~phantomgrad.nn.dropout.VariationalDropout2d` after the second
  conv of every residual block; :class:`MDEQ` redraws the masks at the start of
  every forward, and every evaluation of F in that forward (solver, backward mode,
  unrolled layers) uses them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm

from ..backward import BackwardMode
from ..deq import DEQ, DEQInfo
from ..init import model_start
from ..nn.dropout import VariationalDropout2d
from ..solvers import Solver
from .mdeq_config import PRESETS, MDEQConfig, half_size

Injection = tuple[Tensor | None, ...]


# ----------------------------------------------------------------------------- layers of F


def _conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


def _maybe_weight_norm(conv: nn.Conv2d, enabled: bool) -> nn.Conv2d:
    """w = g * v / ||v|| per output channel, via torch's parametrization (g starts at ||w||)."""
    return _torch_weight_norm(conv, name="weight", dim=0) if enabled else conv


class ResidualBlock(nn.Module):
    """One branch's residual block of F (MDEQ's BasicBlock):

        y = GN3(ReLU(GN2(drop(conv2(ReLU(GN1(conv1(z))))) + u) + z)),

    conv1: c -> expansion * c, conv2: back to c, both 3x3 without bias. ``u`` (the
    injection) may be None: no injection into this branch.
    """

    def __init__(self, channels: int, expansion: int, num_groups: int, dropout: float, weight_norm: bool):
        super().__init__()
        inner = expansion * channels
        self.conv1 = _maybe_weight_norm(_conv3x3(channels, inner), weight_norm)
        self.norm1 = nn.GroupNorm(num_groups, inner)
        self.conv2 = _maybe_weight_norm(_conv3x3(inner, channels), weight_norm)
        self.drop = VariationalDropout2d(dropout)
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.norm3 = nn.GroupNorm(num_groups, channels)

    def forward(self, z: Tensor, u: Tensor | None) -> Tensor:
        h = F.relu(self.norm1(self.conv1(z)))
        h = self.drop(self.conv2(h))
        if u is not None:
            h = h + u
        h = self.norm2(h) + z
        return self.norm3(F.relu(h))


class FuseUp(nn.Module):
    """From a coarser branch to a finer one: 1x1 conv (c_in -> c_out), GroupNorm, nearest upsampling."""

    def __init__(self, c_in: int, c_out: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
        self.norm = nn.GroupNorm(num_groups, c_out)

    def forward(self, y: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.norm(self.conv(y)), size=size, mode="nearest")


class FuseDown(nn.Module):
    """From a finer branch to a coarser one, ``levels`` resolutions down: a chain of
    stride-2 3x3 convs, each followed by GroupNorm, with ReLU between them. The
    intermediate convs keep c_in channels, the last maps to c_out."""

    def __init__(self, c_in: int, c_out: int, levels: int, num_groups: int):
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(levels):
            last = k == levels - 1
            c_next = c_out if last else c_in
            layers += [_conv3x3(c_in, c_next, stride=2), nn.GroupNorm(num_groups, c_next)]
            if not last:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, y: Tensor, size: tuple[int, int]) -> Tensor:
        return self.net(y)  # the stride-2 convs reach ``size`` by construction (ceil halving)


class PostFuse(nn.Module):
    """After summing the resampled branches: ReLU, 1x1 conv, GroupNorm (half the groups)."""

    def __init__(self, channels: int, num_groups: int, weight_norm: bool):
        super().__init__()
        self.conv = _maybe_weight_norm(nn.Conv2d(channels, channels, kernel_size=1, bias=False), weight_norm)
        self.norm = nn.GroupNorm(max(1, num_groups // 2), channels)

    def forward(self, y: Tensor) -> Tensor:
        return self.norm(self.conv(F.relu(y)))


class MDEQBlock(nn.Module):
    """The equilibrium map F(z, u) of MDEQ: a residual block per resolution branch, then
    multiscale fusion (see the module docstring).

    ``forward(z, u)`` takes the state z = (z_0, ..., z_{n-1}), z_i of shape
    (B, c_i, H_i, W_i), highest resolution first, and the injection u, a tuple of the
    same length whose entries are tensors shaped like z_i or None (no injection).
    It returns the next state with the structure of z. The fusion resamples to each
    branch's actual size, so any sizes with H_{i+1} = ceil(H_i / 2) work.

    With dropout > 0 in training, call :meth:`reset_dropout` once per forward of the
    model before the first evaluation (:class:`MDEQ` does).
    """

    def __init__(
        self,
        channels: Sequence[int],
        expansion: int = 5,
        num_groups: int = 8,
        dropout: float = 0.0,
        weight_norm: bool = True,
    ):
        super().__init__()
        self.channels = tuple(channels)
        n = len(self.channels)
        self.branches = nn.ModuleList(
            ResidualBlock(c, expansion, num_groups, dropout, weight_norm) for c in self.channels
        )
        self.fuse = nn.ModuleDict()  # key "j_to_i": the transform T_ij from branch j into branch i
        for i in range(n):
            for j in range(n):
                if j > i:
                    self.fuse[f"{j}_to_{i}"] = FuseUp(self.channels[j], self.channels[i], num_groups)
                elif j < i:
                    self.fuse[f"{j}_to_{i}"] = FuseDown(self.channels[j], self.channels[i], i - j, num_groups)
        self.post_fuse = nn.ModuleList(PostFuse(c, num_groups, weight_norm) for c in self.channels)

    def reset_dropout(self, like: Sequence[Tensor]) -> None:
        """Draw every branch's dropout mask for states shaped like ``like`` (or clear it when inactive)."""
        for branch, z in zip(self.branches, like):
            cast(ResidualBlock, branch).drop.reset(z)

    def forward(self, z: Sequence[Tensor], u: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
        n = len(self.channels)
        if len(z) != n or len(u) != n:
            raise ValueError(
                f"MDEQBlock has {n} branches but got a state of {len(z)} and an injection of {len(u)} parts"
            )
        ys = [branch(z_i, u_i) for branch, z_i, u_i in zip(self.branches, z, u)]
        out = []
        for i in range(n):
            size = tuple(ys[i].shape[-2:])
            total = ys[i]
            for j in range(n):
                if j != i:
                    total = total + self.fuse[f"{j}_to_{i}"](ys[j], size)
            out.append(self.post_fuse[i](total))
        return tuple(out)


# ----------------------------------------------------------------------------- stem and head


def _outer_norm(kind: str, channels: int, affine: bool = True) -> nn.Module:
    """BatchNorm2d, or GroupNorm with up to 8 groups, for the layers outside F."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=affine)
    return nn.GroupNorm(math.gcd(8, channels), channels, affine=affine)


class MDEQStem(nn.Module):
    """Computes the injection u from the image, outside the equilibrium.

    Two [3x3 conv -> BatchNorm -> ReLU] layers to c_0 channels (the first
    ``downsample_times`` of them with stride 2), then, except for the smallest models
    (no downsampling and at most 2 branches, where the authors' code skips it), a
    [1x1 conv -> BatchNorm -> ReLU] injection layer. Returns (u_0, None, ..., None):
    only the highest-resolution branch is injected, as in MDEQ.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], downsample_times: int, norm: str = "batch"):
        super().__init__()
        c0 = channels[0]
        self.num_branches = len(channels)
        self.net = nn.Sequential(
            _conv3x3(in_channels, c0, stride=2 if downsample_times >= 1 else 1),
            _outer_norm(norm, c0),
            nn.ReLU(),
            _conv3x3(c0, c0, stride=2 if downsample_times >= 2 else 1),
            _outer_norm(norm, c0),
            nn.ReLU(),
        )
        if downsample_times == 0 and len(channels) <= 2:
            self.inject: nn.Module = nn.Identity()
        else:
            self.inject = nn.Sequential(nn.Conv2d(c0, c0, kernel_size=1, bias=False), _outer_norm(norm, c0), nn.ReLU())

    def forward(self, x: Tensor) -> Injection:
        u0 = self.inject(self.net(x))
        return (u0,) + (None,) * (self.num_branches - 1)


class Bottleneck(nn.Module):
    """ResNet bottleneck widening c_in to 4 * width (MDEQ's per-branch head module):
    1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 -> BN (BNs without affine), plus a
    projected shortcut (1x1 conv -> BN), then ReLU."""

    expansion = 4

    def __init__(self, c_in: int, width: int, norm: str = "batch"):
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, kernel_size=1, bias=False),
            _outer_norm(norm, width, affine=False),
            nn.ReLU(),
            _conv3x3(width, width),
            _outer_norm(norm, width, affine=False),
            nn.ReLU(),
            nn.Conv2d(width, c_out, kernel_size=1, bias=False),
            _outer_norm(norm, c_out, affine=False),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), _outer_norm(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class MDEQHead(nn.Module):
    """Classification head over all branches (MDEQ's):

        y = B_0(z_0);  y = B_{i+1}(z_{i+1}) + D_i(y) for i = 0..n-2;
        logits = Linear(mean_HW(ReLU(BN(conv1x1(y)))))

    with B_i a :class:`Bottleneck` to 4 * head_channels[i] and D_i a stride-2 3x3
    conv (with bias) -> BN -> ReLU from branch i's head width to branch i+1's.
    """

    def __init__(
        self,
        channels: Sequence[int],
        head_channels: Sequence[int],
        final_channels: int,
        num_classes: int,
        norm: str = "batch",
    ):
        super().__init__()
        widths = [h * Bottleneck.expansion for h in head_channels]
        self.increase = nn.ModuleList(Bottleneck(c, h, norm) for c, h in zip(channels, head_channels))
        self.downsample = nn.ModuleList(
            nn.Sequential(
                _conv3x3(widths[i], widths[i + 1], stride=2, bias=True), _outer_norm(norm, widths[i + 1]), nn.ReLU()
            )
            for i in range(len(widths) - 1)
        )
        self.final = nn.Sequential(
            nn.Conv2d(widths[-1], final_channels, kernel_size=1), _outer_norm(norm, final_channels), nn.ReLU()
        )
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        y = self.increase[0](z[0])
        for i, down in enumerate(self.downsample):
            y = self.increase[i + 1](z[i + 1]) + down(y)
        y = self.final(y)
        return self.classifier(y.mean(dim=(2, 3)))


class MDEQInitHead(nn.Module):
    """A learned initial state of MDEQ (SkipDEQ's explicit network, HyperDEQ's initialiser): from the
    injection u_0 (B, c_0, H, W), a shared 3x3 conv -> GroupNorm -> ReLU, then per branch i an
    average pool to that branch's size and a 1x1 conv to c_i channels:

        g(u)_i = conv1x1_i(avgpool_{H_i x W_i}(ReLU(GN(conv3x3(u_0)))))

    Two convs deep and about 1/(expansion * branches) of F's cost; trained by ``info.init_loss``
    alone (the layer detaches u where it enters, so the stem is not bent towards it)."""

    def __init__(self, channels: Sequence[int], num_groups: int):
        super().__init__()
        c0 = channels[0]
        self.trunk = nn.Sequential(_conv3x3(c0, c0), nn.GroupNorm(num_groups, c0), nn.ReLU())
        self.out = nn.ModuleList(nn.Conv2d(c0, c, kernel_size=1) for c in channels)

    def forward(self, u: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
        u0 = u[0]
        assert u0 is not None  # MDEQ injects the highest resolution
        h = self.trunk(u0)
        size = tuple(h.shape[-2:])
        out = []
        for conv in self.out:
            out.append(conv(h if tuple(h.shape[-2:]) == size else F.adaptive_avg_pool2d(h, size)))
            size = (half_size(size[0]), half_size(size[1]))
        return tuple(out)


# ----------------------------------------------------------------------------- the model


class MDEQ(nn.Module):
    """Multiscale deep equilibrium classifier.

    ``forward(x)`` returns ``(logits, info)``: the stem computes the injection, the
    dropout masks are redrawn, ``pg.DEQ`` solves z* = F(z*, u) from z0 = 0 with
    ``solver`` and attaches the gradient of ``backward``, and the head classifies z
    (in training with ``pg.UPG``, z is UPG's h_k; in eval or under no_grad, h*).
    ``info`` is the forward solve's :class:`~phantomgrad.deq.DEQInfo`.

    Args:
        config: the architecture, e.g. ``MDEQConfig.named("mdeq-tiny")``.
        solver: forward solver (``pg.DEQ``'s default when None).
        backward: backward mode (``pg.DEQ``'s default when None).
    """

    def __init__(self, config: MDEQConfig, solver: Solver | None = None, backward: BackwardMode | None = None):
        super().__init__()
        if not isinstance(config, MDEQConfig):
            raise TypeError(
                f"config must be an MDEQConfig (e.g. MDEQConfig.named('mdeq-tiny')), got {type(config).__name__}"
            )
        self.config = config
        self.stem = MDEQStem(config.in_channels, config.channels, config.downsample_times, config.outer_norm)
        block = MDEQBlock(config.channels, config.expansion, config.num_groups, config.dropout, config.weight_norm)
        init = MDEQInitHead(config.channels, config.num_groups) if config.init_head else None
        # F lives at self.deq.f (one copy in state_dict), the init head (arch.init_head) at self.deq.init
        self.deq = DEQ(block, solver=solver, backward=backward, init=init)
        self.head = MDEQHead(
            config.channels, config.head_channels, config.final_channels, config.num_classes, config.outer_norm
        )

    @property
    def block(self) -> MDEQBlock:
        """The equilibrium map F."""
        return cast(MDEQBlock, self.deq.f)

    def forward(self, x: Tensor, states: Sequence[int] | None = None, z0: Any = None) -> tuple[Any, DEQInfo]:
        """``(logits, info)`` for images x (see the class docstring). Pretraining, F as a
        weight-tied stack trained by backprop, is this forward with the DEQ's solve and gradient
        swapped: ``with pg.pretraining(model, depth): logits, info = model(x)``.

        ``z0`` is where the solve starts: None for the model's own start (zeros, or the init
        head's guess with ``init_head=True``), a tuple of per-branch states, or a start provider
        ``z0(default) -> state`` such as :meth:`phantomgrad.FixedPointCache.start`.

        With ``states=(4, 8)`` (trajectory supervision) it returns a list of logits instead: the
        head applied to the states after 4 and 8 solver steps and to the final state, each state
        carrying the backward mode's gradient made there (see ``pg.DEQ.forward``)."""
        with self.forward_context():
            u, zeros = self.prepare(x)
            start = model_start(z0, zeros, self.deq)
            if states:
                zs, info = self.deq(u, start, states=states)
                return [self.head(z) for z in zs], info
            z, info = self.deq(u, start)
            return self.head(z), info

    def forward_context(self) -> contextlib.AbstractContextManager:
        """The context one forward (:meth:`prepare`, ``self.deq``, ``self.head``) runs in: none for MDEQ.
        Code that drives the pieces itself (``phantomgrad bench``) enters it as :meth:`forward` does."""
        return contextlib.nullcontext()

    def prepare(self, x: Tensor) -> tuple[Injection, tuple[Tensor, ...]]:
        """Everything before the DEQ: check the images, compute the injection u = stem(x), make
        z0 = 0 (one zero state per branch) and redraw the dropout masks of F for this forward.

        Returns ``(u, z0)``; the forward is then ``z, info = self.deq(u, z0)`` (solving
        z* = F(z*, u) with F = :attr:`block`) and ``logits = self.head(z)``.
        """
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or tuple(x.shape[-2:]) != cfg.image_size:
            raise ValueError(
                f"MDEQ expects images of shape (B, {cfg.in_channels}, {cfg.image_size[0]}, {cfg.image_size[1]}), "
                f"got {tuple(x.shape)}; build the config with the data's in_channels and image_size"
            )
        u = self.stem(x)
        u0 = u[0]
        batch, (h, w) = u0.shape[0], u0.shape[-2:]
        z0 = []
        for c in cfg.channels:
            z0.append(u0.new_zeros(batch, c, h, w))
            h, w = half_size(h), half_size(w)
        state = tuple(z0)
        self.block.reset_dropout(state)
        return u, state

    def equilibrium(self, x: Tensor) -> tuple[tuple[Tensor, ...], Injection, DEQInfo]:
        """The fixed point z* = F(z*, u) for images x, without gradients: ``(z*, u, info)``.
        For diagnostics such as ``pg.spectral_radius(model.block, z, u)``."""
        with torch.no_grad():
            u, zeros = self.prepare(x)
            z, info = self.deq(u, model_start(None, zeros, self.deq))
        return z, u, info


__all__ = [
    "PRESETS",
    "MDEQConfig",
    "MDEQ",
    "MDEQBlock",
    "MDEQStem",
    "MDEQHead",
    "MDEQInitHead",
    "ResidualBlock",
    "FuseUp",
    "FuseDown",
    "PostFuse",
    "Bottleneck",
]
