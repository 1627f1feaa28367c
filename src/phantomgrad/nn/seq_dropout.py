"""Variational (locked) dropout for sequences in equilibrium layers.

The sequence counterpart of :class:`phantomgrad.nn.dropout.VariationalDropout2d`. An
equilibrium layer evaluates its map F many times per forward pass (every solver
iteration, then the backward mode's steps); a mask redrawn at each evaluation would
make F a different function every time, with no fixed point. Here one mask is drawn
per forward pass of the model and shared by every evaluation of F and by every
position of the sequence: for features of shape (B, L, C) the mask has shape
(B, 1, C), as in the DEQ transformer of Bai, Kolter, Koltun (2019) (their
``VariationalHidDropout``), following Gal & Ghahramani (2016).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VariationalSeqDropout(nn.Module):
    """Dropout on (B, L, C) features with one mask per sample and feature, fixed over
    positions and over every call until the next :meth:`reset`.

    ``reset(like)`` draws m ~ Bernoulli(1 - p) of shape (B, 1, C), scaled by 1 / (1 - p)
    so that E[m * x] = x; each later call returns m * x with that same m. The layer is
    the identity in eval mode or when p == 0 (``reset`` then clears the mask). Every
    ``reset`` makes a new tensor (no in-place overwrite), so the autograd graph of an
    earlier forward keeps the mask it used.

    Args:
        p: probability of zeroing a feature, in [0, 1).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.mask: Tensor | None = None  # per forward, not model state: not a buffer

    @property
    def active(self) -> bool:
        """Whether the layer drops anything (training mode and p > 0)."""
        return self.training and self.p > 0

    def reset(self, like: Tensor) -> Tensor | None:
        """Draw the mask for the next forward pass for inputs shaped like ``like`` (B, L, C).

        Returns the mask, or None (and clears it) when the layer is inactive.
        """
        if like.dim() != 3:
            raise ValueError(f"VariationalSeqDropout expects (B, L, C) tensors, got shape {tuple(like.shape)}")
        if not self.active:
            self.mask = None
            return None
        keep = 1.0 - self.p
        shape = (like.shape[0], 1, like.shape[2])
        self.mask = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)
        return self.mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        mask = self.mask
        if mask is None:
            raise RuntimeError(
                "VariationalSeqDropout has no mask: call reset(like) once at the start of the model's forward "
                "(DEQTransformer does this itself), or put the layer in eval mode"
            )
        if x.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[2] != x.shape[2]:
            raise RuntimeError(
                f"VariationalSeqDropout mask of shape {tuple(mask.shape)} does not fit input of shape {tuple(x.shape)}; "
                "reset(like) must be called with a tensor of the input's batch size and features"
            )
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


__all__ = ["VariationalSeqDropout"]
