"""IGNN (phantomgrad.models.ignn), the graph task and the graph-table command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import phantomgrad as pg
from phantomgrad.cli import main
from phantomgrad.data.graphs import Graph, collate_graphs
from phantomgrad.models.ignn import IGNN, inf_norm, perron_bound, project_rows_l1
from phantomgrad.train.config import ConfigError, TrainConfig
from phantomgrad.train.trainer import Trainer, train

BACKWARDS = {
    "implicit": lambda: pg.Implicit(pg.FixedPoint(max_iter=200, tol=1e-10)),
    "upg": lambda: pg.UPG(k=5, damping=0.5),
    "npg": lambda: pg.NPG(k=5, damping=0.8),
    "jfb": lambda: pg.JFB(),
    "backprop": lambda: pg.Backprop(),
}


def _random_graphs(n_graphs: int = 3, feats: int = 4, dtype=torch.float64, seed: int = 0) -> list[Graph]:
    gen = torch.Generator().manual_seed(seed)
    graphs = []
    for g in range(n_graphs):
        n = 4 + g
        src = torch.arange(n - 1)
        extra = torch.randint(0, n, (2, 2), generator=gen)
        e = torch.cat([torch.stack([src, src + 1]), extra], dim=1)
        e = torch.cat([e, e.flip(0)], dim=1)
        graphs.append(Graph(torch.randn(n, feats, generator=gen, dtype=dtype), e, y=g % 2))
    return graphs


def _bisection_projection(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Reference projection onto the l1 ball: find theta with sum max(|v| - theta, 0) = radius."""
    if v.abs().sum() <= radius:
        return v.clone()
    lo, hi = 0.0, float(v.abs().max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((v.abs() - mid).clamp_min(0).sum()) > radius else (lo, mid)
    return v.sign() * (v.abs() - hi).clamp_min(0)


# ----------------------------------------------------------------------------- projection and rho


def test_projection_lands_in_the_inf_norm_ball_and_is_the_nearest_point():
    w = 3 * torch.randn(40, 16, dtype=torch.float64)
    w[:5] *= 1e-3  # a few rows already inside
    p = project_rows_l1(w, 0.9)
    assert float(p.abs().sum(1).max()) <= 0.9 + 1e-12
    assert inf_norm(p) == pytest.approx(0.9)
    for i in range(40):
        assert torch.allclose(p[i], _bisection_projection(w[i], 0.9), atol=1e-9)
    assert torch.equal(p[:5], w[:5])


def test_projection_is_the_identity_inside_the_ball():
    w = torch.randn(8, 8)
    w = 0.5 * w / w.abs().sum(1, keepdim=True)  # every row has l1 norm 0.5
    assert torch.equal(project_rows_l1(w, 0.9), w)


def test_perron_bound_bounds_the_spectral_radius():
    dense = torch.rand(12, 12, dtype=torch.float64) * (torch.rand(12, 12, dtype=torch.float64) < 0.3)
    true = float(torch.linalg.eigvals(dense).abs().max())
    bound = perron_bound(dense.to_sparse())
    assert true - 1e-9 <= bound <= true * 1.01
    _, adj, _, _ = collate_graphs(_random_graphs())  # GCN matrix with self-loops: rho = 1 exactly
    assert 1.0 - 1e-9 <= perron_bound(adj) <= 1.001
    with pytest.raises(ValueError, match="nonnegative"):
        perron_bound(-dense)


# ----------------------------------------------------------------------------- the layer


def test_fixed_point_is_the_ignn_equation():
    torch.manual_seed(1)
    x, adj, batch, _ = collate_graphs(_random_graphs())
    model = IGNN(4, 2, 6, solver=pg.FixedPoint(max_iter=300, tol=1e-12)).double().eval()
    with torch.no_grad():
        z, info = model.embed(x, adj)
    a, w, omega = adj.to_dense(), model.W, model.omega.weight
    # IGNN's X = relu(W X A + Omega U A) with X = Z^T, U = x^T (A symmetric)
    X, U = z.T, x.T
    assert torch.allclose(X, torch.relu(w @ X @ a + omega @ U @ a), atol=1e-10)
    assert info.all_converged and info.nstep.shape == (1,)  # the whole batch is one DEQ sample


def test_projection_makes_the_layer_well_posed():
    """A W far outside the ball diverges; after the projection the same layer converges."""
    torch.manual_seed(0)
    x, adj, _, _ = collate_graphs(_random_graphs())
    model = IGNN(4, 2, 8, kappa=0.9, solver=pg.FixedPoint(max_iter=300, tol=1e-8)).double().eval()
    with torch.no_grad():
        model.W.copy_(torch.eye(8, dtype=torch.float64) * 1.5 + 0.1)  # positive: relu does not cut the growth
        model.omega.weight.abs_()
        _, info = model.embed(x.abs(), adj)
        assert not info.all_converged
        model.after_optimizer_step()
        assert inf_norm(model.W) <= 0.9 + 1e-12
        _, info = model.embed(x.abs(), adj)
    assert info.all_converged


@pytest.mark.parametrize("mode", list(BACKWARDS))
@pytest.mark.parametrize("level", ["graph", "node"])
def test_gradients_reach_w_omega_and_readout(mode, level):
    torch.manual_seed(0)
    x, adj, batch, y = collate_graphs(_random_graphs())
    model = IGNN(4, 2, 6, level=level, solver=pg.FixedPoint(max_iter=100, tol=1e-8), backward=BACKWARDS[mode]())
    model = model.double().train()
    logits, _ = model(x, adj, batch, num_graphs=len(y))
    target = y if level == "graph" else torch.arange(x.shape[0]) % 2
    F.cross_entropy(logits, target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_implicit_matches_backprop_through_the_fixed_point_iterations():
    torch.manual_seed(0)
    x, adj, batch, y = collate_graphs(_random_graphs())
    model = IGNN(4, 2, 6, kappa=0.95, solver=pg.FixedPoint(max_iter=400, tol=1e-13)).double()
    with torch.no_grad():  # a W on the ball's boundary, so the solve takes many iterations
        model.W.mul_(50.0)
        model.after_optimizer_step()

    def grad(backward) -> torch.Tensor:
        model.deq.backward_mode = backward
        model.zero_grad()
        logits, info = model(x, adj, batch, num_graphs=len(y))
        F.cross_entropy(logits, y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]), info

    exact, info = grad(pg.Backprop())
    assert int(info.nstep) > 15
    implicit, _ = grad(pg.Implicit(pg.FixedPoint(max_iter=400, tol=1e-12)))
    assert float(F.cosine_similarity(exact, implicit, dim=0)) > 0.9999
    jfb, _ = grad(pg.JFB())  # a phantom gradient is not the exact one: the check can fail
    assert float(F.cosine_similarity(exact, jfb, dim=0)) < 0.9999


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kappa"):
        IGNN(4, 2, kappa=1.0)
    with pytest.raises(ValueError, match="level"):
        IGNN(4, 2, level="edge")
    with pytest.raises(ValueError, match="radius"):
        project_rows_l1(torch.ones(2, 2), 0.0)


# ----------------------------------------------------------------------------- the graph task


def _mutag_available() -> bool:
    from phantomgrad.data.tu import find_tu

    try:
        find_tu("MUTAG")
        return True
    except FileNotFoundError:
        return False


needs_mutag = pytest.mark.skipif(
    not _mutag_available(), reason="MUTAG not found: pip install grakel (phantomgrad[graphs])"
)
FAST = [
    "task=graph",
    "model=ignn",
    "progress=false",
    "threads=1",
    "solver=fixed_point",
    "solver_max_iter=30",
    "backward_max_iter=30",
    "arch.hidden=8",
]


@needs_mutag
def test_graph_task_trains_one_mutag_fold(tmp_path):
    cfg = TrainConfig.from_sources(
        None,
        FAST
        + [
            "dataset=mutag",
            "data_options.fold=3",
            "epochs=1",
            "batch_size=64",
            "backward=upg",
            "lr=0.5",
            f"out_dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert len(trainer.task.eval_sets["test"]) in (18, 19) and len(trainer.task.train_set) in (169, 170)
    assert 0 <= summary["test_accuracy"] <= 1 and summary["train_seconds"] > 0
    # lr=0.5 throws W far out of the ball; the trainer's after_optimizer_step brought it back
    assert inf_norm(trainer.model.W) <= trainer.model.radius + 1e-6


@pytest.mark.parametrize("backward", ["implicit", "upg"])
def test_graph_task_learns_tiny_chains(tmp_path, backward):
    cfg = TrainConfig.from_sources(
        None,
        FAST
        + [
            "dataset=chains",
            f"backward={backward}",
            "epochs=40",
            "lr=0.05",
            "solver_max_iter=60",
            "backward_max_iter=60",
            "data_options.chain_len=3",
            "data_options.chains_per_class=4",
            "data_options.split=[6,6,12]",
            "data_options.feature_dim=4",
            f"out_dir={tmp_path}",
        ],
    )
    summary = train(cfg)
    assert summary["final_metrics"]["train_accuracy"] == 1.0
    assert summary["final_metrics"]["valid_accuracy"] is not None and summary["test_accuracy"] >= 0.75  # chance: 0.5


@pytest.mark.parametrize(
    "override, key",
    [
        ("data_options.chainlen=5", "chainlen"),
        ("arch.hiden=8", "hiden"),
        ("arch.kappa=1.5", "kappa"),
        ("data_options.split=[1000,0,0]", "split"),
    ],
)
def test_bad_graph_options_raise_config_errors_naming_the_key(tmp_path, override, key):
    cfg = TrainConfig.from_sources(None, FAST + ["dataset=chains", override, f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=key):
        Trainer(cfg)


@needs_mutag
def test_bad_fold_and_model_are_config_errors(tmp_path):
    for override, key in (("data_options.fold=10", "fold"), ("model=mdeq-small", "model")):
        with pytest.raises(ConfigError, match=key):  # the model at config time, the fold when the data loads
            Trainer(TrainConfig.from_sources(None, FAST + ["dataset=mutag", override, f"out_dir={tmp_path}"]))


# ----------------------------------------------------------------------------- the command


@pytest.mark.slow
@needs_mutag
def test_graph_table_runs_end_to_end(tmp_path, capsys):
    js, md = tmp_path / "t.json", tmp_path / "t.md"
    assert (
        main(["graph-table", "--tiny", "--out", str(tmp_path / "runs"), "--json", str(js), "--markdown", str(md)]) == 0
    )
    result = json.loads(js.read_text())
    methods = ["Implicit", "UPG A_{5,0.5}", "UPG A_{5,0.8}", "UPG A_{5,1.0}"]
    assert len(result["runs"]) == 4 * 2 + 4 * 1
    assert set(result["aggregate"]) == {"mutag", "chains4"}
    for dataset in ("mutag", "chains4"):
        assert list(result["aggregate"][dataset]) == methods
        assert result["aggregate"][dataset]["Implicit"]["time_vs_implicit"] == pytest.approx(1.0)
    table = md.read_text()
    assert table.count("\n") == 2 + 4 and "UPG A_{5,0.8}" in table and "±" in table
    assert "whole table" in capsys.readouterr().out
    # a second table into the same --out would mix runs: refused before any training, naming the fix
    assert main(["graph-table", "--tiny", "--out", str(tmp_path / "runs")]) == 2
    assert "pass a new --out" in capsys.readouterr().err
