"""Datasets, all read offline from local files or installed packages (see docs/data.md)."""
