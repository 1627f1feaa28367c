"""The names a training config may use, each read from the one registry that owns it.

* solvers: :data:`phantomgrad.solvers.SOLVERS`;
* backward modes: :data:`phantomgrad.modes.BACKWARD_MODES` (each mode's ``config_keys`` names
  the config keys it takes);
* datasets: :data:`phantomgrad.data.DATASETS`, by kind of task;
* models: each model family's presets;
* tasks, optimisers and LR schedules: the tables below.

Config validation, ``phantomgrad train --help`` and the builders read these, so adding a solver,
a backward mode, a dataset or a model preset never means editing a list here. This module imports
nothing else from :mod:`phantomgrad.train`, so the config and the tasks both import it without a cycle.
"""

from __future__ import annotations

import importlib
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from phantomgrad.backward import BackwardMode
from phantomgrad.data import DATASETS
from phantomgrad.modes import BACKWARD_MODES
from phantomgrad.solvers import SOLVERS, Solver


class OptimizerSettings(Protocol):
    """The keys of a :class:`~phantomgrad.train.config.TrainConfig` an optimiser factory reads (named
    structurally: the config imports this registry for its choices, so the registry does not import it)."""

    lr: float
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class TaskEntry:
    """One kind of problem the trainer knows.

    builder: ``"module:function"``, the function ``build(cfg) -> Task``.
    models: the model names it trains: a tuple, or ``"module:ATTRIBUTE"`` naming a presets mapping.
    default_model: the model when the config names none.
    headline: the metrics the end-of-run summary leads with (from the test split).
    family: what its models are, for messages ("a DEQ transformer").
    refuses: the config keys this task does not act on, each with the reason: ``"key"`` refuses any
        value but the default, ``"key=value"`` that value, ``"arch.key"`` an entry of ``arch``.
        Validation refuses them with one line (exit 2 in the CLI) instead of ignoring them.
    """

    builder: str
    models: tuple[str, ...] | str
    default_model: str
    headline: tuple[str, ...]
    family: str
    refuses: dict[str, str] = field(default_factory=dict)

    def build(self, cfg: Any) -> Any:
        """The task of ``cfg`` (a ``TrainConfig``): the builder's ``build(cfg) -> Task``."""
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(cfg)


TASKS: dict[str, TaskEntry] = {
    "image": TaskEntry(
        "phantomgrad.train.mondeq_task:build_image_task",
        "phantomgrad.train.mondeq_task:IMAGE_MODELS",
        "mdeq-tiny",
        ("accuracy",),
        "an MDEQ",
        {"arch.pretrain_depth": "no code reads it; the unrolled stack's depth is the top-level key pretrain_depth"},
    ),
    "lm": TaskEntry(
        "phantomgrad.train.lm_task:build_lm_task",
        "phantomgrad.models.transformer:PRESETS",
        "deq-transformer",
        ("ppl", "bpc"),
        "a DEQ transformer",
        {
            "trajectory_weight": "trajectory supervision (trajectory_states) is the image task's",
            "radius_every": "the language-model task estimates the spectral radius itself, every epoch",
        },
    ),
    "graph": TaskEntry(
        "phantomgrad.train.graph_task:build_graph_task",
        ("ignn",),
        "ignn",
        ("accuracy",),
        "an IGNN",
        {
            "pretrain_steps": "the IGNN has no unrolled pretraining",
            "pretrain_depth": "the IGNN has no unrolled pretraining",
            "trajectory_weight": "trajectory supervision (trajectory_states) is the image task's",
            "precision=bf16": "the IGNN's sparse adjacency products have no bfloat16 backward in torch",
        },
    ),
}


def datasets(task: str) -> tuple[str, ...]:
    """The dataset names ``task`` reads (the data package's registry)."""
    return tuple(DATASETS[task])


def models(task: str) -> tuple[str, ...]:
    """The model names ``task`` trains."""
    names = TASKS[task].models
    if isinstance(names, tuple):
        return names
    module, attribute = names.split(":")
    return tuple(getattr(importlib.import_module(module), attribute))


def solver_names() -> tuple[str, ...]:
    """The solvers a config builds from ``solver_max_iter``/``solver_tol``: those of ``SOLVERS`` that take
    ``max_iter`` (``unrolled`` takes a depth: pretraining builds it from ``pretrain_depth``)."""
    return tuple(name for name, cls in SOLVERS.items() if "max_iter" in inspect.signature(cls).parameters)


def forward_solver_names() -> tuple[str, ...]:
    """The solvers of :func:`solver_names` that find the fixed point of a nonlinear F: all but the
    ``linear_only`` ones (GMRES solves Implicit's linear backward system, not a DEQ's forward)."""
    return tuple(name for name in solver_names() if not SOLVERS[name].linear_only)


def solver_stops() -> tuple[str, ...]:
    """The values of a solver's ``stop`` argument, read from its annotation (``Literal[...]``)."""
    try:
        hint = typing.get_type_hints(Solver.__init__)["stop"]
        options = typing.get_args(hint)
    except (KeyError, NameError, TypeError):
        options = ()
    return tuple(options) or ("rel", "abs")


def backward_modes() -> dict[str, type[BackwardMode]]:
    """The backward-mode registry; AdaptivePhantom is added as ``adaptive`` where the registry lacks it."""
    modes = dict(BACKWARD_MODES)
    if "adaptive" not in modes:
        from phantomgrad.adaptive import AdaptivePhantom

        modes["adaptive"] = AdaptivePhantom
    return modes


def solvers_for_mode(mode: str) -> tuple[str, ...]:
    """The forward solvers (of :func:`solver_names`) that backward mode ``mode`` works with: those
    whose default instance its ``check_solver`` accepts (SHINE: Broyden alone)."""
    cls = backward_modes()[mode]
    try:
        instance = cls()
    except TypeError:  # a mode without defaults for every argument: it says nothing about solvers here
        return solver_names()
    takes = []
    for name in forward_solver_names():
        try:
            instance.check_solver(SOLVERS[name]())
        except ValueError:
            continue
        takes.append(name)
    return tuple(takes)


# The config keys that make up an Implicit-style backward solver, and the keyword they fill.
BACKWARD_SOLVER_KEYS = ("backward_solver", "backward_max_iter", "backward_tol")


def backward_config_keys(mode: type[BackwardMode]) -> tuple[str, ...]:
    """The config keys ``mode`` takes: its ``config_keys`` attribute, or else read from its signature
    (``k``, ``damping`` by name; a ``solver`` argument is built from ``backward_solver``,
    ``backward_max_iter`` and ``backward_tol``)."""
    declared = getattr(mode, "config_keys", None)
    if declared is not None:
        return tuple(declared)
    params = inspect.signature(mode).parameters
    keys: list[str] = [name for name in ("k", "damping") if name in params]
    if "solver" in params:
        keys += BACKWARD_SOLVER_KEYS
    return tuple(keys)


# ---- optimisers and schedules: name -> factory -------------------------------------------


def _adam(params, cfg: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _sgd(params, cfg: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
    )


OPTIMIZERS: dict[str, Callable[[Any, OptimizerSettings], torch.optim.Optimizer]] = {"adam": _adam, "sgd": _sgd}


def _cosine(total_steps: int) -> Callable[[int], float]:
    """lr factor 0.5 (1 + cos(pi t / T)): from 1 to 0 over the T training steps."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _constant(total_steps: int) -> Callable[[int], float]:
    return lambda step: 1.0


SCHEDULES: dict[str, Callable[[int], Callable[[int], float]]] = {"cosine": _cosine, "constant": _constant}

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
