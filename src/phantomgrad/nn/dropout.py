"""Variational (locked) dropout for equilibrium layers.

An equilibrium layer evaluates its map F many times in one forward pass: every
solver iteration, then the backward mode's steps. Ordinary dropout would draw a new
mask at each evaluation, so F would change from one iteration to the next and have
no fixed point. Variational dropout (Gal & Ghahramani 2016; used for DEQs by Bai,
Kolter, Koltun 2019 and for MDEQ by Bai, Koltun, Kolter 2020) draws one mask per
forward pass of the *model* and applies that same mask at every evaluation of F.

The mask is drawn by an explicit :meth:`VariationalDropout2d.reset` call, which the
model owning the layer makes at the start of its own forward (``phantomgrad.models.mdeq.MDEQ``
does); a user of such a model never resets anything by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VariationalDropout2d(nn.Module):
    """Channel-wise dropout on (B, C, H, W) features with one mask per model forward.

    ``reset(like)`` draws m ~ Bernoulli(1 - p) of shape (B, C, 1, 1) and scales it by
    1 / (1 - p), so E[m * x] = x; every call until the next ``reset`` returns m * x
    with that same m. One mask entry per sample and channel, shared by all pixels:
    this follows MDEQ's ``VariationalHidDropout2d`` with its default ``spatial=True``
    ("the same mask at every pixel and every layer").

    The layer is the identity in eval mode or when p == 0; ``reset`` then stores
    nothing. Each ``reset`` makes a new mask tensor (never overwrites the old one in
    place), so the autograd graph of an earlier forward keeps the mask it used.

    Args:
        p: probability of zeroing a channel, in [0, 1).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.mask: Tensor | None = None  # not a buffer: it is per forward, not model state

    @property
    def active(self) -> bool:
        """Whether the layer drops anything (training mode and p > 0)."""
        return self.training and self.p > 0

    def reset(self, like: Tensor) -> Tensor | None:
        """Draw the mask for the next forward pass, for inputs shaped like ``like`` (B, C, H, W).

        Returns the mask, or None (and clears it) when the layer is inactive.
        """
        if like.dim() != 4:
            raise ValueError(f"VariationalDropout2d expects (B, C, H, W) tensors, got shape {tuple(like.shape)}")
        if not self.active:
            self.mask = None
            return None
        keep = 1.0 - self.p
        shape = (like.shape[0], like.shape[1], 1, 1)
        self.mask = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)
        return self.mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        mask = self.mask
        if mask is None:
            raise RuntimeError(
                "VariationalDropout2d has no mask: call reset(like) once at the start of the model's forward "
                "(MDEQ does this itself), or put the layer in eval mode"
            )
        if x.dim() != 4 or tuple(mask.shape[:2]) != tuple(x.shape[:2]):
            raise RuntimeError(
                f"VariationalDropout2d mask of shape {tuple(mask.shape)} does not fit input of shape {tuple(x.shape)}; "
                "reset(like) must be called with a tensor of the input's batch size and channels"
            )
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


__all__ = ["VariationalDropout2d"]
