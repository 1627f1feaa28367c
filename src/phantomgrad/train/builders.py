"""Turn a :class:`TrainConfig` into the objects of a run: solver, backward mode, data, model, optimiser."""

from __future__ import annotations

import dataclasses
import inspect

import torch

import phantomgrad as pg
from phantomgrad.monitor import deq_modules
from phantomgrad.solvers import fusable

from . import registry
from .batchnorm import with_batchnorm_recalibration
from .config import ConfigError, TrainConfig
from .health import with_health
from .jacreg import with_jacobian_penalty
from .tasks import Task
from .warm_start import with_warm_start


def _fused(cfg: TrainConfig, name: str) -> dict[str, bool]:
    """``{"fused": True}`` with ``solver_fused: true`` (a ConfigError for a solver without it), else nothing."""
    if not cfg.solver_fused:
        return {}
    if name not in fusable():
        raise ConfigError(f"solver_fused: true, but solver {name!r} has no fused bookkeeping; use one of {fusable()}")
    return {"fused": True}


def build_solver(cfg: TrainConfig) -> pg.Solver:
    return pg.make_solver(
        cfg.solver, max_iter=cfg.solver_max_iter, tol=cfg.solver_tol, stop=cfg.solver_stop, **_fused(cfg, cfg.solver)
    )


def build_backward(cfg: TrainConfig) -> pg.BackwardMode:
    """The mode ``cfg.backward`` of the backward-mode registry, given the config keys it declares
    (``k``, ``damping``; ``backward_solver``, ``backward_max_iter`` and ``backward_tol`` make its
    ``solver``) and ``backward_options`` as further keywords (e.g. SHINE's ``refine``, ``fallback``)."""
    cls = registry.backward_modes()[cfg.backward]
    keys = registry.backward_config_keys(cls)
    solver_keys = (*registry.BACKWARD_SOLVER_KEYS, "solver")  # a mode's solver is always the backward one
    # a declared key that is a config key of its own (k, damping) comes from there; the others from backward_options
    kwargs = {key: getattr(cfg, key) for key in keys if key not in solver_keys and hasattr(cfg, key)}
    if any(key in solver_keys for key in keys):
        # solver_fused also fuses Implicit's backward solve where that solver can
        fused = {"fused": True} if cfg.solver_fused and cfg.backward_solver in fusable() else {}
        kwargs["solver"] = pg.make_solver(
            cfg.backward_solver, max_iter=cfg.backward_max_iter, tol=cfg.backward_tol, stop="rel", **fused
        )
    if cfg.backward_options:
        params = inspect.signature(cls).parameters
        takes_more = any(p.kind is p.VAR_KEYWORD for p in params.values()) or set(params) - set(kwargs)
        if not takes_more:
            raise ConfigError(
                f"backward_options {sorted(cfg.backward_options)} are not used by backward={cfg.backward}"
            )
        clash = sorted(set(cfg.backward_options) & set(kwargs))
        if clash:
            raise ConfigError(f"backward_options {clash} are config keys of their own; set them as {clash[0]}=...")
        kwargs.update(cfg.backward_options)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad backward_options for backward={cfg.backward}: {err}") from None


def build_fallback_solver(cfg: TrainConfig) -> pg.Solver | None:
    """A damped, patient solver to retry a forward solve that produced non-finite values."""
    if cfg.fallback_solver is None:
        return None
    damped = {"damping": 0.5} if cfg.fallback_solver == "fixed_point" else {}
    return pg.make_solver(
        cfg.fallback_solver, **damped, max_iter=2 * cfg.solver_max_iter, tol=cfg.solver_tol, stop=cfg.solver_stop
    )


def cli_not_converged_hint() -> str:
    """The advice of the layer's not-converged warning in ``phantomgrad train``'s own syntax: the keys
    to change and the key that silences it (``warm_start=`` where the config has that key)."""
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    start = ", start closer with warm_start=learned" if "warm_start" in keys else ""
    return (
        "Raise solver_max_iter=, try solver=broyden, make F more contractive with jac_reg_weight="
        f"{start}; warn_not_converged=false silences this"
    )


def configure_layers(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """What the trainer sets on every DEQ layer of ``model``: the fallback solver, and the not-converged
    warnings (the forward's, on or off with ``warn_not_converged``; the backward solve's) with advice in CLI syntax."""
    fallback = build_fallback_solver(cfg)
    for layer in deq_modules(model):
        layer.fallback = fallback
        layer.warn_not_converged = cfg.warn_not_converged
        layer.not_converged_hint = cli_not_converged_hint()
        if hasattr(layer.backward, "not_converged_hint"):  # a mode with a backward solve (Implicit) warns too
            layer.backward.not_converged_hint = (
                "Raise backward_max_iter=, set backward_options.fallback=upg, or use a phantom gradient (backward=upg)"
            )


def progress_disabled(cfg: TrainConfig, is_main: bool) -> bool | None:
    """tqdm's ``disable``: True off the main process or with ``progress=false``; None with ``progress=auto``
    (tqdm then disables the bar when stderr is not a terminal, so a log file gets no carriage returns)."""
    if not is_main or cfg.progress is False:
        return True
    return None if cfg.progress == "auto" else False


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return registry.OPTIMIZERS[cfg.optimizer](params, cfg)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The LR schedule ``cfg.schedule`` (cosine: from lr to 0 over all steps), stepped once per batch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, registry.SCHEDULES[cfg.schedule](total_steps))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def build_task(cfg: TrainConfig) -> Task:
    """The task ``cfg.task`` built for ``cfg`` (a validated config names a registered task and dataset),
    with the warm start of ``warm_start``, the Jacobian penalty of ``jac_reg_*`` and the
    equilibrium-health sums added to its steps, and the BatchNorm recalibration of ``bn_recalibrate``
    before its evaluations."""
    task = with_warm_start(registry.TASKS[cfg.task].build(cfg), cfg)
    return with_batchnorm_recalibration(with_health(with_jacobian_penalty(task, cfg)), cfg)
