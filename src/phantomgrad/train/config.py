"""Training configuration: one dataclass, read from YAML/TOML files and ``key=value`` overrides.

Every key is checked where it enters: an unknown or misspelled key, a value of the wrong
type or an impossible value raises :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


DEFAULT_MODELS = {"image": "mdeq-tiny", "lm": "deq-transformer", "graph": "ignn"}


class ConfigError(ValueError):
    """A bad configuration key or value; the message names it and the fix."""


@dataclass
class TrainConfig:
    """All the knobs of ``phantomgrad train``. Defaults train an MDEQ on digits with UPG A_{5,0.5}."""

    # what to train
    task: str = "image"  # image | (see phantomgrad.train.tasks.TASKS)
    dataset: str = "digits"  # image: digits | fashion-mnist | cifar10 | imagefolder
    data_dir: str | None = None
    data_options: dict = field(default_factory=dict)  # dataset keywords, e.g. {size: 64} for imagefolder
    model: str | None = None  # None: the task's default (image: mdeq-tiny, lm: deq-transformer, graph: ignn)
    arch: dict = field(default_factory=dict)  # architecture overrides passed to the model's config
    dropout: float = 0.0
    # equilibrium solve
    solver: str = "anderson"  # anderson | broyden | fixed_point
    solver_max_iter: int = 20
    solver_tol: float = 1e-3
    solver_stop: str = "rel"
    # gradient
    backward: str = "upg"  # implicit | upg | npg | jfb | backprop | adaptive
    k: int = 5
    damping: float = 0.5
    backward_options: dict = field(default_factory=dict)  # extra keywords of the backward mode (adaptive)
    backward_solver: str = "broyden"  # implicit only: broyden | fixed_point | anderson
    backward_max_iter: int = 20
    backward_tol: float = 1e-4
    pretrain_steps: int = 0  # first N steps train F as a weight-tied stack (unrolled)
    pretrain_depth: int = 6
    jac_reg_weight: float = 0.0  # weight of pg.jacobian_penalty at the fixed point (models that support it)
    jac_reg_freq: float = 0.0  # probability of adding the penalty on a step
    # optimisation
    epochs: int = 12
    batch_size: int = 64
    optimizer: str = "adam"  # adam | sgd
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float | None = None
    precision: str = "fp32"  # fp32 | bf16 (F under autocast; solver state and residuals stay fp32)
    # robustness
    max_bad_steps: int = 5  # stop after this many skipped (non-finite) steps in a row
    fallback_solver: str | None = "fixed_point"  # re-solve with a damped fixed point when the solve goes non-finite
    # gradient-quality monitor (issue: beyond the paper)
    monitor_every: int = 0  # every N steps compare the phantom gradient with the exact one (0: off)
    monitor_rescale: bool = False  # rescale the phantom gradient by the monitored norm ratio
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None
    out_dir: str | None = None  # default: runs/<dataset>-<backward>-<date-time>
    progress: bool = True
    tensorboard: bool = False
    eval_every: int = 1  # evaluate on the test split every N epochs (and always at the end)

    def __post_init__(self) -> None:
        if self.model is None and self.task in DEFAULT_MODELS:
            self.model = DEFAULT_MODELS[self.task]
        self.validate()

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        from .tasks import TASKS  # the registry imports this module

        _choice("task", self.task, tuple(TASKS))
        _choice("dataset", self.dataset, TASKS[self.task][2])
        _choice("solver", self.solver, ("anderson", "broyden", "fixed_point"))
        _choice("solver_stop", self.solver_stop, ("rel", "abs"))
        _choice("backward", self.backward, ("implicit", "upg", "npg", "jfb", "backprop", "adaptive"))
        _choice("precision", self.precision, ("fp32", "bf16"))
        if self.fallback_solver is not None:
            _choice("fallback_solver", self.fallback_solver, ("fixed_point", "anderson", "broyden"))
        _choice("backward_solver", self.backward_solver, ("broyden", "fixed_point", "anderson"))
        _choice("optimizer", self.optimizer, ("adam", "sgd"))
        _choice("schedule", self.schedule, ("cosine", "constant"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        for key in ("solver_max_iter", "backward_max_iter", "epochs", "batch_size", "k", "pretrain_depth", "eval_every"):
            _at_least(key, getattr(self, key), 1)
        _at_least("pretrain_steps", self.pretrain_steps, 0)
        _at_least("monitor_every", self.monitor_every, 0)
        _at_least("max_bad_steps", self.max_bad_steps, 1)
        if self.threads is not None:
            _at_least("threads", self.threads, 1)
        for key in ("solver_tol", "backward_tol", "lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0 < self.damping <= 1:
            raise ConfigError(f"damping must be in (0, 1], got {self.damping!r} (the paper uses 0.5-0.8)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("weight_decay must be >= 0 and momentum in [0, 1)")
        if self.jac_reg_weight < 0 or not 0 <= self.jac_reg_freq <= 1:
            raise ConfigError("jac_reg_weight must be >= 0 and jac_reg_freq in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or null, got {self.grad_clip!r}")

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
        if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")


def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(options)}; got {value!r}{hint}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")
