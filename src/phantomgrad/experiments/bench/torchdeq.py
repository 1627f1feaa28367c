"""TorchDEQ (``--compare torchdeq``) on the same F, weights, batch, solver and settings.

TorchDEQ is optional and not a dependency; install it with ``pip install --no-deps
torchdeq==0.1.0`` (without its dependencies, so torch stays at the project's version).
Settings matched (torchdeq 0.1.0, read from its source): ``f_solver``/``f_max_iter``/
``f_tol``/``f_stop_mode`` = ours; Anderson's history ``m`` = ours (TorchDEQ defaults to 6);
Broyden's ``LBFGS_thres`` = our Broyden memory; ``pg.Implicit``: ``ift=True`` with
``b_solver``, ``b_max_iter``, ``b_tol`` and ``b_stop_mode='rel'`` = ours (its backward Broyden
keeps every step, as ours does here); ``pg.UPG``: ``grad=k, tau=damping``; ``pg.JFB``:
``grad=1, tau=1``. The 'sliced' core (its default) with one state. TorchDEQ has no
equivalent of the other modes (NPG, backprop through the solver, ...), of ``check_every`` or
of our compiled step: those rows say "n/a".
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

import phantomgrad as pg

from .config import BenchConfig
from .modes import UNSET, Variant, backward_mode, split_mode

TORCHDEQ_INSTALL = "pip install --no-deps torchdeq==0.1.0"
SOLVER_NAMES: dict[str, str] = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def import_torchdeq() -> Callable[..., nn.Module]:
    """TorchDEQ's ``get_deq``, or a one-line ValueError naming the install command."""
    try:
        from torchdeq import get_deq
    except ImportError:
        raise ValueError(
            f"--compare torchdeq needs the optional package torchdeq; install it without its dependencies "
            f"(so torch stays at this project's version) with: {TORCHDEQ_INSTALL}"
        ) from None
    return get_deq


def unsupported(cfg: BenchConfig, v: Variant, solver: str | None = None) -> str | None:
    """Why TorchDEQ cannot run variant ``v`` (None when it can)."""
    solver = solver or v.solver or cfg.solver
    if solver not in SOLVER_NAMES:
        return f"TorchDEQ has no {solver} solver"
    if v.compiled:
        return "not compiled for TorchDEQ"
    if v.check_every != UNSET:
        return "TorchDEQ has no check_every"
    try:
        mode = backward_mode(cfg, v)
    except (TypeError, ValueError) as err:
        return f"cannot build the mode: {err}"
    if type(mode) is pg.Implicit:
        back = split_mode(v.mode)[1]
        return None if back in SOLVER_NAMES else f"TorchDEQ has no {back} backward solver"
    if type(mode) in (pg.UPG, pg.JFB):
        return None
    return f"TorchDEQ has no equivalent of {type(mode).__name__}"


def make_torchdeq(cfg: BenchConfig, v: Variant, solver: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """TorchDEQ's DEQ layer for variant ``v``, and the solver kwargs to pass per call."""
    get_deq = import_torchdeq()
    solver = solver or v.solver or cfg.solver
    reason = unsupported(cfg, v, solver)
    if reason:
        raise ValueError(reason)
    kw: dict[str, Any] = dict(
        core="sliced",
        f_solver=SOLVER_NAMES[solver],
        f_max_iter=v.solver_iter,
        f_tol=cfg.solver_tol,
        f_stop_mode=cfg.stop,
    )
    mode = backward_mode(cfg, v)
    if type(mode) is pg.Implicit:
        kw.update(
            ift=True,
            b_solver=SOLVER_NAMES[split_mode(v.mode)[1] or ""],
            b_max_iter=v.backward_iter,
            b_tol=cfg.backward_tol,
            b_stop_mode="rel",
        )
    else:  # UPG, and JFB (UPG with k = 1, lambda = 1)
        assert isinstance(mode, pg.UPG)
        kw.update(grad=mode.k, tau=mode.damping)
    solver_kwargs: dict[str, Any] = {}
    if solver == "anderson":
        solver_kwargs["m"] = cfg.anderson_m
    elif solver == "broyden":
        solver_kwargs["LBFGS_thres"] = cfg.broyden_memory or v.solver_iter
    return get_deq(**kw), solver_kwargs


def call(
    tdeq: nn.Module, solver_kwargs: dict[str, Any], f: Callable[[Any, Any], Any], u: Any, z0: Any
) -> tuple[Any, Any]:
    """Solve z = f(z, u) from z0 with TorchDEQ's layer; returns (z, its info) with z shaped like z0."""
    if isinstance(z0, Tensor):
        out, info = tdeq(lambda z: f(z, u), z0, solver_kwargs=dict(solver_kwargs))
        return out[-1], info
    out, info = tdeq(lambda *zs: f(tuple(zs), u), list(z0), solver_kwargs=dict(solver_kwargs))
    return tuple(out[-1]), info


__all__ = ["TORCHDEQ_INSTALL", "import_torchdeq", "unsupported", "make_torchdeq", "call"]
