"""Implicit graph neural networks (IGNN) on :class:`phantomgrad.DEQ`.

IGNN is due to F. Gu, H. Chang, W. Zhu, S. Sojoudi and L. El Ghaoui, "Implicit Graph
Neural Networks", NeurIPS 2020. This is an independent implementation of its model on
phantomgrad's solvers and backward modes; no code was copied.

The layer
---------
With n nodes, input features U (p x n), hidden size m and a normalised adjacency A
(n x n), the node states X (m x n) are the fixed point

    X = phi(W X A + Omega U A),          phi = ReLU,  W (m x m),  Omega (m x p).

Here states are stored node-major, Z = X^T (n x m), the layout of node features in
torch; for a symmetric A (the GCN matrix D^-1/2 (A + I) D^-1/2 used throughout
phantomgrad) the equation reads

    Z = relu(A Z W^T + A U^T Omega^T),

i.e. node i aggregates W z_j + Omega u_j over its neighbours j with weights A_ij. (For a
non-symmetric A, pass its transpose.) The injection B = A U^T Omega^T does not depend on
Z and is computed once per forward pass; the DEQ solves Z = relu(A Z W^T + B).

Well-posedness (IGNN, Thm. 4.1 via Perron-Frobenius): in vectorised form the linear part
is Z -> A Z W^T, whose absolute value has spectral radius rho(|W|) rho(A) <=
||W||_inf rho(A) for a nonnegative A. Since ReLU is monotone and 1-Lipschitz
componentwise, the equation has a unique solution, reached by fixed-point iteration at a
linear rate, whenever

    ||W||_inf < kappa / rho(A),   kappa < 1,

with ||W||_inf = max_i sum_j |W_ij| (the norm induced by the vector infinity norm). We
keep W in that ball by projecting it after every optimiser step (projected gradient
descent, as in IGNN); evaluation never projects.

rho(A): for the GCN matrix with self-loops, rho(A) = 1 exactly for every graph (the
positive vector D^{1/2} 1 is an eigenvector with eigenvalue 1, so by Perron-Frobenius it is
the spectral radius). :func:`perron_bound` gives a cheap, rigorous upper bound
(Collatz-Wielandt) for any nonnegative sparse A, computed once per dataset.

The projection onto {W : ||W||_inf <= r} in the Frobenius norm splits by rows, since the
constraint is "every row has l1 norm <= r": each row outside is projected onto the l1 ball
(the sort-and-threshold algorithm of Duchi, Shalev-Shwartz, Singer and Chandra, 2008),
batched over rows in torch.

Batches of graphs
-----------------
A batch of graphs is one block-diagonal graph (see
:func:`phantomgrad.data.graphs.collate_graphs`); the whole batch is ONE sample of the
DEQ, the flat state of shape (1, n * m). Solvers stop per sample, so this makes the
stopping test global: a solver never freezes part of the nodes while their neighbours
are still moving (with nodes as the batch dimension it would, and the frozen nodes would
then feed stale states to their neighbours). The price is that the slowest graph in the
batch sets the number of iterations for all.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

import phantomgrad as pg
from phantomgrad.init import model_start

# ----------------------------------------------------------------------------- projection


def project_rows_l1(w: Tensor, radius: float) -> Tensor:
    """Euclidean projection of every row of ``w`` onto the l1 ball {v : ||v||_1 <= radius}.

    Equivalently, the Frobenius-norm projection of the matrix onto the induced
    infinity-norm ball {W : ||W||_inf = max_i ||W_i||_1 <= radius}. Rows already inside
    are returned unchanged. For a row v outside, with u = |v| sorted in decreasing order,
    c_j = sum_{i <= j} u_i, and r the largest j with u_j > (c_j - radius) / j, the
    projection is sign(v) * max(|v| - theta, 0), theta = (c_r - radius) / r.
    """
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    if w.dim() != 2:
        raise ValueError(f"w must be a matrix, got shape {tuple(w.shape)}")
    a = w.abs()
    outside = a.sum(dim=1) > radius
    if w.numel() == 0:
        return w.clone()
    # No early return when every row is inside: asking would be a host sync on every optimiser step; rows
    # inside keep w exactly (torch.where), and count >= 1 on every row since u_1 > u_1 - radius.
    u = a.sort(dim=1, descending=True).values
    excess = u.cumsum(dim=1) - radius
    j = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=w.dtype)
    count = (u * j > excess).sum(dim=1, keepdim=True)  # the condition holds on a prefix, so this is r
    theta = (excess.gather(1, count - 1) / count.to(w.dtype)).clamp_min(0)
    projected = w.sign() * (a - theta).clamp_min(0)
    return torch.where(outside[:, None], projected, w)


def inf_norm(w: Tensor) -> float:
    """||W||_inf = max_i sum_j |W_ij|, the norm induced by the vector infinity norm."""
    return float(w.detach().abs().sum(dim=1).max())


def perron_bound(adj: Tensor, iters: int = 200) -> float:
    """A rigorous upper bound on the spectral radius of a nonnegative (sparse) matrix A.

    Collatz-Wielandt: for a nonnegative A and any positive vector x,
    rho(A) <= max_i (A x)_i / x_i. The x used is the power iterate (A + I)^iters 1
    (the shift keeps it positive and avoids the oscillation of bipartite graphs), so the
    bound tightens towards rho(A) as ``iters`` grows. For the GCN matrix with self-loops
    it is 1 up to rounding. Computed once per dataset, not per step.
    """
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be square, got shape {tuple(adj.shape)}")
    values = adj.coalesce().values() if adj.is_sparse else adj
    if values.numel() and float(values.min()) < 0:
        raise ValueError("perron_bound needs a nonnegative adjacency; for other matrices pass rho= to IGNN yourself")
    n = adj.shape[0]
    x = torch.ones(n, 1, dtype=torch.float64)
    a = adj.to(torch.float64)
    for _ in range(iters):
        x = _spmm(a, x) + x
        x = x / x.max()
    ratio = _spmm(a, x) / x
    return float(ratio.max()) if n else 0.0


def _spmm(adj: Tensor, dense: Tensor) -> Tensor:
    return torch.sparse.mm(adj, dense) if adj.is_sparse else adj @ dense


# ----------------------------------------------------------------------------- the map F


class Adjacency:
    """A (sparse) adjacency handed to the map F alongside the injection.

    A plain holder rather than a bare tensor: :class:`phantomgrad.DEQ` checks that every
    tensor in its input is finite, which torch cannot do on a sparse COO tensor.
    """

    __slots__ = ("matrix",)

    def __init__(self, matrix: Tensor):
        self.matrix = matrix

    def __matmul__(self, dense: Tensor) -> Tensor:
        return _spmm(self.matrix, dense)


class ImplicitGraphMap(nn.Module):
    """F(Z, (B, A)) = relu(A Z W^T + B) on states of shape (1, n, m) (one DEQ sample per batch of graphs)."""

    def __init__(self, hidden: int):
        super().__init__()
        bound = 1.0 / math.sqrt(hidden)
        self.W = nn.Parameter(torch.empty(hidden, hidden).uniform_(-bound, bound))

    def forward(self, z: Tensor, inputs: tuple[Tensor, Adjacency]) -> Tensor:
        b, adj = inputs
        return torch.relu(adj @ (z[0] @ self.W.T) + b).unsqueeze(0)


# ----------------------------------------------------------------------------- the model


@dataclass
class IGNNConfig:
    """Architecture of :class:`IGNN` (the ``arch`` keys of the graph task).

    hidden: state size m. kappa: W is kept in ||W||_inf <= kappa / rho (kappa < 1).
    mlp_hidden: width of the graph-level readout MLP (graph level only).
    rho: spectral radius (bound) of the adjacency; None lets the task compute
    :func:`perron_bound` on its data (1 for the GCN matrix).
    """

    hidden: int = 32
    kappa: float = 0.9
    mlp_hidden: int = 64
    rho: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {self.hidden!r}")
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be an integer >= 1, got {self.mlp_hidden!r}")
        if not 0 < self.kappa < 1:
            raise ValueError(f"kappa must be in (0, 1) for a well-posed layer, got {self.kappa!r} (IGNN uses 0.9-0.98)")
        if self.rho is not None and not self.rho > 0:
            raise ValueError(f"rho must be > 0 (the adjacency's spectral radius) or null, got {self.rho!r}")


class IGNN(nn.Module):
    """An implicit graph neural network: one implicit layer and a readout.

        Z* = relu(A Z* W^T + A U Omega^T)      (the fixed point; U: node features (n, p))
        graph level:  logits_g = MLP(sum_{i in g} z*_i)     (sum pooling, then
                                  Linear -> ReLU -> dropout -> Linear)
        node level:   logits_i = V dropout(z*_i)           (V linear, no bias)

    Args:
        in_features: p. num_classes: output size. level: "graph" or "node".
        hidden, kappa, mlp_hidden: see :class:`IGNNConfig`. rho: bound on rho(A) for
            the adjacencies this model will see (1.0 for the GCN matrix).
        dropout: dropout rate in the readout.
        solver, backward: passed to :class:`phantomgrad.DEQ` (any solver, any backward mode).

    ``forward(x, adj, batch=None, num_graphs=None)`` returns ``(logits, info)``.
    ``after_optimizer_step()`` projects W onto ||W||_inf <= kappa / rho; the trainer calls
    it after every optimiser step. W is projected once at construction too.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 32,
        *,
        level: Literal["graph", "node"] = "graph",
        kappa: float = 0.9,
        rho: float = 1.0,
        mlp_hidden: int = 64,
        dropout: float = 0.0,
        solver: pg.Solver | None = None,
        backward: pg.BackwardMode | None = None,
    ):
        super().__init__()
        IGNNConfig(hidden=hidden, kappa=kappa, mlp_hidden=mlp_hidden, rho=rho)  # validates
        if level not in ("graph", "node"):
            raise ValueError(
                f"level must be 'graph' (graph classification) or 'node' (node classification), got {level!r}"
            )
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        self.level = level
        self.kappa = float(kappa)
        self.rho = float(rho)
        self.hidden = hidden
        self.omega = nn.Linear(in_features, hidden, bias=False)
        self.deq = pg.DEQ(
            ImplicitGraphMap(hidden), solver=solver or pg.FixedPoint(max_iter=50, tol=1e-4), backward=backward
        )
        self.dropout = nn.Dropout(dropout)
        if level == "graph":
            self.head: nn.Module = nn.Sequential(
                nn.Linear(hidden, mlp_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_hidden, num_classes)
            )
        else:
            self.head = nn.Linear(hidden, num_classes, bias=False)
        self.after_optimizer_step()

    @property
    def W(self) -> Tensor:
        return cast(ImplicitGraphMap, self.deq.f).W

    @property
    def radius(self) -> float:
        """kappa / rho: the largest ||W||_inf kept by the projection."""
        return self.kappa / self.rho

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Project W onto {||W||_inf <= kappa / rho} in place (IGNN's projected gradient step)."""
        self.W.copy_(project_rows_l1(self.W, self.radius))

    def forward_context(self) -> contextlib.AbstractContextManager:
        """The context one forward (:meth:`prepare`, ``self.deq``, :meth:`readout`) runs in: none for IGNN."""
        return contextlib.nullcontext()

    def prepare(self, x: Tensor, adj: Tensor) -> tuple[tuple[Tensor, Adjacency], Tensor]:
        """Everything before the DEQ: check the inputs, compute the injection B = A U Omega^T
        (once per forward) and z0 = 0. Returns ``(inputs, z0)`` with ``inputs = (B, Adjacency(A))``
        and z0 of shape (1, n, hidden): the whole batch of graphs is one DEQ sample."""
        if x.dim() != 2 or adj.shape != (x.shape[0], x.shape[0]):
            raise ValueError(f"need x (n, features) and adj (n, n); got {tuple(x.shape)} and {tuple(adj.shape)}")
        b = _spmm(adj, self.omega(x))
        z0 = torch.zeros(1, x.shape[0], self.hidden, dtype=b.dtype, device=b.device)
        return (b, Adjacency(adj)), z0

    def embed(self, x: Tensor, adj: Tensor, z0: Any = None) -> tuple[Tensor, pg.DEQInfo]:
        """The equilibrium node states Z* (n, hidden) of node features ``x`` (n, p). ``z0``: where
        the solve starts (None: zeros; a (1, n, hidden) state; or a start provider such as
        :meth:`phantomgrad.FixedPointCache.start`)."""
        inputs, zeros = self.prepare(x, adj)
        z, info = self.deq(inputs, model_start(z0, zeros, self.deq))
        return z[0], info

    def readout(self, z: Tensor, batch: Tensor | None = None, num_graphs: int | None = None) -> Tensor:
        """Logits from the node states z (n, hidden): per node (level "node"), or per graph after
        sum pooling (level "graph"; ``batch`` gives each node's graph, all in one graph when None)."""
        if self.level == "node":
            return self.head(self.dropout(z))
        if batch is None:
            batch = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() else 1  # host sync: only when not given
        pooled = z.new_zeros(num_graphs, z.shape[1]).index_add_(0, batch, z)
        return self.head(pooled)

    def forward(
        self, x: Tensor, adj: Tensor, batch: Tensor | None = None, num_graphs: int | None = None, z0: Any = None
    ) -> tuple[Tensor, pg.DEQInfo]:
        """Logits per graph (level "graph": ``batch`` gives each node's graph) or per node; ``z0``:
        see :meth:`embed`."""
        with self.forward_context():
            z, info = self.embed(x, adj, z0)
            return self.readout(z, batch, num_graphs), info

    def extra_repr(self) -> str:
        return f"level={self.level!r}, kappa={self.kappa}, rho={self.rho:.6g}"


__all__ = ["IGNN", "IGNNConfig", "ImplicitGraphMap", "Adjacency", "project_rows_l1", "inf_norm", "perron_bound"]
