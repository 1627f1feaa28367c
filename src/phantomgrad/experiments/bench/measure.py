"""The measurements of one ``phantomgrad bench`` run (see the package docstring): probes,
round-robin timing, cosines, memory, the forward-solver table and the sweeps."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from phantomgrad.solvers import fusable

from .config import BenchConfig
from .instruments import FCounter, FTimer
from .memory import measure_memory
from .modes import UNSET, Variant, backward_mode, floor_vjps, make_solver, solver_names, variant
from .problem import build_problem
from .runner import Runner
from .stats import median, paired_ratio, pick, quiet_mask, spread
from .targets import evaluate_targets
from .torchdeq import call as torchdeq_call
from .torchdeq import import_torchdeq, unsupported

FUSED_LIB = "phantomgrad, fused"  # the solver table's rows of phantomgrad's solvers with fused=True

log = logging.getLogger(__name__)

# A variant that cannot run (its mode refuses the settings) gets an n/a row with the reason.
_REFUSALS = (ValueError, TypeError, NotImplementedError)


@dataclass
class BenchResult:
    config: BenchConfig
    machine: dict[str, Any] = field(default_factory=dict)
    floors: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    solvers: list[dict[str, Any]] = field(default_factory=list)
    sweep_k: list[dict[str, Any]] = field(default_factory=list)
    sweep_K: list[dict[str, Any]] = field(default_factory=list)  # noqa: N815
    reference: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def machine_info(cfg: BenchConfig) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": cfg.device,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if cfg.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    try:
        import torchdeq

        info["torchdeq"] = getattr(torchdeq, "__version__", "installed")
    except ImportError:
        pass
    return info


def _time_rounds(runner: Runner, variants: list[Variant], repeats: int, warmup: int, floors: bool) -> dict:
    """Round-robin timing: each round runs every variant once. With ``floors``, the floor
    probes (one F, one VJP wrt the state, one full VJP) are timed right after each
    variant's step, so a variant's backward can be divided by the floor of the same
    moment (``floor_*`` samples of that variant)."""
    samples: dict[Variant, dict[str, list[float]]] = {v: {} for v in variants}
    for r in range(warmup + repeats):
        for v in variants:
            t = runner.step(v)
            runner.restore()
            if floors:
                t.update(
                    floor_f=runner.time_f(),
                    floor_vjp_state=runner.time_vjp(full=False),
                    floor_vjp_full=runner.time_vjp(full=True),
                )
            if r >= warmup:
                for key, val in t.items():
                    samples[v].setdefault(key, []).append(val)
        log.info("round %d/%d done", r + 1, warmup + repeats)
    return samples


def _describe(v: Variant) -> dict[str, Any]:
    keys = ("k", "damping", "backward_iter", "solver_iter", "check_every", "compiled", "solver", "fused")
    return {"lib": v.lib, "mode": v.mode, "label": v.label, **{k: getattr(v, k) for k in keys}}


def _row(v: Variant, s: dict[str, list[float]], mask: list[bool] | None = None) -> dict[str, Any]:
    mask = list(mask) if mask is not None else [True] * len(s.get("step", []))
    row = _describe(v)
    for key in ("forward", "deq_forward", "backward", "deq_backward", "step", "cpu"):
        xs = pick(s.get(key, []), mask)
        row[f"{key}_ms"] = 1e3 * median(xs)
        row[f"{key}_spread"] = spread(xs)
        row[f"{key}_ms_all_rounds"] = 1e3 * median(s.get(key, []))
    row["quiet_rounds"] = sum(mask)
    row["rounds"] = len(mask)
    row["quiet_mask"] = mask
    row["samples_ms"] = {
        key: [1e3 * x for x in xs] for key, xs in s.items() if key != "loss" and not key.startswith("floor")
    }
    row["floor_samples_ms"] = {key: [1e3 * x for x in xs] for key, xs in s.items() if key.startswith("floor")}
    return row


def na_row(v: Variant, reason: str) -> dict[str, Any]:
    """The row of a variant that could not run, with the reason."""
    return {**_describe(v), "na": reason}


def _floor_ms(cfg: BenchConfig, v: Variant, vjps: int | None, vjp_state_ms: float, vjp_full_ms: float) -> float:
    """The VJPs of F the backward of v cannot avoid, in ms (see :func:`.modes.floor_vjps`)."""
    counts = floor_vjps(backward_mode(cfg, v), v.k, vjps)
    if counts is None:
        return math.nan
    n_state, n_full = counts
    return n_state * vjp_state_ms + n_full * vjp_full_ms


def variants_of(cfg: BenchConfig) -> tuple[list[Variant], list[dict[str, Any]]]:
    """The variants to measure, and the n/a rows of TorchDEQ partners that cannot exist."""
    variants: list[Variant] = []
    na: list[dict[str, Any]] = []
    for mode in cfg.modes:
        v = variant(cfg, mode)
        variants.append(v)
        if cfg.compare == "torchdeq":
            td = replace(v, lib="torchdeq", check_every=UNSET)
            reason = unsupported(cfg, td)
            if reason:
                na.append(na_row(td, reason))
            else:
                variants.append(td)
    for mode in cfg.modes:
        if cfg.sync_free and cfg.check_every is not None:
            variants.append(variant(cfg, mode, check_every=None))
        if cfg.compiled:
            sync_free = cfg.sync_free or cfg.check_every is None
            variants.append(variant(cfg, mode, compiled=True, check_every=None if sync_free else cfg.check_every))
        if cfg.fused:
            check_every = None if cfg.sync_free else cfg.check_every
            variants.append(variant(cfg, mode, fused=True, check_every=check_every))
        if cfg.warm_starts:
            steps = cfg.warm_iter or cfg.solver_iter
            variants += [variant(cfg, mode, start=start, solver_iter=steps) for start in ("reuse", "learned")]
    return variants, na


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Every measurement of one ``phantomgrad bench`` run (see the package docstring)."""
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    if cfg.compare == "torchdeq":
        import_torchdeq()
    result = BenchResult(cfg, machine_info(cfg))
    runner = Runner(cfg, build_problem(cfg))
    runner.prepare_floor()
    variants, na_rows = variants_of(cfg)

    # 1. one untimed probe step each: F counts and the gradient for the cosine
    probes = {}
    refused: dict[Variant, str] = {}
    for v in variants:
        try:
            probes[v] = runner.probe(v)
        except _REFUSALS as err:  # e.g. a mode that needs another forward solver
            log.warning("%s %s cannot run here: %s", v.lib, v.label, err)
            refused[v] = str(err).splitlines()[0]
            runner.restore()
    variants = [v for v in variants if v not in refused]
    counts = {v: c for v, (c, _) in probes.items()}

    if cfg.profile is not None:
        profile_variants(cfg, runner, variants, Path(cfg.profile))

    # 2. timing, round-robin
    log.info("timing %d variants x %d rounds", len(variants), cfg.warmup + cfg.repeats)
    samples = _time_rounds(runner, variants, cfg.repeats, cfg.warmup, floors=True)
    quiet = quiet_mask(samples, cfg.quiet_factor)
    for key in ("f", "vjp_state", "vjp_full"):
        allq = [x for v in variants for x in pick(samples[v][f"floor_{key}"], quiet[v])]
        result.floors[f"{key}_ms"] = 1e3 * median(allq)
    rows: dict[Variant, dict[str, Any]] = {}
    for v in variants:
        row = _row(v, samples[v], quiet[v])
        row.update(counts[v])
        sv = samples[v]
        fl = {k: pick(sv[f"floor_{k}"], quiet[v]) for k in ("vjp_state", "vjp_full")}
        n = row.get("vjp_backward")
        row["floor_ms"] = _floor_ms(cfg, v, n, 1e3 * median(fl["vjp_state"]), 1e3 * median(fl["vjp_full"]))
        per_round = [
            1e3 * b / _floor_ms(cfg, v, n, 1e3 * vz, 1e3 * vf)
            for b, vz, vf in zip(pick(sv["deq_backward"], quiet[v]), fl["vjp_state"], fl["vjp_full"])
        ]
        row["deq_backward_over_floor"] = median(per_round)  # paired per round, then the median
        rows[v] = row
    for v in variants:  # ratios per round against the partner variant
        if v.lib == "torchdeq":
            pgv = replace(v, lib="phantomgrad", check_every=cfg.check_every)
            both = [a and b for a, b in zip(quiet[v], quiet[pgv])]
            for key in ("step", "forward", "backward", "deq_forward", "deq_backward"):
                med, lo, hi = paired_ratio(samples[v][key], samples[pgv][key], both)
                rows[pgv][f"torchdeq_over_phantomgrad_{key}"] = med
                if key == "step":
                    rows[pgv]["torchdeq_over_phantomgrad_step_range"] = [lo, hi]

    # 3. cosine to a tightly solved Implicit gradient
    if cfg.cosine:
        ref, result.reference = runner.reference_grad()
        runner.restore()
        cos = torch.nn.functional.cosine_similarity
        for v in variants:
            rows[v]["cosine"] = float(cos(probes[v][1], ref, dim=0))
            if v.lib == "torchdeq":
                pg_grad = probes[replace(v, lib="phantomgrad", check_every=cfg.check_every)][1]
                rows[v]["cosine_vs_phantomgrad"] = float(cos(probes[v][1], pg_grad, dim=0))

    # 4. peak memory
    if cfg.memory:
        for v in variants:
            rows[v].update(measure_memory(cfg, v, runner))

    order, _ = variants_of(cfg)
    result.rows = [rows[v] if v in rows else na_row(v, refused[v]) for v in order]
    for r in na_rows:  # each TorchDEQ n/a row right after its phantomgrad partner
        at = next(i for i, row in enumerate(result.rows) if row["mode"] == r["mode"] and row["lib"] == "phantomgrad")
        result.rows.insert(at + 1, r)

    # 5. forward solvers alone
    if cfg.solvers:
        result.solvers = solver_table(cfg, runner)

    # 6. sweeps
    if cfg.sweep_k:
        result.sweep_k = sweep(cfg, runner, [variant(cfg, m, k=k) for k in cfg.sweep_k for m in ("upg", "npg")])
    if cfg.sweep_K:
        sv = []
        for K in cfg.sweep_K:  # noqa: N806
            sv += [
                variant(cfg, "implicit-broyden", backward_iter=K),
                variant(cfg, "implicit-fixed_point", backward_iter=K),
                variant(cfg, "backprop", solver_iter=K),
            ]
        result.sweep_K = sweep(cfg, runner, sv)
    result.targets = evaluate_targets(result.rows, result.solvers, result.sweep_k)
    result.seconds = time.perf_counter() - start
    return result


def _solve_alone(cfg: BenchConfig, runner: Runner, lib: str, solver: str, u: Any, z0: Any) -> None:
    """One forward solve with ``solver`` under no_grad, in eval mode (no backward work)."""
    p = runner.p
    with torch.no_grad():
        if lib.startswith("phantomgrad"):
            deq = p.deq
            deq.eval()
            fused = lib == FUSED_LIB
            deq.solver = make_solver(cfg, solver, cfg.solver_iter, cfg.solver_tol, cfg.stop, cfg.check_every, fused)
            deq(u, z0)
            deq.train()
        else:
            # TorchDEQ needs some backward mode to build; eval mode never uses it
            tdeq, skw = runner.torchdeq(variant(cfg, "jfb", check_every=UNSET), solver)
            tdeq.eval()
            torchdeq_call(tdeq, skw, p.f, u, z0)
            tdeq.train()


def _solver_libs(cfg: BenchConfig, solver: str) -> list[str]:
    probe = variant(cfg, "jfb", check_every=UNSET)
    has_td = cfg.compare == "torchdeq" and unsupported(cfg, probe, solver) is None
    fused = cfg.fused and solver in fusable()
    return ["phantomgrad"] + ([FUSED_LIB] if fused else []) + (["torchdeq"] if has_td else [])


def profile_variants(cfg: BenchConfig, runner: Runner, variants: list[Variant], out_dir: Path) -> None:
    """One training step per variant (after a warm-up step) under torch.profiler; the
    operators sorted by self CPU time go to ``out_dir/profile_<lib>_<mode>.txt``, and the
    forward solvers alone (no grad) to ``profile_solvers.txt``."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    for v in variants:
        runner.step(v)
        runner.restore()
        with profile(activities=acts) as prof:
            runner.step(v)
        runner.restore()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        tag = "_compiled" if v.compiled else "_fused" if v.fused else "_sync_free" if v.check_every is None else ""
        (out_dir / f"profile_{v.lib}_{v.mode}{tag}.txt").write_text(
            f"{v.lib} {v.label}: one training step\n\n{table}\n"
        )
    p = runner.p
    with torch.no_grad(), p.context():
        u, z0 = p.prepare(p.x)
    lines = []
    for solver in solver_names():
        for lib in _solver_libs(cfg, solver):
            with profile(activities=acts) as prof:
                _solve_alone(cfg, runner, lib, solver, u, z0)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
            lines.append(f"{lib} {solver} ({cfg.solver_iter} steps, no grad)\n\n{table}\n")
    (out_dir / "profile_solvers.txt").write_text("\n".join(lines))
    log.info("wrote profiles to %s", out_dir)


def sweep(cfg: BenchConfig, runner: Runner, variants: list[Variant]) -> list[dict[str, Any]]:
    """Time (and measure the memory of) many variants of phantomgrad, round-robin."""
    counts = {v: runner.count(v) for v in variants}
    samples = _time_rounds(runner, variants, cfg.sweep_repeats, cfg.warmup, floors=True)
    quiet = quiet_mask(samples, cfg.quiet_factor)
    rows = []
    for v in variants:
        row = _row(v, samples[v], quiet[v])
        row.update(counts[v])
        if cfg.memory:
            row.update(measure_memory(cfg, v, runner))
        rows.append(row)
    return rows


def solver_table(cfg: BenchConfig, runner: Runner) -> list[dict[str, Any]]:
    """Each forward solver alone under no_grad (K steps), against the time its own F
    evaluations took in the same run (:class:`FTimer`): overhead = solve - inside F,
    medians over rounds, the overhead in % is the median of the per-round ratios."""
    p = runner.p
    with torch.no_grad(), p.context():
        u, z0 = p.prepare(p.x)
    counts: dict[tuple[str, str], int] = {}
    for solver in solver_names():
        for lib in _solver_libs(cfg, solver):
            counter = FCounter(p.block).install()
            try:
                _solve_alone(cfg, runner, lib, solver, u, z0)
            finally:
                counter.remove()
            counts[(lib, solver)] = counter.calls.get("forward", 0)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in counts}
    inside: dict[tuple[str, str], list[float]] = {key: [] for key in counts}
    for r in range(cfg.warmup + cfg.repeats):
        for key in counts:
            timer = FTimer(p.block, runner.clock).install()
            try:
                t0 = runner.clock()
                _solve_alone(cfg, runner, key[0], key[1], u, z0)
                dt = runner.clock() - t0
            finally:
                timer.remove()
            if r >= cfg.warmup:
                samples[key].append(dt)
                inside[key].append(timer.seconds)
    rows = []
    for (lib, solver), xs in samples.items():
        ins = inside[(lib, solver)]
        over = [a - b for a, b in zip(xs, ins)]
        rel = [o / b for o, b in zip(over, ins)]
        rows.append(
            {
                "solver": solver,
                "lib": lib,
                "ms": 1e3 * median(xs),
                "spread": spread(xs),
                "f_evals": counts[(lib, solver)],
                "f_evals_ms": 1e3 * median(ins),
                "overhead_ms": 1e3 * median(over),
                "overhead_pct": 100 * median(rel),
                "samples_ms": [1e3 * x for x in xs],
                "inside_f_ms": [1e3 * x for x in ins],
            }
        )
    return rows


__all__ = ["BenchResult", "run_bench", "machine_info", "variants_of", "sweep", "solver_table", "profile_variants"]
