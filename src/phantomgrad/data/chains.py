"""The synthetic Chains node-classification task of IGNN (Gu et al., 2020), generated
from a seed; no files.

There are ``num_classes * chains_per_class`` disjoint chains (paths) of ``chain_len``
nodes; every node of a chain of class c has label c. Only the first node of a chain
says which: its features hold the one-hot vector of c in their first ``num_classes``
entries. All other features are 0 plus, if ``noise > 0``, independent uniform noise
in [-noise, noise] on every entry of every node. A model must carry the label
``chain_len - 1`` hops to the far end, so the task measures long-range propagation.

Node ``((c * chains_per_class) + k) * chain_len + p`` is position p of chain k of
class c. Edges join positions p and p + 1 in both directions. The train/valid/test
nodes are disjoint, drawn from a random permutation; the defaults (2 classes, 20
chains per class, length 10, 100 features, 20/100/200 nodes) are those of the IGNN
code, whose paper also uses a 5%/10%/85% split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .graphs import normalized_adjacency


@dataclass(frozen=True)
class NodeDataset:
    """One graph with per-node features ``x`` (N, F), labels ``y`` (N,) int64, edges
    ``edge_index`` (2, E) int64, and disjoint node index sets for train/valid/test."""

    x: Tensor
    edge_index: Tensor
    y: Tensor
    train_idx: Tensor
    valid_idx: Tensor
    test_idx: Tensor
    num_classes: int

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_features(self) -> int:
        return self.x.shape[1]

    def adjacency(self, add_self_loops: bool = True) -> Tensor:
        """The sparse D^-1/2 (A + I) D^-1/2 of the graph (see :func:`normalized_adjacency`)."""
        return normalized_adjacency(self.edge_index, self.num_nodes, add_self_loops, dtype=self.x.dtype)


def make_chains(
    num_classes: int = 2,
    chains_per_class: int = 20,
    chain_len: int = 10,
    feature_dim: int = 100,
    noise: float = 0.0,
    split: tuple[int, int, int] = (20, 100, 200),
    seed: int = 0,
) -> NodeDataset:
    """Generate the Chains dataset described in the module doc; the same arguments give
    the same tensors. ``split`` is the number of train, valid and test nodes."""
    if num_classes < 2 or chains_per_class < 1 or chain_len < 1:
        raise ValueError(
            f"need num_classes >= 2, chains_per_class >= 1, chain_len >= 1; got "
            f"{num_classes}, {chains_per_class}, {chain_len}"
        )
    if feature_dim < num_classes:
        raise ValueError(f"feature_dim={feature_dim} must be >= num_classes={num_classes} (one-hot of the label)")
    if noise < 0:
        raise ValueError(f"noise={noise} must be >= 0")
    num_chains = num_classes * chains_per_class
    n = num_chains * chain_len
    if len(split) != 3 or min(split) < 0 or sum(split) > n:
        raise ValueError(f"split={tuple(split)} must be 3 node counts adding up to at most {n} nodes")
    gen = torch.Generator().manual_seed(seed)

    chain_class = torch.arange(num_classes).repeat_interleave(chains_per_class)  # (num_chains,)
    y = chain_class.repeat_interleave(chain_len)
    x = (torch.rand(n, feature_dim, generator=gen) * 2 - 1) * noise
    heads = torch.arange(num_chains) * chain_len
    x[heads, chain_class] += 1.0

    pos = torch.arange(n) % chain_len
    src = torch.arange(n)[pos < chain_len - 1]
    edge_index = torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], dim=1)

    perm = torch.randperm(n, generator=gen)
    a, b, c = split
    return NodeDataset(
        x=x,
        edge_index=edge_index,
        y=y,
        train_idx=perm[:a],
        valid_idx=perm[a : a + b],
        test_idx=perm[a + b : a + b + c],
        num_classes=num_classes,
    )
