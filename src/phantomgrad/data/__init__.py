"""Datasets, all read offline from local files or installed packages (see docs/data.md).

:data:`DATASETS` is the one list of dataset names, by the kind of task that reads them: the
image names are the loaders of :mod:`.images`, the text names the corpora of :mod:`.text`.
"""

from .images import IMAGE_DATASETS
from .text import CORPORA

GRAPH_DATASETS: tuple[str, ...] = ("mutag", "tu", "chains")  # TU format (mutag: MUTAG from grakel); synthetic chains

DATASETS: dict[str, tuple[str, ...]] = {"image": IMAGE_DATASETS, "lm": CORPORA, "graph": GRAPH_DATASETS}

__all__ = ["DATASETS", "IMAGE_DATASETS", "CORPORA", "GRAPH_DATASETS"]
