"""Graph data: the TU reader, MUTAG, Chains, normalised adjacency, batching and folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from phantomgrad.data import tu
from phantomgrad.data.chains import make_chains
from phantomgrad.data.graphs import Graph, collate_graphs, normalized_adjacency, stratified_folds


def _dense_gcn(edges: list[tuple[int, int]], n: int, self_loops: bool) -> np.ndarray:
    a = np.zeros((n, n))
    for i, j in edges:
        a[i, j] = 1.0
    if self_loops:
        np.fill_diagonal(a, 1.0)
    d = a.sum(1)
    dinv = np.zeros(n)
    dinv[d > 0] = d[d > 0] ** -0.5
    return dinv[:, None] * a * dinv[None, :]


# ---------------------------------------------------------------- TU format


def _write_tu(d: Path, name: str = "TOY", attributes: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    # Graph 1: nodes 1, 2, 5 (a path 1-2-5); graph 2: nodes 3, 4 (one edge); graph 3: node 6 alone.
    # Node 5 sits after graph 2's nodes to check that local ids follow file order per graph.
    (d / f"{name}_graph_indicator.txt").write_text("1\n1\n2\n2\n1\n3\n")
    (d / f"{name}_A.txt").write_text("1, 2\n2, 1\n2, 5\n5, 2\n3, 4\n4, 3\n")
    (d / f"{name}_graph_labels.txt").write_text("1\n-1\n1\n")
    (d / f"{name}_node_labels.txt").write_text("7\n3\n3\n9\n7\n3\n")
    if attributes:
        (d / f"{name}_node_attributes.txt").write_text("0.5\n1.5\n2.5\n3.5\n4.5\n5.5\n")
    return d


def test_tu_reader_on_a_hand_written_fixture(tmp_path):
    ds = tu.load_tu("TOY", data_dir=_write_tu(tmp_path / "TOY"))
    assert len(ds) == 3 and ds.num_classes == 2 and ds.label_values == (-1, 1)
    assert ds.labels.tolist() == [1, 0, 1]
    # Features: one-hot of the node labels over the sorted values (3, 7, 9), then the attribute.
    assert ds.num_features == 4
    g1, g2, g3 = ds.graphs
    assert torch.equal(g1.x, torch.tensor([[0, 1, 0, 0.5], [1, 0, 0, 1.5], [0, 1, 0, 4.5]]))
    assert torch.equal(g2.x, torch.tensor([[1, 0, 0, 2.5], [0, 0, 1, 3.5]]))
    assert torch.equal(g3.x, torch.tensor([[1, 0, 0, 5.5]]))
    assert g1.edge_index.tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]
    assert g2.edge_index.tolist() == [[0, 1], [1, 0]]
    assert g3.edge_index.shape == (2, 0) and g3.edge_index.dtype == torch.int64


def test_tu_reader_without_attributes_and_a_nested_directory(tmp_path):
    _write_tu(tmp_path / "TOY", attributes=False)
    ds = tu.load_tu("TOY", data_dir=tmp_path)  # finds data_dir/TOY
    assert ds.num_features == 3 and all(g.x.sum(1).eq(1).all() for g in ds.graphs)


def test_tu_reader_rejects_bad_files(tmp_path):
    d = _write_tu(tmp_path / "TOY")
    (d / "TOY_A.txt").write_text("1, 3\n")  # nodes 1 and 3 are in different graphs
    with pytest.raises(ValueError, match="different graphs"):
        tu.load_tu("TOY", data_dir=d)
    (d / "TOY_graph_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match="TOY_graph_labels.txt"):
        tu.read_tu(d, "TOY")
    with pytest.raises(FileNotFoundError, match="data_dir"):
        tu.load_tu("NOPE", data_dir=tmp_path)


def test_missing_mutag_says_pip_install_grakel(monkeypatch):
    monkeypatch.setattr(tu, "grakel_data_dir", lambda: None)  # as if grakel were not installed
    with pytest.raises(FileNotFoundError, match=r"pip install grakel.*phantomgrad\[graphs\]"):
        tu.load_tu("MUTAG")


_grakel = tu.grakel_data_dir()


@pytest.mark.skipif(
    _grakel is None or not (_grakel / "MUTAG").is_dir(),
    reason="MUTAG comes with grakel: pip install grakel (extra phantomgrad[graphs])",
)
def test_mutag_from_grakel():
    ds = tu.load_tu("MUTAG")
    assert len(ds) == 188 and ds.num_classes == 2 and ds.label_values == (-1, 1)
    assert ds.labels.bincount().tolist() == [63, 125]
    assert ds.num_features == 7  # 7 atom types, one-hot
    assert sum(g.num_nodes for g in ds.graphs) == 3371
    assert sum(g.num_edges for g in ds.graphs) == 7442
    for g in ds.graphs:
        assert torch.equal(g.x.sum(1), torch.ones(g.num_nodes))
        assert int(g.edge_index.max()) < g.num_nodes
        # undirected: every edge is listed in both directions
        assert set(map(tuple, g.edge_index.T.tolist())) == set(map(tuple, g.edge_index.flip(0).T.tolist()))


# ---------------------------------------------------------------- Chains


def test_chains_labels_live_on_one_end_only():
    c, k, length, f = 3, 4, 7, 5
    ds = make_chains(num_classes=c, chains_per_class=k, chain_len=length, feature_dim=f, split=(10, 20, 30), seed=1)
    n = c * k * length
    assert ds.x.shape == (n, f) and ds.y.shape == (n,) and ds.num_classes == c
    chains = ds.y.view(c * k, length)
    assert torch.equal(chains, chains[:, :1].expand(-1, length))  # one label per chain
    assert ds.y.bincount().tolist() == [k * length] * c
    x = ds.x.view(c * k, length, f)
    assert torch.equal(x[:, 1:], torch.zeros_like(x[:, 1:]))  # only the head carries information
    assert torch.equal(x[:, 0].argmax(1), chains[:, 0]) and torch.equal(x[:, 0].sum(1), torch.ones(c * k))
    # edges: both directions of every (p, p+1) inside a chain, none across chains
    src, dst = ds.edge_index
    assert ds.edge_index.shape == (2, 2 * c * k * (length - 1))
    assert torch.equal((src - dst).abs(), torch.ones_like(src))
    assert torch.equal(src // length, dst // length)
    sizes = [len(ds.train_idx), len(ds.valid_idx), len(ds.test_idx)]
    assert sizes == [10, 20, 30]
    assert len(set(torch.cat([ds.train_idx, ds.valid_idx, ds.test_idx]).tolist())) == 60


def test_chains_is_a_function_of_the_seed():
    a, b, other = make_chains(noise=0.1, seed=3), make_chains(noise=0.1, seed=3), make_chains(noise=0.1, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.train_idx, b.train_idx)
    assert not torch.equal(a.x, other.x) and not torch.equal(a.train_idx, other.train_idx)
    assert float(a.x.view(40, 10, 100)[:, 1:].abs().max()) <= 0.1
    default = make_chains()
    assert default.x.shape == (400, 100) and default.adjacency().shape == (400, 400)
    with pytest.raises(ValueError, match="split"):
        make_chains(split=(300, 100, 1))


# ---------------------------------------------------------------- adjacency, batching, folds


@pytest.mark.parametrize("self_loops", [True, False])
def test_normalized_adjacency_matches_dense_numpy(self_loops):
    n = 9
    rng = np.random.default_rng(0)
    und = {(int(i), int(j)) for i, j in rng.integers(0, n - 1, size=(12, 2)) if i != j}  # node 8 isolated
    edges = [e for i, j in sorted(und) for e in ((i, j), (j, i))]
    edges += [(2, 2), edges[0]]  # a self-loop and a duplicate edge
    ei = torch.tensor(edges, dtype=torch.int64).T
    adj = normalized_adjacency(ei, n, add_self_loops=self_loops)
    assert adj.is_sparse and adj.is_coalesced() and adj.shape == (n, n)
    np.testing.assert_allclose(adj.to_dense().numpy(), _dense_gcn(edges, n, self_loops), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(adj.to_dense().numpy(), adj.to_dense().numpy().T, atol=1e-7)
    with pytest.raises(ValueError, match="outside"):
        normalized_adjacency(ei, 5)


def test_collate_graphs_is_block_diagonal():
    g1 = Graph(torch.randn(3, 2), torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), y=1)
    g2 = Graph(torch.randn(2, 2), torch.tensor([[0, 1], [1, 0]]), y=0)
    g3 = Graph(torch.randn(1, 2), torch.zeros(2, 0, dtype=torch.int64), y=1)
    x, adj, batch, y = collate_graphs([g1, g2, g3])
    assert torch.equal(x, torch.cat([g1.x, g2.x, g3.x]))
    assert batch.tolist() == [0, 0, 0, 1, 1, 2] and y.tolist() == [1, 0, 1]
    dense = adj.to_dense()
    expected = torch.block_diag(*(normalized_adjacency(g.edge_index, g.num_nodes).to_dense() for g in (g1, g2, g3)))
    torch.testing.assert_close(dense, expected)
    with pytest.raises(ValueError, match="feature sizes"):
        collate_graphs([g1, Graph(torch.randn(2, 3), torch.zeros(2, 0, dtype=torch.int64))])


def test_stratified_folds_are_disjoint_cover_and_keep_proportions():
    labels = torch.tensor([0] * 63 + [1] * 125)[torch.randperm(188)]
    folds = stratified_folds(labels, n_folds=10, seed=0)
    assert len(folds) == 10
    tests = torch.cat([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(188))  # disjoint and covering
    for tr, te in folds:
        assert set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == 188
        counts = labels[te].bincount(minlength=2)
        assert abs(int(counts[0]) - 6.3) < 1 and abs(int(counts[1]) - 12.5) < 1
    again = stratified_folds(labels.numpy(), n_folds=10, seed=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(folds, again))
    assert not torch.equal(folds[0][1], stratified_folds(labels, n_folds=10, seed=1)[0][1])
    with pytest.raises(ValueError, match="n_folds"):
        stratified_folds([0, 0, 1], n_folds=2)
