"""Training configuration: one dataclass, read from YAML/TOML files and ``key=value`` overrides.

Every key is checked where it enters: an unknown or misspelled key, a value of the wrong
type or an impossible value raises :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomllib
import yaml

from . import registry


class ConfigError(ValueError):
    """A bad configuration key or value; the message names it and the fix."""


@dataclass(frozen=True)
class Interval:
    """The values a numeric key allows: from ``low`` to ``high``, each end open or closed.

    A float must also be finite (inf and nan are never inside)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
AT_LEAST_ONE = Interval(1)
FRACTION = Interval(0, 1, high_open=False)  # [0, 1]


def _key(
    default: Any,
    help: str,
    *,
    within: Interval | None = None,
    choices: Callable[[str], tuple[str, ...]] | None = None,
    per_task: bool = False,
    hint: str = "",
) -> Any:
    """A config field with its one line of help and, where it has them, the interval or the
    choices it allows (``choices(task) -> names``, read from the registries; ``per_task``: they
    depend on the task). Validation and ``phantomgrad train --help`` read this metadata."""
    meta = {"help": help, "within": within, "choices": choices, "per_task": per_task, "hint": hint}
    if isinstance(default, (dict, list)):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


def _solvers(task: str) -> tuple[str, ...]:
    return registry.solver_names()


def _forward_solvers(task: str) -> tuple[str, ...]:
    return registry.forward_solver_names()


def _stops(task: str) -> tuple[str, ...]:
    return registry.solver_stops()


def _backward_modes(task: str) -> tuple[str, ...]:
    return tuple(registry.backward_modes())


def _fixed(*names: str) -> Callable[[str], tuple[str, ...]]:
    return lambda task: names


@dataclass
class TrainConfig:
    """All the knobs of ``phantomgrad train``. Defaults train an MDEQ on digits with UPG A_{5,0.5}.

    Each field carries its help line, and its allowed interval or choices, as metadata: validation
    and ``phantomgrad train --help`` are generated from it, so they cannot drift from the fields.
    """

    # what to train
    task: str = _key("image", "kind of problem", choices=lambda task: tuple(registry.TASKS))
    dataset: str = _key("digits", "dataset of the task", choices=registry.datasets, per_task=True)
    data_dir: str | None = _key(None, "folder holding the dataset's files (null: the dataset's default place)")
    data_options: dict = _key(
        {}, "dataset keywords, e.g. {train_subset: 500}, imagefolder {size: 64}, lm {seq_len: 64}"
    )
    model: str | None = _key(
        None,
        "model preset (null: the task's default, "
        + ", ".join(f"{name} {entry.default_model}" for name, entry in registry.TASKS.items())
        + ")",
        choices=registry.models,
        per_task=True,
    )
    arch: dict = _key({}, "architecture overrides passed to the model's config, e.g. arch.channels=[16,32]")
    dropout: float = _key(0.0, "dropout rate of the model's (variational) dropout", within=Interval(0, 1))
    # equilibrium solve
    solver: str = _key("anderson", "forward solver of the fixed point", choices=_forward_solvers)
    solver_max_iter: int = _key(20, "forward solver steps at most", within=AT_LEAST_ONE)
    solver_tol: float = _key(1e-3, "forward solver tolerance on the residual", within=POSITIVE)
    solver_stop: str = _key("rel", "rel: ||F(z)-z|| / ||F(z)|| <= tol; abs: ||F(z)-z|| <= tol", choices=_stops)
    solver_fused: bool = _key(
        False, "run each solver step's bookkeeping as one torch.compile'd function (fixed_point, anderson, broyden)"
    )
    # gradient
    backward: str = _key("upg", "backward mode: how the gradient of the DEQ is made", choices=_backward_modes)
    k: int = _key(5, "phantom-gradient steps (upg, npg, adaptive)", within=AT_LEAST_ONE)
    damping: float = _key(
        0.5,
        "phantom-gradient damping lambda (upg, npg, adaptive)",
        within=Interval(0, 1, low_open=True, high_open=False),
        hint=" (the paper uses 0.5-0.8)",
    )
    backward_options: dict = _key({}, "extra keywords of the backward mode (adaptive: k_min, k_max, ...)")
    backward_solver: str = _key("broyden", "solver of implicit's backward linear system", choices=_solvers)
    backward_max_iter: int = _key(20, "backward solver steps at most (implicit)", within=AT_LEAST_ONE)
    backward_tol: float = _key(1e-4, "backward solver relative tolerance (implicit)", within=POSITIVE)
    trajectory_states: list = _key(
        [], "solver steps whose states also get the loss (trajectory supervision, image task), e.g. [4, 8]"
    )
    trajectory_weight: float = _key(1.0, "weight of each trajectory state's loss", within=NON_NEGATIVE)
    pretrain_steps: int = _key(0, "first N steps train F as a weight-tied stack (unrolled)", within=NON_NEGATIVE)
    pretrain_depth: int = _key(6, "depth of the unrolled stack while pretraining", within=AT_LEAST_ONE)
    jac_reg_weight: float = _key(
        0.0, "weight of the Jacobian penalty at the fixed point (models that support it)", within=NON_NEGATIVE
    )
    jac_reg_freq: float = _key(0.0, "probability of adding the Jacobian penalty on a step", within=FRACTION)
    warm_start: str = _key(
        "auto",
        "where training solves start: learned (an init head's guess of z*), reuse (each sample's last z*), both; "
        "auto: the task's choice (image: reuse, measured in docs/convergence.md; lm, graph: none)",
        choices=_fixed("auto", "learned", "reuse", "learned+reuse", "none"),
    )
    warm_start_weight: float = _key(
        1.0, "weight of the init head's loss ||g(x) - z*||^2 / ||z*||^2 (warm_start=learned)", within=NON_NEGATIVE
    )
    warm_start_cache_mb: int = _key(
        1024,
        "memory cap of the reuse cache in MiB (warm_start=reuse; samples beyond it start cold, with a warning); "
        "0: memory-map <out_dir>/fixed_points.bin instead, without a cap",
        within=NON_NEGATIVE,
    )
    # optimisation
    epochs: int = _key(12, "passes over the training set", within=AT_LEAST_ONE)
    batch_size: int = _key(64, "samples per step (the global batch under torchrun)", within=AT_LEAST_ONE)
    optimizer: str = _key("adam", "optimiser", choices=lambda task: tuple(registry.OPTIMIZERS))
    lr: float = _key(3e-3, "learning rate (peak of the schedule)", within=POSITIVE)
    momentum: float = _key(0.9, "SGD momentum (Nesterov when > 0)", within=Interval(0, 1))
    weight_decay: float = _key(0.0, "L2 weight decay", within=NON_NEGATIVE)
    schedule: str = _key(
        "cosine", "learning-rate schedule over all steps", choices=lambda task: tuple(registry.SCHEDULES)
    )
    grad_clip: float | None = _key(None, "clip the gradient's global norm to this (null: no clipping)", within=POSITIVE)
    precision: str = _key(
        "fp32", "bf16: F under autocast, solver state and residuals in fp32", choices=lambda task: registry.PRECISIONS
    )
    # robustness
    max_bad_steps: int = _key(5, "stop after this many skipped (non-finite) steps in a row", within=AT_LEAST_ONE)
    fallback_solver: str | None = _key(
        "fixed_point", "re-solve with this (damped) when a solve goes non-finite (null: off)", choices=_forward_solvers
    )
    # gradient-quality monitor
    monitor_every: int = _key(
        0, "every N steps compare the phantom gradient with the exact one (0: off)", within=NON_NEGATIVE
    )
    monitor_rescale: bool = _key(False, "rescale the phantom gradient by the monitored norm ratio")
    radius_every: int = _key(
        2,
        "every N epochs (and the last) estimate the spectral radius of dF/dh at h* on a training batch (0: off)",
        within=NON_NEGATIVE,
    )
    bn_recalibrate: int = _key(
        0,
        "before each evaluation, re-estimate BatchNorm running statistics over this many training batches (0: off)",
        within=NON_NEGATIVE,
    )
    # run
    seed: int = _key(0, "seed of the weights, the data order and dropout")
    device: str = _key("auto", "auto: cuda when a GPU is visible, else cpu", choices=lambda task: registry.DEVICES)
    threads: int | None = _key(None, "CPU threads of torch (null: torch's default)", within=AT_LEAST_ONE)
    out_dir: str | None = _key(None, "run directory (null: runs/<dataset>-<backward>-<date-time>)")
    progress: bool | str = _key("auto", "progress bar: true, false, or auto (shown only when stderr is a terminal)")
    warn_not_converged: bool = _key(True, "warn when the forward solve misses its tolerance by 10x (false: silence)")
    tensorboard: bool = _key(False, "also log to TensorBoard (needs the tensorboard package)")
    eval_every: int = _key(1, "evaluate every N epochs (and always at the end)", within=AT_LEAST_ONE)
    log_every: int | None = _key(
        None,
        "steps between host reads of metrics and the divergence guard (null: 1 on CPU, 50 on CUDA)",
        within=AT_LEAST_ONE,
    )
    resume: bool | str | None = _key(
        None, "continue out_dir's run: true, false, or auto (if it holds a checkpoint; null: auto under torchrun)"
    )
    dist_timeout: float | None = _key(
        None, "seconds a collective may wait for a peer under torchrun (null: torch's 30 min)", within=POSITIVE
    )

    def __post_init__(self) -> None:
        if self.model is None and self.task in registry.TASKS:
            self.model = registry.TASKS[self.task].default_model
        self.validate()

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """Every choice against its registry, every number against its interval (finite for floats)."""
        _choice("task", self.task, tuple(registry.TASKS))
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if meta.get("choices") is not None:
                options = meta["choices"](self.task)
                if f.name == "model" and value not in options:
                    raise ConfigError(
                        f"model {value!r} is not {registry.TASKS[self.task].family}: task={self.task} "
                        f"trains one of {', '.join(options)}"
                    )
                where = f" for task={self.task}" if meta.get("per_task") else ""
                _choice(f.name, value, options, where)
            if f.name == "trajectory_states":
                _check_steps(f.name, value, self.solver_max_iter, self.task)
            if f.name == "progress" and value not in (True, False, "auto"):
                raise ConfigError(f"progress must be true, false or auto, got {value!r}")
            if f.name == "resume" and value not in (True, False, "auto"):
                raise ConfigError(f"resume must be true, false or auto, got {value!r}")
            within = meta.get("within")
            if within is not None and value not in within:
                finite = " and finite" if isinstance(value, float) and within.high == math.inf else ""
                raise ConfigError(f"{f.name} must be {within}{finite}, got {value!r}{meta.get('hint', '')}")

        self._refuse_keys_the_task_ignores()
        self._check_mode_takes_solver()

    def _refuse_keys_the_task_ignores(self) -> None:
        """A key the task does not act on (its registry entry's ``refuses``), set away from its default, is an error."""
        for entry, reason in registry.TASKS[self.task].refuses.items():
            key, _, bad = entry.partition("=")
            outer, _, inner = key.partition(".")
            value = getattr(self, outer)
            if inner:  # an entry of a mapping (arch.pretrain_depth): refused when present
                if not isinstance(value, dict) or inner not in value:
                    continue
                value = value[inner]
            elif (str(value) != bad) if bad else value == _default(key):
                continue
            others = [t for t, e in registry.TASKS.items() if t != self.task and key not in e.refuses]
            where = f" (it applies to task={' or task='.join(others)})" if others and not bad and not inner else ""
            fix = f"leave {key} at {_yaml_value(_default(key))}" if bad else "remove it"
            verb = "is not supported by" if bad else "is not used by"
            raise ConfigError(f"{key}={_yaml_value(value)} {verb} task={self.task}{where}: {reason}; {fix}")

    def _check_mode_takes_solver(self) -> None:
        """backward= and solver= that cannot work together (e.g. SHINE needs Broyden's estimate), in CLI syntax."""
        takes = registry.solvers_for_mode(self.backward)
        if self.solver not in takes:
            raise ConfigError(
                f"backward={self.backward} does not work with solver={self.solver}; "
                f"use solver={' or solver='.join(takes)}"
            )

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_sources(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        """Defaults, then the file (YAML or TOML), then ``key=value`` overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_config_file(Path(path)))
        for item in overrides or []:
            key, value = parse_override(item)
            if "." in key:  # arch.channels=[24,24] sets one entry of a dict-valued key
                outer, inner = key.split(".", 1)
                if not isinstance(values.get(outer, {}), dict):
                    raise ConfigError(f"{outer} is not a mapping, so {key!r} cannot be set")
                values.setdefault(outer, {})[inner] = value
            else:
                values[key] = value
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        coerced = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
                raise ConfigError(f"unknown config key {key!r}{hint}")
            coerced[key] = _coerce(key, value, known[key].type)
        return cls(**coerced)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _default(key: str) -> Any:
    """The default value of a key of :class:`TrainConfig`."""
    f = TrainConfig.__dataclass_fields__[key]
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING  # every key has a default
    return f.default_factory()


def _type_name(key: str) -> str:
    hint = typing.get_type_hints(TrainConfig)[key]
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    names = {type(None): "null", dict: "mapping"}
    return " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in allowed)


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def describe_keys() -> str:
    """One line per key of :class:`TrainConfig`: name, type, default, meaning, and the interval or
    choices it allows, generated from the fields (the text of ``phantomgrad train --help``)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING  # every key has a default
            default = f.default_factory()
        meta = f.metadata
        text = f"  {f.name} ({_type_name(f.name)}, default {_yaml_value(default)}): {meta['help']}"
        if meta.get("within") is not None:
            text += f"; {meta['within']}"
        if meta.get("choices") is not None:
            if meta.get("per_task"):
                text += "; " + "; ".join(f"{task}: {', '.join(meta['choices'](task))}" for task in registry.TASKS)
            else:
                text += f"; one of {', '.join(meta['choices'](TrainConfig.task))}"
        lines.append(text)
    return "\n".join(lines)


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist; pass an existing YAML or TOML file to --config")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} could not be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"config file {path} has keys that are not names: {odd[:3]!r}; write key: value lines")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (so 3, 0.5, true, null and strings work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. epochs=3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field's annotation, converting int -> float where natural."""
    hint = typing.get_type_hints(TrainConfig)[key]
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} must not be null")
    for typ in allowed:
        if typ is type(None):
            continue
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is bool and isinstance(value, bool):
            return value
        if typ is dict and isinstance(value, dict):
            return dict(value)
        if typ is list and isinstance(value, list):
            return list(value)
        if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")


def _check_steps(key: str, steps: list, max_iter: int, task: str) -> None:
    """Solver steps: increasing integers in [1, solver_max_iter]; trajectory supervision is the image task's."""
    if not steps:
        return
    if task != "image":
        raise ConfigError(f"{key} is supported by task=image only (got task={task}); remove it")
    ok = all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= max_iter for t in steps)
    if not ok or list(steps) != sorted(set(steps)):
        raise ConfigError(
            f"{key} must be increasing solver steps in [1, solver_max_iter={max_iter}], e.g. [4, 8]; got {steps!r}"
        )


def _choice(key: str, value: Any, options: tuple[str, ...], where: str = "") -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(options)}{where}; got {value!r}{hint}")
