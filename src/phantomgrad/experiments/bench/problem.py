"""The models the bench drives, cut into stem -> DEQ -> head through their public methods.

Every model offers ``prepare(x) -> (u, z0)`` (the injection and the zero state, with fresh
dropout masks), ``deq`` (a ``pg.DEQ`` over the map F at ``block``), ``head(z)`` and
``forward_context()`` (the context its own forward runs in, e.g. the DEQ transformer's
``parametrize.cached()``); the bench calls exactly these, so it times what the models run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

import phantomgrad as pg
from phantomgrad.models.toy import TanhMap

from .config import BenchConfig

State = Any  # a Tensor or a tuple of Tensors


class _StemDEQHead(nn.Module):
    """What the small bench models share: ``stem`` -> ``deq`` -> ``head``, F at ``block``, no forward context."""

    deq: pg.DEQ

    @property
    def block(self) -> nn.Module:
        return cast(nn.Module, self.deq.f)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class SyntheticModel(_StemDEQHead):
    """x -> Linear (the injection u) -> DEQ of h = tanh(W h + U u + b), ||W||_2 = 0.9 -> Linear -> logits."""

    def __init__(self, dim: int, in_dim: int, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.dim = dim
        self.stem = nn.Linear(in_dim, in_dim)
        self.deq = pg.DEQ(TanhMap(dim, in_dim, 0.9, generator=generator, dtype=torch.float32))
        self.head = nn.Linear(dim, num_classes)

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.stem(x), x.new_zeros(x.shape[0], self.dim)


class ConvCell(nn.Module):
    """A residual conv cell as a new user writes one, the map of the DEQ chapter of the "Deep Implicit
    Layers" tutorial (Kolter, Duvenaud, Johnson, NeurIPS 2020), on (B, C, H, W) states:

    F(z, u) = GN(relu(z + GN(u + conv2(GN(relu(conv1(z))))))), two 3x3 convs, GroupNorm of 8 groups.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.norm1, self.norm2, self.norm3 = (
            nn.GroupNorm(8, hidden),
            nn.GroupNorm(8, channels),
            nn.GroupNorm(8, channels),
        )
        for conv in (self.conv1, self.conv2):
            conv.weight.data.normal_(0, 0.01)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        y = self.norm1(torch.relu(self.conv1(z)))
        return self.norm3(torch.relu(z + self.norm2(u + self.conv2(y))))


class ConvCellModel(_StemDEQHead):
    """images -> 3x3 conv stem (u) -> DEQ of :class:`ConvCell` (48 channels, state 48 x H x W) -> pool -> logits."""

    channels = 48

    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, self.channels, 3, padding=1, bias=True), nn.BatchNorm2d(self.channels))
        self.deq = pg.DEQ(ConvCell(self.channels, 64))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.channels, num_classes))

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = self.stem(x)
        return u, torch.zeros_like(u)


@dataclass
class Problem:
    """A model (see the module docstring), a batch and its labels."""

    name: str
    model: Any  # an nn.Module with deq, block, head, prepare and forward_context (see the module docstring)
    x: Tensor
    y: Tensor

    @property
    def block(self) -> nn.Module:
        return self.model.block

    @property
    def deq(self) -> pg.DEQ:
        return self.model.deq

    def context(self) -> contextlib.AbstractContextManager:
        return self.model.forward_context()

    def prepare(self, x: Tensor) -> tuple[Any, State]:
        return self.model.prepare(x)

    def logits(self, z: State) -> Tensor:
        """The head's logits as (N, classes): a language model's (B, L, V) become (B L, V)."""
        out = self.model.head(z)
        return out.reshape(-1, out.shape[-1])

    def f(self, z: State, u: Any) -> State:
        return self.model.block(z, u)


def build_problem(cfg: BenchConfig) -> Problem:
    """The model (seeded, so every process builds the same weights), a batch and random labels."""
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    classes = 10
    model: nn.Module
    if cfg.model == "synthetic":
        model = SyntheticModel(cfg.dim, cfg.in_dim, classes, gen)
        x = torch.randn(cfg.batch, cfg.in_dim, generator=gen)
        y = torch.randint(0, classes, (cfg.batch,), generator=gen)
    elif cfg.model == "conv-cell":
        model = ConvCellModel(classes)
        x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
        y = torch.randint(0, classes, (cfg.batch,), generator=gen)
    elif cfg.model.startswith("deq-transformer"):
        from phantomgrad.models.transformer import DEQTransformer, TransformerConfig

        model = DEQTransformer(TransformerConfig.named(cfg.model, vocab_size=cfg.vocab))
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)  # position t predicts token t + 1
    else:
        from phantomgrad.models.mdeq import MDEQ, MDEQConfig

        model = MDEQ(MDEQConfig.named(cfg.model, in_channels=3, image_size=cfg.image_size, num_classes=classes))
        x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
        y = torch.randint(0, classes, (cfg.batch,), generator=gen)
    model.to(device=device, dtype=dtype).train()
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)  # token ids stay integers
    return Problem(cfg.model, model, x, y.to(device))


__all__ = ["ConvCell", "ConvCellModel", "Problem", "SyntheticModel", "build_problem", "State"]
