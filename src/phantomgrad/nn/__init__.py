"""Reusable layers for implicit models."""

from .dropout import VariationalDropout, VariationalDropout2d
from .seq_dropout import VariationalSeqDropout

__all__ = ["VariationalDropout", "VariationalDropout2d", "VariationalSeqDropout"]
