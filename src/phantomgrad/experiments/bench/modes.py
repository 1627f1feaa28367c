"""What the bench measures, derived from the library's registries.

The backward modes are :data:`phantomgrad.modes.BACKWARD_MODES` and the solvers
:data:`phantomgrad.solvers.SOLVERS`; nothing here lists their names. A mode whose class
takes a ``solver`` (a backward solve, as ``Implicit``) gives one bench mode per backward
solver, named ``<mode>-<solver>`` (``implicit-broyden``, ``implicit-fixed_point``); every
other mode gives one bench mode named as in the registry. ``<mode>@<solver>`` runs a mode with
another forward solver than the run's: :data:`PAIRED` lists the pairs measured by default
(``backprop@reversible``: RevDEQ's exact gradient with memory independent of the steps). A mode
whose ``check_solver`` refuses the run's forward solver (SHINE needs Broyden's inverse-Jacobian
estimate) gets the first registered solver it accepts, and its row is labelled with that solver:
no mode is silently run with a solver it refuses. Objects are built from the bench's options by
keyword, passing only the keywords a class's constructor takes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Protocol

import phantomgrad as pg
from phantomgrad.modes import BACKWARD_MODES
from phantomgrad.solvers import SOLVERS, fusable


class BenchConfig(Protocol):
    """The options of a bench run that this module reads (:class:`.config.BenchConfig` has them; the
    config imports this module to validate its names, so this module names the fields, not the class)."""

    solver: str
    solver_iter: int
    solver_tol: float
    stop: str
    broyden_memory: int | None
    anderson_m: int
    reversible_beta: float
    check_every: int | str | None
    k: int
    damping: float
    backward_iter: int
    backward_tol: float


UNSET = "default"  # check_every not passed: the solver's own default
BACKWARD_SOLVERS: tuple[str, ...] = ("broyden", "fixed_point")  # the backward solves of the default mode list
PAIRED: tuple[str, ...] = ("backprop@reversible",)  # modes measured with their own forward solver too


def takes(cls: type, name: str) -> bool:
    """Whether ``cls(name=...)`` is accepted: declared by its ``__init__`` or, through ``**kwargs``,
    by a base class's."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        if name in params:
            return True
        if not any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()):
            return False
    return False


def solver_names() -> tuple[str, ...]:
    """The registered solvers that iterate to a tolerance (their constructor takes ``max_iter`` and ``tol``)."""
    return tuple(n for n, cls in SOLVERS.items() if takes(cls, "max_iter") and takes(cls, "tol"))


def forward_solver_names() -> tuple[str, ...]:
    """The solvers of :func:`solver_names` that solve a nonlinear F (not ``linear_only``, as GMRES is)."""
    return tuple(n for n in solver_names() if not SOLVERS[n].linear_only)


def mode_names(backward_solvers: tuple[str, ...] = BACKWARD_SOLVERS) -> tuple[str, ...]:
    """Every bench mode, in registry order."""
    names: list[str] = []
    for name, cls in BACKWARD_MODES.items():
        if takes(cls, "solver"):
            names += [f"{name}-{s}" for s in backward_solvers]
        else:
            names.append(name)
    paired = [m for m in PAIRED if split_mode(m)[0] in BACKWARD_MODES and forward_name(m) in SOLVERS]
    return tuple(names + paired)


def split_mode(mode: str) -> tuple[str, str | None]:
    """``"implicit-broyden"`` -> ``("implicit", "broyden")``; ``"upg"`` -> ``("upg", None)``;
    a forward solver (``"backprop@reversible"``) is left out (see :func:`forward_name`)."""
    name, _, solver = mode.partition("@")[0].partition("-")
    return name, solver or None


def forward_name(mode: str) -> str | None:
    """The forward solver a bench mode names: ``"backprop@reversible"`` -> ``"reversible"``, else None."""
    return mode.partition("@")[2] or None


def check_mode(mode: str) -> None:
    """Raise a one-line ValueError for a name the registries do not make."""
    name, solver = split_mode(mode)
    cls = BACKWARD_MODES.get(name)
    if cls is None:
        raise ValueError(f"unknown backward mode {mode!r}; choose from {list(mode_names())}")
    forward = forward_name(mode)
    if forward is not None and forward not in forward_solver_names():
        raise ValueError(f"unknown forward solver in {mode!r}; write <mode>@<one of {list(forward_solver_names())}>")
    if takes(cls, "solver") != (solver is not None) or (solver is not None and solver not in solver_names()):
        hint = [f"{name}-{s}" for s in solver_names()] if takes(cls, "solver") else [name]
        raise ValueError(f"unknown backward mode {mode!r}; write it as one of {hint}")


@dataclass(frozen=True)
class Variant:
    """One measured setting: a library, a backward mode and its step counts.

    ``check_every`` is the solvers' host-check interval (``"default"``: not passed, the
    solver's own default; None: the host never looks, every solve runs ``max_iter`` steps);
    ``compiled`` times the training step's forward and loss under ``torch.compile``;
    ``fused`` builds phantomgrad's solvers with ``fused=True`` (compiled per-step bookkeeping);
    ``start`` is where the forward solve starts: ``"zeros"``, ``"reuse"`` (the batch's fixed point
    from this variant's previous step, through a ``pg.FixedPointCache``) or ``"learned"`` (an init
    head g(u) trained by ``info.init_loss``; MDEQ only).
    """

    lib: str  # "phantomgrad" or "torchdeq"
    mode: str
    k: int
    damping: float
    backward_iter: int
    solver_iter: int
    check_every: int | str | None = UNSET
    compiled: bool = False
    solver: str | None = None  # the forward solver; None: the run's
    fused: bool = False
    start: str = "zeros"

    @property
    def label(self) -> str:
        return label(self)


def variant(cfg: BenchConfig, mode: str, lib: str = "phantomgrad", **over: Any) -> Variant:
    """The variant of ``mode`` with the run's settings, some of them replaced by ``over``. Its forward
    solver is the one ``mode`` names (``@solver``), else the run's if the mode accepts it, else the
    first registered solver the mode accepts (SHINE: Broyden)."""
    v = Variant(lib, mode, cfg.k, cfg.damping, cfg.backward_iter, cfg.solver_iter, cfg.check_every)
    v = replace(v, **over)
    if v.solver is None:
        v = replace(v, solver=forward_name(mode) or _accepted_solver(cfg, v))
    return v


def _accepted_solver(cfg: BenchConfig, v: Variant) -> str | None:
    """None when the mode of ``v`` accepts the run's solver, else the first registered one it accepts."""
    try:
        mode = backward_mode(cfg, v)
    except (TypeError, ValueError):  # the row will say why
        return None
    for name in (cfg.solver, *solver_names()):
        try:
            mode.check_solver(make_solver(cfg, name, v.solver_iter, cfg.solver_tol, cfg.stop))
        except ValueError:
            continue
        return None if name == cfg.solver else name
    return None


def make_solver(
    cfg: BenchConfig,
    name: str,
    max_iter: int,
    tol: float,
    stop: str,
    check_every: int | str | None = UNSET,
    fused: bool = False,
) -> pg.Solver:
    """A registered solver with the bench's options: Broyden keeps ``cfg.broyden_memory`` slots
    (as many as steps when None, TorchDEQ's default), Anderson ``cfg.anderson_m``; ``fused`` passes
    ``fused=True`` (an error for a solver without it)."""
    cls = SOLVERS[name]
    options: dict[str, Any] = {
        "max_iter": max_iter,
        "tol": tol,
        "stop": stop,
        "memory": cfg.broyden_memory or max_iter,
        "m": cfg.anderson_m,
        "beta": cfg.reversible_beta,
    }
    kwargs = {key: val for key, val in options.items() if takes(cls, key)}
    if check_every != UNSET:
        if not takes(cls, "check_every"):
            raise ValueError(f"solver {name!r} has no check_every option in this version of phantomgrad")
        kwargs["check_every"] = check_every
    if fused:
        if name not in fusable():
            raise ValueError(f"solver {name!r} has no fused option; fused bookkeeping is for {fusable()}")
        kwargs["fused"] = True
    return cls(**kwargs)


def forward_solver(
    cfg: BenchConfig,
    v: Variant | None = None,
    name: str | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
) -> pg.Solver:
    """The forward solver of variant ``v`` (its own or the run's solver, ``v.solver_iter`` steps)."""
    check_every = v.check_every if v is not None else cfg.check_every
    steps = max_iter or (v.solver_iter if v is not None else cfg.solver_iter)
    name = name or (v.solver if v is not None else None) or cfg.solver
    fused = v is not None and v.fused
    return make_solver(cfg, name, steps, cfg.solver_tol if tol is None else tol, cfg.stop, check_every, fused)


def backward_mode(cfg: BenchConfig, v: Variant) -> pg.BackwardMode:
    """The registered backward mode of ``v``, built from the bench's options (k, damping and,
    for a mode with a backward solve, that solver with ``backward_iter`` steps to the relative
    tolerance ``backward_tol``)."""
    name, solver = split_mode(v.mode)
    cls = BACKWARD_MODES[name]
    options: dict[str, Any] = {"k": v.k, "damping": v.damping}
    kwargs = {key: val for key, val in options.items() if takes(cls, key)}
    if solver is not None:
        kwargs["solver"] = make_solver(
            cfg,
            solver,
            v.backward_iter,
            cfg.backward_tol,
            "rel",
            v.check_every,
            v.fused and solver in fusable(),
        )
    return cls(**kwargs)


def label(v: Variant) -> str:
    """How a row is named: the mode's own ``label()`` when its class offers one, else a name
    from its fields (``UPG A_{5,0.5}``, ``Implicit (broyden, 30)``, ``Backprop (30)``, ``JFB``),
    then the row's check_every or compilation."""
    try:
        mode = _mode_for_label(v)
    except (TypeError, ValueError):  # a mode the bench cannot build: its row says why, under its name
        text = v.mode
    else:
        own = getattr(mode, "label", None)
        text = own() if callable(own) else _default_label(v, mode)
    if v.solver is not None:
        text += f", {v.solver} forward"
    if v.compiled:
        text += ", compiled"
    if v.fused:
        text += ", fused"
    if v.start != "zeros":
        text += f", {v.start} start ({v.solver_iter} steps)"
    if v.check_every != UNSET:
        text += f", check_every={v.check_every}"
    return text


def _mode_for_label(v: Variant) -> pg.BackwardMode:
    """The mode of ``v`` built only to be named: its class, its k and damping, a default backward solver
    (a label reads the mode's class and fields, never its solver's options)."""
    name, solver = split_mode(v.mode)
    cls = BACKWARD_MODES[name]
    kwargs: dict[str, Any] = {key: val for key, val in {"k": v.k, "damping": v.damping}.items() if takes(cls, key)}
    if solver is not None:
        kwargs["solver"] = SOLVERS[solver]()
    return cls(**kwargs)


def _default_label(v: Variant, mode: pg.BackwardMode) -> str:
    cls = type(mode).__name__
    fields = vars(mode)
    if "solver" in fields:
        return f"{cls} ({split_mode(v.mode)[1]}, {v.backward_iter})"
    if mode.differentiates_solver:
        return f"{cls} ({v.solver_iter})"
    if repr(mode) == f"{cls}()":
        return cls
    if "k" in fields and "damping" in fields:
        return f"{cls} A_{{{v.k},{v.damping:g}}}"
    return repr(mode)


def floor_vjps(mode: pg.BackwardMode, k: int, vjps: int | None) -> tuple[float, float] | None:
    """The VJPs of F a backward cannot avoid, as (state-only VJPs, full VJPs): k full for UPG
    (JFB: one); k - 1 state-only plus one full for NPG; the backward solve's VJPs state-only
    plus one full for Implicit; the solver's steps full for Backprop. None when unknown."""
    if isinstance(mode, pg.UPG):
        return 0, mode.k
    if isinstance(mode, pg.NPG):
        return mode.k - 1, 1
    if isinstance(mode, pg.Implicit) and vjps:
        return vjps - 1, 1
    if mode.differentiates_solver and vjps:
        return 0, vjps
    return None


__all__ = [
    "UNSET",
    "takes",
    "Variant",
    "variant",
    "solver_names",
    "mode_names",
    "check_mode",
    "split_mode",
    "forward_name",
    "PAIRED",
    "make_solver",
    "forward_solver",
    "backward_mode",
    "label",
    "floor_vjps",
]
