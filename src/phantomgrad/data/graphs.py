"""Graphs as tensors: the :class:`Graph` record, GCN-normalised sparse adjacency,
batching into one block-diagonal graph, and stratified cross-validation folds.

Readers live beside this module: :mod:`phantomgrad.data.tu` (TU format, MUTAG) and
:mod:`phantomgrad.data.chains` (the synthetic Chains task of IGNN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Graph:
    """One graph: node features ``x`` (n, F) float32, ``edge_index`` (2, E) int64 of
    0-based node ids (row 0 source, row 1 target; an undirected edge appears once in
    each direction), and a graph label ``y`` (-1 when the graph has none)."""

    x: Tensor
    edge_index: Tensor
    y: int = -1

    def __post_init__(self) -> None:
        if self.x.dim() != 2:
            raise ValueError(f"x must be (num_nodes, num_features), got shape {tuple(self.x.shape)}")
        check_edge_index(self.edge_index, self.x.shape[0])

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]


def check_edge_index(edge_index: Tensor, num_nodes: int) -> None:
    """Raise ValueError unless ``edge_index`` is a (2, E) int64 tensor of ids in [0, num_nodes)."""
    if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.dtype != torch.int64:
        raise ValueError(f"edge_index must be a (2, E) int64 tensor, got {tuple(edge_index.shape)} {edge_index.dtype}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(
            f"edge_index holds ids in [{int(edge_index.min())}, {int(edge_index.max())}], "
            f"outside [0, {num_nodes}) for {num_nodes} nodes"
        )


def normalized_adjacency(
    edge_index: Tensor,
    num_nodes: int,
    add_self_loops: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The GCN propagation matrix D^-1/2 (A + I) D^-1/2 as a coalesced sparse COO tensor.

    A[i, j] = 1 for every pair (i, j) listed in ``edge_index`` (duplicates count once);
    pass both directions of an undirected edge, as TU files and :mod:`chains` do, for a
    symmetric result. With ``add_self_loops`` the diagonal of A is set to 1 (A + I for a
    graph without self-loops); without, A is used as is. D is the diagonal of row sums of
    the matrix being normalised; a node of degree 0 gets a zero row and column.
    """
    check_edge_index(edge_index, num_nodes)
    idx = edge_index
    if add_self_loops:
        idx = idx[:, idx[0] != idx[1]]
        loops = torch.arange(num_nodes, dtype=torch.int64).expand(2, num_nodes)
        idx = torch.cat([idx, loops], dim=1)
    shape = (num_nodes, num_nodes)
    # Indices were checked above, so torch's own invariant checks are not needed.
    a = torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1], dtype=dtype), shape, check_invariants=False).coalesce()
    row, col = a.indices()
    values = torch.ones_like(a.values())  # duplicates were summed by coalesce: count them once
    deg = torch.zeros(num_nodes, dtype=dtype).index_add_(0, row, values)
    dinv = deg.pow(-0.5)
    dinv[deg == 0] = 0.0
    return torch.sparse_coo_tensor(
        a.indices(), dinv[row] * values * dinv[col], shape, check_invariants=False, is_coalesced=True
    )


def collate_graphs(graphs: Sequence[Graph], add_self_loops: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch graphs into one disconnected graph.

    Returns ``(x, adj, batch, y)``: node features stacked (N, F) with N the total node
    count; the block-diagonal :func:`normalized_adjacency` (N, N) of all graphs (the
    blocks share no edge, so it equals each graph normalised on its own); ``batch`` (N,)
    int64, the position in ``graphs`` of each node's graph, for pooling (e.g.
    ``torch.zeros(B, F).index_add_(0, batch, h)``); and the labels ``y`` (B,) int64.
    """
    if not graphs:
        raise ValueError("collate_graphs needs at least one graph")
    widths = {g.x.shape[1] for g in graphs}
    if len(widths) != 1:
        raise ValueError(f"graphs have different feature sizes {sorted(widths)}")
    sizes = torch.tensor([g.num_nodes for g in graphs], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    x = torch.cat([g.x for g in graphs], dim=0)
    edge_index = torch.cat([g.edge_index + off for g, off in zip(graphs, offsets.tolist())], dim=1)
    adj = normalized_adjacency(edge_index, int(sizes.sum()), add_self_loops=add_self_loops, dtype=x.dtype)
    batch = torch.repeat_interleave(torch.arange(len(graphs)), sizes)
    y = torch.tensor([g.y for g in graphs], dtype=torch.int64)
    return x, adj, batch, y


def stratified_folds(
    labels: Sequence[int] | Tensor | np.ndarray, n_folds: int = 10, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """``n_folds`` (train_idx, test_idx) pairs of int64 index tensors from a shuffled
    stratified k-fold (scikit-learn's StratifiedKFold with ``random_state=seed``): the
    test parts are disjoint, cover every index once, and keep the class proportions."""
    from sklearn.model_selection import StratifiedKFold  # heavy import, only when used

    y = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    counts = np.unique(y, return_counts=True)[1]
    if n_folds < 2 or counts.min() < n_folds:
        raise ValueError(f"n_folds={n_folds} needs 2 <= n_folds <= the smallest class size {counts.min()}")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [
        (torch.from_numpy(tr.astype(np.int64)), torch.from_numpy(te.astype(np.int64)))
        for tr, te in splitter.split(np.zeros(len(y)), y)
    ]
