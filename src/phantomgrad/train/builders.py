"""Turn a :class:`TrainConfig` into the objects of a run: solver, backward mode, data, model, optimiser."""

from __future__ import annotations

import math

import torch

import phantomgrad as pg

from .config import ConfigError, TrainConfig


def build_solver(cfg: TrainConfig) -> pg.Solver:
    return pg.make_solver(cfg.solver, max_iter=cfg.solver_max_iter, tol=cfg.solver_tol, stop=cfg.solver_stop)


def build_backward(cfg: TrainConfig) -> pg.BackwardMode:
    if cfg.backward == "implicit":
        solver = pg.make_solver(cfg.backward_solver, max_iter=cfg.backward_max_iter, tol=cfg.backward_tol, stop="rel")
        return pg.Implicit(solver)
    if cfg.backward == "adaptive":
        from phantomgrad.adaptive import AdaptivePhantom

        try:
            return AdaptivePhantom(k=cfg.k, damping=cfg.damping, **cfg.backward_options)
        except TypeError as err:
            raise ConfigError(f"bad backward_options for the adaptive mode: {err}") from None
    if cfg.backward_options:
        raise ConfigError(f"backward_options {sorted(cfg.backward_options)} are only used by backward=adaptive")
    if cfg.backward in ("upg", "npg"):
        return pg.make_backward(cfg.backward, k=cfg.k, damping=cfg.damping)
    return pg.make_backward(cfg.backward)


def build_fallback_solver(cfg: TrainConfig) -> pg.Solver | None:
    """A damped, patient solver to retry a forward solve that produced non-finite values."""
    if cfg.fallback_solver is None:
        return None
    if cfg.fallback_solver == "fixed_point":
        return pg.FixedPoint(damping=0.5, max_iter=2 * cfg.solver_max_iter, tol=cfg.solver_tol, stop=cfg.solver_stop)
    return pg.make_solver(cfg.fallback_solver, max_iter=2 * cfg.solver_max_iter, tol=cfg.solver_tol, stop=cfg.solver_stop)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Cosine decay from lr to 0 over all training steps (stepped once per batch), or constant."""
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)
