"""Implicit models built on :class:`phantomgrad.DEQ`."""
