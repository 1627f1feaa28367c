"""Variational (locked) dropout for sequences in equilibrium layers.

The sequence counterpart of :class:`phantomgrad.nn.dropout.VariationalDropout2d` (see
:mod:`phantomgrad.nn.dropout` for why an equilibrium layer needs one mask per model forward):
for features of shape (B, L, C) the mask has shape (B, 1, C), shared by every position of
the sequence and every evaluation of F, as in the DEQ transformer of Bai, Kolter, Koltun
(2019) (their ``VariationalHidDropout``), following Gal & Ghahramani (2016).
"""

from __future__ import annotations

from .dropout import VariationalDropout


class VariationalSeqDropout(VariationalDropout):
    """Dropout on (B, L, C) features with one mask per sample and feature, fixed over
    positions and over every call until the next :meth:`reset`; the mask has shape (B, 1, C)."""

    layout = "(B, L, C)"
    shared_dims = (1,)
    owner = "DEQTransformer"


__all__ = ["VariationalSeqDropout"]
