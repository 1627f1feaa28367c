"""Implicit models built on :class:`phantomgrad.DEQ`."""

from .mdeq import MDEQ, MDEQBlock, MDEQConfig

__all__ = ["MDEQ", "MDEQBlock", "MDEQConfig"]
