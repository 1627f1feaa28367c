"""Argument checks shared by the public constructors: one place for "an integer >= 1" and friends.

Each helper returns the value (converted to ``int`` or ``float``) or raises a one-line error that
names the argument, what it must be and what it got. Booleans are refused where a number is
expected (``True`` is an ``int`` in Python, so ``m=True`` would otherwise pass as 1), and so are
NaN and infinities where a float is expected.

A value of the wrong type raises :class:`ArgumentTypeError`, a ``TypeError`` that is also a
``ValueError``, so that code catching either (the CLI turns ``ValueError`` into a one-line
message) handles it; a value of the right type out of range raises ``ValueError``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (for example a bool or a float where an integer is expected)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int, which must be >= 1."""
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def nonneg_int(name: str, value: Any) -> int:
    """``value`` as an int, which must be >= 0."""
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be an integer >= 0, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def finite_float(name: str, value: Any) -> float:
    """``value`` as a finite float (ints are accepted, bools and NaN/inf are not)."""
    if not _is_real(value):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def positive_float(name: str, value: Any) -> float:
    """``value`` as a finite float > 0."""
    value = finite_float(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def nonneg_float(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0."""
    value = finite_float(name, value)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def in_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = True, high_open: bool = False
) -> float:
    """``value`` as a float in the interval from ``low`` to ``high``, by default (low, high]."""
    value = finite_float(name, value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` itself, which must be one of ``choices``."""
    choices = tuple(choices)
    if not any(value is c or type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    """``value``, which must be a bool."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value
