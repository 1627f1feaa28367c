"""Variational (locked) dropout for equilibrium layers.

An equilibrium layer evaluates its map F many times in one forward pass: every
solver iteration, then the backward mode's steps. Ordinary dropout would draw a new
mask at each evaluation, so F would change from one iteration to the next and have
no fixed point. Variational dropout (Gal & Ghahramani 2016; used for DEQs by Bai,
Kolter, Koltun 2019 and for MDEQ by Bai, Koltun, Kolter 2020) draws one mask per
forward pass of the *model* and applies that same mask at every evaluation of F.

The mask is drawn by an explicit :meth:`VariationalDropout.reset` call, which the
model owning the layer makes at the start of its own forward (``phantomgrad.models.mdeq.MDEQ``
and ``phantomgrad.models.transformer.DEQTransformer`` do); a user of such a model never
resets anything by hand. The layers differ only in the shape of the mask:
:class:`VariationalDropout2d` shares it over pixels, :class:`~phantomgrad.nn.seq_dropout.VariationalSeqDropout`
over sequence positions.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn


class VariationalDropout(nn.Module):
    """Dropout with one mask per model forward, shared over the dimensions ``shared_dims``.

    ``reset(like)`` draws m ~ Bernoulli(1 - p), of the shape of ``like`` with size 1 on
    ``shared_dims``, and scales it by 1 / (1 - p), so E[m * x] = x; every call until the
    next ``reset`` returns m * x with that same m.

    The layer is the identity in eval mode or when p == 0; ``reset`` then stores
    nothing. Each ``reset`` makes a new mask tensor (never overwrites the old one in
    place), so the autograd graph of an earlier forward keeps the mask it used.
    A subclass sets ``layout`` (e.g. ``"(B, C, H, W)"``), its number of dimensions and
    ``shared_dims``.

    Args:
        p: probability of zeroing an entry of the mask, in [0, 1).
    """

    layout: ClassVar[str]
    shared_dims: ClassVar[tuple[int, ...]]
    owner: ClassVar[str] = "the model"  # who calls reset, for the error message

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.mask: Tensor | None = None  # not a buffer: it is per forward, not model state

    @property
    def ndim(self) -> int:
        return len(self.layout.strip("()").split(","))

    @property
    def active(self) -> bool:
        """Whether the layer drops anything (training mode and p > 0)."""
        return self.training and self.p > 0

    def reset(self, like: Tensor) -> Tensor | None:
        """Draw the mask for the next forward pass, for inputs shaped like ``like``.

        Returns the mask, or None (and clears it) when the layer is inactive.
        """
        name = type(self).__name__
        if like.dim() != self.ndim:
            raise ValueError(f"{name} expects {self.layout} tensors, got shape {tuple(like.shape)}")
        if not self.active:
            self.mask = None
            return None
        keep = 1.0 - self.p
        shape = tuple(1 if d in self.shared_dims else s for d, s in enumerate(like.shape))
        self.mask = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)
        return self.mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        mask = self.mask
        name = type(self).__name__
        if mask is None:
            raise RuntimeError(
                f"{name} has no mask: call reset(like) once at the start of the model's forward "
                f"({self.owner} does this itself), or put the layer in eval mode"
            )
        kept = [d for d in range(self.ndim) if d not in self.shared_dims]
        if x.dim() != self.ndim or any(mask.shape[d] != x.shape[d] for d in kept):
            raise RuntimeError(
                f"{name} mask of shape {tuple(mask.shape)} does not fit input of shape {tuple(x.shape)}; "
                f"reset(like) must be called with a tensor of the input's sizes on dimensions {kept}"
            )
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class VariationalDropout2d(VariationalDropout):
    """Channel-wise dropout on (B, C, H, W) features with one mask per model forward.

    The mask has shape (B, C, 1, 1): one entry per sample and channel, shared by all
    pixels. This follows MDEQ's ``VariationalHidDropout2d`` with its default
    ``spatial=True`` ("the same mask at every pixel and every layer").
    """

    layout = "(B, C, H, W)"
    shared_dims = (2, 3)
    owner = "MDEQ"


__all__ = ["VariationalDropout", "VariationalDropout2d"]
