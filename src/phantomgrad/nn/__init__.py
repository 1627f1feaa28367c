"""Reusable layers for implicit models."""

from .dropout import VariationalDropout2d

__all__ = ["VariationalDropout2d"]
