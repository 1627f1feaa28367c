"""The bench's output: Markdown tables, a plot, and JSON (written and read back)."""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .config import BenchConfig
from .measure import BenchResult


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


_MAIN_HEADER = (
    "| mode | lib | forward ms | DEQ fwd ms | backward ms | DEQ bwd ms | bwd / floor | step ms (spread) | q "
    "| F fwd | VJPs bwd | F in bwd | step MiB | cos to exact | TorchDEQ / pg step |"
)


def _main_row(r: dict[str, Any], star: str) -> str:
    if r.get("na"):
        return f"| {r['label']} | {r['lib']} | n/a: {r['na']} |" + " |" * 12
    ratio = r.get("torchdeq_over_phantomgrad_step")
    cos = r.get("cosine")
    cells = [
        r["label"],
        r["lib"],
        _f(r["forward_ms"]),
        _f(r["deq_forward_ms"]),
        _f(r["backward_ms"]),
        _f(r["deq_backward_ms"]),
        _f(r.get("deq_backward_over_floor"), 2),
        f"{_f(r['step_ms'])} ({100 * r['step_spread']:.0f}%)",
        f"{r['quiet_rounds']}/{r['rounds']}",
        _f(r.get("f_forward")),
        _f(r.get("vjp_backward")),
        _f(r.get("f_backward_calls")),
        _f(r.get("step_mib")),
        _f(cos, 4) + (star if cos is not None else ""),
        _f(ratio, 2) + "x" if ratio else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def format_tables(res: BenchResult) -> str:
    cfg = res.config
    floors = res.floors
    lines = [
        f"model {cfg.model}, batch {cfg.batch}, forward solver {cfg.solver} ({cfg.solver_iter} steps, "
        f"tol {cfg.solver_tol:g}, stop {cfg.stop}, check_every {cfg.check_every}), {cfg.threads} threads, "
        f"{cfg.device}, {cfg.dtype}; medians of {cfg.repeats} rounds after {cfg.warmup} warm-up; "
        f"spread = IQR / median; quiet rounds only (F probe next to the step <= {cfg.quiet_factor:g}x the fastest) "
        f"when there are any: see the q column",
        "",
        f"floor: F {_f(floors.get('f_ms'), 2)} ms, VJP (state) {_f(floors.get('vjp_state_ms'), 2)} ms, "
        f"VJP (state, params, injection) {_f(floors.get('vjp_full_ms'), 2)} ms",
        "",
        _MAIN_HEADER,
        "|---" * 15 + "|",
    ]
    star = "" if res.reference.get("converged", True) else "*"
    lines += [_main_row(r, star) for r in res.rows]
    if res.reference:
        ref = res.reference
        lines += [
            "",
            f"exact reference: Implicit, {ref['forward_nstep']} forward / {ref['backward_nstep']} backward "
            f"Broyden steps, relative residuals {ref['forward_rel_residual']:.2g} / "
            f"{ref['backward_rel_residual']:.2g}",
        ]
        if not ref.get("converged", True):
            lines.append(
                "(*) the reference did not converge (no reachable fixed point, e.g. an untrained "
                "non-contractive map): the cosines compare two inexact gradients and mean little"
            )
    if res.solvers:
        lines += [
            "",
            "| forward solver (no grad) | lib | ms (spread) | F evals | inside F ms | overhead ms | overhead |",
            "|---" * 7 + "|",
        ]
        for s in res.solvers:
            lines.append(
                f"| {s['solver']} | {s['lib']} | {_f(s['ms'])} ({100 * s['spread']:.0f}%) | {s['f_evals']} | "
                f"{_f(s['f_evals_ms'])} | {_f(s['overhead_ms'])} | {s['overhead_pct']:+.0f}% |"
            )
    for title, rows in (("sweep over k", res.sweep_k), ("sweep over solver steps K", res.sweep_K)):
        if rows:
            lines += [
                "",
                f"{title}:",
                "",
                "| mode | k | K fwd | K bwd | DEQ bwd ms | backward ms | step ms (spread) | q | VJPs bwd | step MiB |",
                "|---" * 10 + "|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['label']} | {r['k']} | {r['solver_iter']} | {r['backward_iter']} | "
                    f"{_f(r['deq_backward_ms'])} | {_f(r['backward_ms'])} | {_f(r['step_ms'])} "
                    f"({100 * r['step_spread']:.0f}%) | {r['quiet_rounds']}/{r['rounds']} | "
                    f"{_f(r.get('vjp_backward'))} | {_f(r.get('step_mib'))} |"
                )
    if res.targets:
        lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
        for t in res.targets:
            note = f" ({t['note']})" if t["note"] else ""
            lines.append(
                f"| {t['target']}{note} | {t['value']:.3f} | {t['kind']} {t['limit']} | {'yes' if t['met'] else 'NO'} |"
            )
    return "\n".join(lines)


def plot(res: BenchResult, path: Path) -> Path | None:
    """Time and memory against k (UPG, NPG) and against K (Implicit, Backprop)."""
    if not (res.sweep_k or res.sweep_K):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (rows, xkey, xlabel, modes) in enumerate(
        (
            (res.sweep_k, "k", "k (phantom steps)", ("upg", "npg")),
            (
                res.sweep_K,
                None,
                "K (solver steps: backward for Implicit, forward for Backprop)",
                ("implicit-broyden", "implicit-fixed_point", "backprop"),
            ),
        )
    ):
        for mode in modes:
            sel = [r for r in rows if r["mode"] == mode]
            if not sel:
                continue
            xs = [r[xkey] if xkey else (r["solver_iter"] if mode == "backprop" else r["backward_iter"]) for r in sel]
            label = sel[0]["label"].split(" ")[0] + ("" if mode in ("upg", "npg") else f" ({mode.split('-')[-1]})")
            axes[0, col].plot(xs, [r["deq_backward_ms"] for r in sel], marker="o", label=label)
            if "step_mib" in sel[0]:
                axes[1, col].plot(xs, [r["step_mib"] for r in sel], marker="o", label=label)
        axes[0, col].set_ylabel("DEQ backward (ms, median)")
        axes[1, col].set_ylabel("peak memory of a step (MiB)")
        for ax in axes[:, col]:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    cfg = res.config
    fig.suptitle(
        f"{cfg.model}, batch {cfg.batch}, {cfg.solver} forward ({cfg.solver_iter}), {cfg.threads} threads, {cfg.device}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(res: BenchResult) -> dict[str, Any]:
    out = asdict(res)
    out["config"] = asdict(res.config)
    return out


def from_json(data: dict[str, Any]) -> BenchResult:
    """A :class:`BenchResult` back from :func:`to_json`'s output (to re-render its tables and plot)."""
    known = {f.name for f in fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in data["config"].items() if k in known})
    res = BenchResult(cfg)
    for f in fields(BenchResult):
        if f.name != "config" and f.name in data:
            setattr(res, f.name, data[f.name])
    return res


__all__ = ["format_tables", "plot", "to_json", "from_json"]
