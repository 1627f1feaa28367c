"""Statistics of the bench's rounds: medians, spreads, per-round ratios and quiet rounds."""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def spread(xs: Sequence[float]) -> float:
    """Interquartile range over median (0 for fewer than 2 samples)."""
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    med = statistics.median(xs)
    return (q3 - q1) / med if med else math.nan


def paired_ratio(
    num: Sequence[float], den: Sequence[float], mask: Sequence[bool] | None = None
) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios num[r] / den[r] (over the rounds in
    ``mask`` when some are, else over all; rounds with a NaN or a zero denominator are left out)."""
    valid = [bool(b) and not (math.isnan(a) or math.isnan(b)) for a, b in zip(num, den)]
    ratios = [a / b for a, b, v in zip(num, den, valid) if v]
    if mask is not None:
        ratios = pick(ratios, [q for q, v in zip(mask, valid) if v])
    if not ratios:
        return math.nan, math.nan, math.nan
    return statistics.median(ratios), min(ratios), max(ratios)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares slope, intercept and R^2."""
    n = len(xs)
    if n < 2:
        return math.nan, math.nan, math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else math.nan
    icpt = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    return slope, icpt, 1 - ss_res / ss_tot if ss_tot else 1.0


def quiet_mask(samples: dict[Any, dict[str, list[float]]], factor: float) -> dict[Any, list[bool]]:
    """Per variant and round: was the machine quiet? The F probe timed right after the step
    must be within ``factor`` of the fastest F probe of the whole run (on a shared machine
    another process's burst slows F and everything else several-fold)."""
    fs = [x for s in samples.values() for x in s.get("floor_f", [])]
    if not fs or factor <= 0:
        return {v: [True] * len(s.get("step", [])) for v, s in samples.items()}
    fastest = min(fs)
    return {v: [x <= factor * fastest for x in s["floor_f"]] for v, s in samples.items()}


def pick(xs: Sequence[float], mask: Sequence[bool]) -> list[float]:
    """The quiet samples, or all of them when none was quiet."""
    quiet = [x for x, q in zip(xs, mask) if q]
    return quiet if quiet else list(xs)


__all__ = ["median", "spread", "paired_ratio", "linear_fit", "pick", "quiet_mask"]
