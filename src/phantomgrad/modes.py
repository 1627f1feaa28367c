"""The registry of backward modes: the one place that lists their names.

Config validation, ``phantomgrad train --help``, the benchmarks and the tests' catalogue
of modes read :data:`BACKWARD_MODES`. Adding a backward mode is one subclass of
:class:`~phantomgrad.backward.BackwardMode` (with its ``config_keys``) and one line here.

The registry sits above the modules that define modes (``backward``, ``adaptive``), so a
mode defined in its own module is registered without an import cycle.
"""

from __future__ import annotations

from typing import Any

from .adaptive import AdaptivePhantom
from .backward import JFB, NPG, UPG, Backprop, BackwardMode, Implicit
from .gdeq import GDEQ
from .shine import SHINE

BACKWARD_MODES: dict[str, type[BackwardMode]] = {
    "implicit": Implicit,
    "upg": UPG,
    "npg": NPG,
    "jfb": JFB,
    "backprop": Backprop,
    "adaptive": AdaptivePhantom,
    "shine": SHINE,
    "gdeq": GDEQ,
}


def make_backward(name: str, **options: Any) -> BackwardMode:
    """Build a registered backward mode by name, for configs: ``make_backward("upg", k=5, damping=0.5)``.

    ``options`` are the mode's ``config_keys`` (``BACKWARD_MODES[name].config_keys``); any other
    key is refused with a one-line error that lists the keys the mode takes.
    """
    try:
        cls = BACKWARD_MODES[name]
    except KeyError:
        raise ValueError(f"unknown backward mode {name!r}; choose one of {sorted(BACKWARD_MODES)}") from None
    unknown = sorted(set(options) - set(cls.config_keys))
    if unknown:
        takes = ", ".join(cls.config_keys) if cls.config_keys else "no options"
        raise ValueError(f"backward mode {name!r} does not take {', '.join(map(repr, unknown))}; it takes: {takes}")
    return cls(**options)


__all__ = ["BACKWARD_MODES", "make_backward"]
