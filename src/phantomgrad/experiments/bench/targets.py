"""The issue's performance targets, each with its measured value and whether it is met."""

from __future__ import annotations

import math
from typing import Any

from .stats import linear_fit, paired_ratio


def _find(rows: list[dict], mode: str, lib: str = "phantomgrad") -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["mode"] == mode
            and r["lib"] == lib
            and not r.get("na")
            and not r.get("compiled")
            and r.get("check_every", "default") == "default"
        ),
        None,
    )


def evaluate_targets(
    rows: list[dict[str, Any]], solvers: list[dict[str, Any]], sweep_k: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it is met, from a bench result's
    rows, forward-solver table and k sweep (plain data: this module does not import the measuring one)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float, kind: str, note: str = "") -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        met = value <= limit if kind == "<=" else value >= limit
        out.append({"target": name, "value": value, "limit": limit, "kind": kind, "met": bool(met), "note": note})

    for mode, limit in (("upg", 1.2), ("npg", 1.2), ("implicit-fixed_point", 1.1), ("implicit-broyden", 1.5)):
        r = _find(rows, mode)
        if r:
            add(
                f"{mode} DEQ backward / its VJPs of F",
                r["deq_backward_over_floor"],
                limit,
                "<=",
                f"floor {r['floor_ms']:.1f} ms",
            )
    by_solver = {(s["lib"], s["solver"]): s for s in solvers}
    if ("phantomgrad", "fixed_point") in by_solver:
        s = by_solver[("phantomgrad", "fixed_point")]
        add("FixedPoint time / its F evaluations", 1 + s["overhead_pct"] / 100, 1.1, "<=")
    for name in ("anderson", "broyden"):
        a, b = by_solver.get(("phantomgrad", name)), by_solver.get(("torchdeq", name))
        if a and b and b["overhead_ms"] > 0:
            add(f"{name} overhead beyond F: phantomgrad / TorchDEQ", a["overhead_ms"] / b["overhead_ms"], 0.5, "<=")
    upg, imp = _find(rows, "upg"), _find(rows, "implicit-broyden")
    if upg and imp and upg["k"] == 5 and upg["damping"] == 0.5:
        both = [a and b for a, b in zip(imp["quiet_mask"], upg["quiet_mask"])]
        med, _, _ = paired_ratio(imp["samples_ms"]["step"], upg["samples_ms"]["step"], both)
        add(f"step: Implicit (broyden, {imp['backward_iter']}) / UPG A_{{5,0.5}}", med, 1.5, ">=")
    for r in rows:
        if r["lib"] == "phantomgrad" and "torchdeq_over_phantomgrad_step" in r:
            add(f"step: TorchDEQ / phantomgrad, {r['label']}", r["torchdeq_over_phantomgrad_step"], 1.25, ">=")
    npg, impf = _find(rows, "npg"), _find(rows, "implicit-fixed_point")
    if npg and impf and "step_mib" in npg and impf.get("step_mib"):
        add("peak memory: NPG / Implicit (fixed_point)", npg["step_mib"] / impf["step_mib"], 1.1, "<=")
    upgs = [r for r in sweep_k if r["mode"] == "upg" and not math.isnan(r.get("step_mib", math.nan))]
    if len(upgs) >= 3:
        slope, _, r2 = linear_fit([r["k"] for r in upgs], [r["step_mib"] for r in upgs])
        add("UPG memory linear in k: R^2 of a line", r2, 0.98, ">=", f"slope {slope:.1f} MiB per step")
    return out


__all__ = ["evaluate_targets"]
