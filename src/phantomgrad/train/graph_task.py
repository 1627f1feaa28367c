"""Graph tasks for the trainer: IGNN (Gu et al., 2020) on real and synthetic graphs.

* ``dataset=mutag`` / ``dataset=tu`` -- graph classification. The graphs are split by
  10-fold stratified cross-validation with a fixed seed (``data_options.fold_seed``, 0),
  and one run trains on nine folds and tests on fold ``data_options.fold``. The number
  reported is the FINAL epoch's test accuracy: no epoch, and no hyper-parameter, is
  chosen by looking at the test fold (the trainer never selects on it). Run the ten folds
  and report mean +- std over them (``phantomgrad graph-table`` does).
* ``dataset=chains`` -- node classification on the synthetic Chains graph of IGNN
  (:func:`phantomgrad.data.chains.make_chains`), transductive: every training step runs
  the whole graph and takes the loss on the training nodes; the splits ``valid`` and
  ``test`` are evaluated on their own nodes. One step per epoch.

Keys: ``arch`` holds :class:`phantomgrad.models.ignn.IGNNConfig` (hidden, kappa,
mlp_hidden, rho), ``data_options`` holds :class:`TUOptions` or :class:`ChainsOptions`;
``model`` must be ``ignn`` (the image default ``mdeq-tiny`` is read as "not chosen").
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.batch import Batch, BatchCollate, Indexed
from . import builders, registry
from .config import ConfigError, TrainConfig
from .tasks import StepResult, Task, classification_step, mean_loss_accuracy

log = logging.getLogger(__name__)

MODEL_NAMES = registry.models("graph")


@dataclass
class TUOptions:
    """data_options of ``mutag`` and ``tu``.

    name: the TU dataset (required for ``tu``, e.g. PROTEINS with ``data_dir``; fixed to
    MUTAG for ``mutag``). fold: the test fold, 0 .. n_folds - 1. n_folds: folds of the
    stratified cross-validation. fold_seed: its shuffling seed (keep it fixed across the
    runs of one table, so the folds partition the data).
    """

    name: str | None = None
    fold: int = 0
    n_folds: int = 10
    fold_seed: int = 0

    def __post_init__(self) -> None:
        for key in ("fold", "n_folds", "fold_seed"):
            if not isinstance(getattr(self, key), int) or isinstance(getattr(self, key), bool):
                raise ValueError(f"data_options.{key} must be an integer, got {getattr(self, key)!r}")
        if self.n_folds < 2:
            raise ValueError(f"data_options.n_folds must be >= 2, got {self.n_folds}")
        if not 0 <= self.fold < self.n_folds:
            raise ValueError(f"data_options.fold must be in 0..{self.n_folds - 1}, got {self.fold}")


@dataclass
class ChainsOptions:
    """data_options of ``chains``: the arguments of :func:`phantomgrad.data.chains.make_chains`."""

    num_classes: int = 2
    chains_per_class: int = 20
    chain_len: int = 10
    feature_dim: int = 100
    noise: float = 0.0
    split: list[int] = field(default_factory=lambda: [20, 100, 200])
    seed: int = 0


def _options(cls: type, values: dict[str, Any], what: str) -> Any:
    """``cls(**values)`` with unknown keys and bad values turned into ConfigError."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} key {unknown[0]!r}; valid keys: {', '.join(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad {what}: {err}") from None


def _arch(cfg: TrainConfig):
    from phantomgrad.models.ignn import IGNNConfig

    if cfg.model not in MODEL_NAMES:
        raise ConfigError(f"task graph trains model=ignn, got model={cfg.model!r}")
    return _options(IGNNConfig, dict(cfg.arch), "arch (IGNN)")


def build_graph_task(cfg: TrainConfig) -> Task:
    """The :class:`Task` for ``task=graph``: IGNN on mutag, a TU dataset, or chains."""
    arch = _arch(cfg)
    if cfg.dataset == "chains":
        return _chains_task(cfg, arch)
    return _tu_task(cfg, arch)


def _model(cfg: TrainConfig, arch, in_features: int, num_classes: int, level: Literal["graph", "node"], rho: float):
    from phantomgrad.models.ignn import IGNN

    return IGNN(
        in_features,
        num_classes,
        arch.hidden,
        level=level,
        kappa=arch.kappa,
        rho=rho,
        mlp_hidden=arch.mlp_hidden,
        dropout=cfg.dropout,
        solver=builders.build_solver(cfg),
        backward=builders.build_backward(cfg),
    )


# ----------------------------------------------------------------------------- MUTAG / TU


def _tu_task(cfg: TrainConfig, arch) -> Task:
    from phantomgrad.data.graphs import collate_graphs, stratified_folds
    from phantomgrad.data.tu import load_tu
    from phantomgrad.models.ignn import perron_bound

    opts = _options(TUOptions, dict(cfg.data_options), f"data_options for {cfg.dataset}")
    if cfg.dataset == "mutag":
        if opts.name not in (None, "MUTAG"):
            raise ConfigError(f"dataset=mutag is MUTAG; for data_options.name={opts.name!r} use dataset=tu")
        name = "MUTAG"
    else:
        if opts.name is None:
            raise ConfigError(
                "dataset=tu needs data_options.name (e.g. data_options.name=PROTEINS) and "
                "data_dir= the folder holding NAME_A.txt"
            )
        name = opts.name
    ds = load_tu(name, cfg.data_dir)
    try:
        folds = stratified_folds(ds.labels, n_folds=opts.n_folds, seed=opts.fold_seed)
    except ValueError as err:
        raise ConfigError(f"data_options.n_folds={opts.n_folds} does not fit {name}: {err}") from None
    train_idx, test_idx = folds[opts.fold]
    train_set = [ds[i] for i in train_idx.tolist()]
    test_set = [ds[i] for i in test_idx.tolist()]
    # rho(A) bounded once, on the training graphs (for the GCN matrix it is 1 for every graph)
    rho = arch.rho if arch.rho is not None else perron_bound(collate_graphs(train_set)[1])
    model = _model(cfg, arch, ds.num_features, ds.num_classes, "graph", rho)
    log.info(
        "%s fold %d/%d: %d train, %d test graphs; rho(A) <= %.6f",
        name,
        opts.fold,
        opts.n_folds,
        len(train_set),
        len(test_set),
        rho,
    )

    def step(model, batch, device, global_step: int | None) -> StepResult:
        """A :class:`~phantomgrad.data.batch.Batch` of graphs (or collate_graphs' 4-tuple)."""
        if not isinstance(batch, Batch):
            batch = Batch(tuple(batch[:3]), batch[3])
        x, adj, node_graph = (t.to(device) for t in batch.inputs)
        y = batch.targets.to(device)
        logits, info = model(x, adj, node_graph, num_graphs=len(y), z0=batch.start)
        return classification_step(F.cross_entropy(logits, y), logits, y, info)

    return Task(
        "graph",
        model,
        Indexed(train_set),  # items (graph, index)
        {"test": Indexed(test_set)},
        step,
        mean_loss_accuracy,
        collate=BatchCollate(collate_graphs, _graphs_and_labels),
        progress_keys=("loss", "accuracy"),
        extra={
            "dataset": name,
            "fold": opts.fold,
            "n_folds": opts.n_folds,
            "rho": rho,
            "accuracy_selection": "final epoch on the test fold (nothing selected on it)",
            "reuse": False,  # one DEQ sample per batch of graphs: no per-graph state to reuse
        },
    )


# ----------------------------------------------------------------------------- Chains


class _Split(torch.utils.data.Dataset):
    """A one-item dataset naming a node split of the single Chains graph."""

    def __init__(self, name: str):
        self.name = name

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> str:
        return self.name


def _first(items: list[str]) -> str:
    return items[0]


def _graphs_and_labels(collated: tuple) -> tuple[tuple, Tensor]:
    """collate_graphs' (x, adj, node_graph, y) as (inputs, targets)."""
    return tuple(collated[:3]), collated[3]


def _split_only(split: str) -> tuple[str, None]:
    return split, None


def _chains_task(cfg: TrainConfig, arch) -> Task:
    from phantomgrad.data.chains import make_chains
    from phantomgrad.models.ignn import perron_bound

    opts = _options(ChainsOptions, dict(cfg.data_options), "data_options for chains")
    if cfg.batch_size != TrainConfig.__dataclass_fields__["batch_size"].default:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not used by dataset=chains: every step trains on the whole graph "
            "(node classification); remove it"
        )
    try:
        data = make_chains(
            opts.num_classes,
            opts.chains_per_class,
            opts.chain_len,
            opts.feature_dim,
            opts.noise,
            tuple(opts.split),
            opts.seed,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad data_options for chains: {err}") from None
    adj = data.adjacency()
    rho = arch.rho if arch.rho is not None else perron_bound(adj)
    model = _model(cfg, arch, data.num_features, data.num_classes, "node", rho)
    log.info(
        "chains: %d nodes (%d chains of %d), %d/%d/%d train/valid/test nodes; rho(A) <= %.6f",
        data.num_nodes,
        opts.num_classes * opts.chains_per_class,
        opts.chain_len,
        len(data.train_idx),
        len(data.valid_idx),
        len(data.test_idx),
        rho,
    )
    on_device: dict[torch.device, tuple] = {}
    splits_on_device: dict[tuple[torch.device, str], Tensor] = {}

    def step(model, batch, device, global_step: int | None) -> StepResult:
        """A :class:`~phantomgrad.data.batch.Batch` naming a split (or the split's name): the whole graph
        is one DEQ sample, index 0."""
        split, z0 = (batch.inputs, batch.start) if isinstance(batch, Batch) else (batch, None)
        if device not in on_device:
            on_device[device] = (data.x.to(device), adj.to(device), data.y.to(device))
        x, a, y = on_device[device]
        if (device, split) not in splits_on_device:  # copied once: a copy from the host may wait for the device
            splits_on_device[device, split] = getattr(data, f"{split}_idx").to(device)
        idx = splits_on_device[device, split]
        logits, info = model(x, a, z0=z0)
        logits, target = logits[idx], y[idx]
        return classification_step(F.cross_entropy(logits, target), logits, target, info)

    return Task(
        "graph",
        model,
        Indexed(_Split("train")),
        {"valid": Indexed(_Split("valid")), "test": Indexed(_Split("test"))},
        step,
        mean_loss_accuracy,
        collate=BatchCollate(_first, _split_only),
        progress_keys=("loss", "accuracy"),
        extra={
            "dataset": "chains",
            "chain_len": opts.chain_len,
            "rho": rho,
            "accuracy_selection": "final epoch on the test nodes (nothing selected on them)",
        },
    )
