"""``phantomgrad evaluate RUN_DIR [key=value ...]``: anytime evaluation, the accuracy-vs-compute curve.

A DEQ's inference cost is the forward solve: every evaluation of F. This command loads a trained
run's checkpoint, rebuilds its model and data from ``config.yaml``, and evaluates the test split
(``split=``) at every solver budget of a grid: each ``solver_max_iter`` with each ``solver_tol``.
For each budget it reports the task's metrics (accuracy), the mean number of evaluations of F per
sample (the solver's per-sample ``nstep``: a sample stops counting when it meets the tolerance),
the fraction of samples that converged and their mean final relative residual. The table tells how
far inference can be cut at what price in accuracy.

Keys (comma-separated lists where a grid is meant):

    solver_max_iter=2,4,8,16,32   forward steps at most (default: that list and the run's own)
    solver_tol=1e-3,1e-5          forward tolerance (default: the run's)
    solver=anderson               forward solver (default: the run's); solver_stop=rel|abs
    split=test                    evaluation split of the task (default: test)
    batch_size=256                evaluation batch; device=auto|cpu|cuda; threads=N
    out_dir=DIR                   where the files go (default: RUN_DIR/evaluate)
    bn_recalibrate=N              first re-estimate the BatchNorm running statistics over N training
                                  batches (phantomgrad.train.batchnorm; default 0: as trained)

The cheapest budget at the reference accuracy (that of the budget the run was trained with, where
the grid has it) is named with its saving in F evaluations.

Files: ``evaluate.json`` (every row and the setting), ``evaluate.md`` (the table) and
``evaluate.png`` (accuracy against mean F evaluations per sample, one line per tolerance).
A run directory without ``config.yaml`` or checkpoint, or an unknown or bad key, ends with one
line and exit code 2 (nothing written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from phantomgrad.monitor import deq_modules
from phantomgrad.train import builders
from phantomgrad.train.batchnorm import draw_seed, recalibrate_task, require_batchnorm
from phantomgrad.train.checkpoint import CheckpointError, has_checkpoint, load_checkpoint
from phantomgrad.train.config import ConfigError, TrainConfig
from phantomgrad.train.meter import Meter
from phantomgrad.train.tasks import as_dataset

log = logging.getLogger(__name__)

DEFAULT_MAX_ITERS = (2, 4, 8, 16, 32)
JSON_FILE, MD_FILE, PLOT_FILE = "evaluate.json", "evaluate.md", "evaluate.png"


@dataclasses.dataclass
class EvalOptions:
    """The command's keys, checked where they enter (see the module docstring)."""

    solver_max_iter: tuple[int, ...] | None = None
    solver_tol: tuple[float, ...] | None = None
    solver: str | None = None
    solver_stop: str | None = None
    split: str = "test"
    batch_size: int = 256
    device: str = "auto"
    threads: int | None = None
    out_dir: str | None = None
    bn_recalibrate: int = 0

    @classmethod
    def parse(cls, items: list[str]) -> "EvalOptions":
        known = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, Any] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or not raw:
                raise ConfigError(f"expected key=value, got {item!r}; keys: {', '.join(known)}")
            if key not in known:
                raise ConfigError(f"unknown key {key!r} for evaluate; keys: {', '.join(known)}")
            values[key] = _value(key, raw)
        return cls(**values)


def _value(key: str, raw: str) -> Any:
    """One key's value: a list of positive ints or floats for the grid keys, else a scalar."""
    try:
        if key == "solver_max_iter":
            out: Any = tuple(int(v) for v in raw.split(","))
            bad = [v for v in out if v < 1]
        elif key == "solver_tol":
            out = tuple(float(v) for v in raw.split(","))
            bad = [v for v in out if not (v > 0 and math.isfinite(v))]
        elif key in ("batch_size", "threads"):
            out, bad = int(raw), [int(raw)] if int(raw) < 1 else []
        elif key == "bn_recalibrate":
            out, bad = int(raw), [int(raw)] if int(raw) < 0 else []
        else:
            return raw
    except ValueError:
        raise ConfigError(f"{key}={raw}: expected a comma-separated list of positive numbers") from None
    if bad:
        raise ConfigError(f"{key}={raw}: every value must be positive (and finite)")
    return out


def load_run(run_dir: Path, opts: EvalOptions) -> tuple[TrainConfig, Any, torch.device]:
    """The run's config (with the evaluation's device and threads), its task and model with the
    checkpoint's weights, on the device."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{run_dir} has no config.yaml, so it is not a phantomgrad run directory; pass a train out_dir"
        )
    checkpoint = run_dir / "checkpoint.pt"
    if not has_checkpoint(checkpoint):
        raise CheckpointError(f"{run_dir} has no checkpoint.pt to evaluate; train the run (or resume it) first")
    overrides = [f"device={opts.device}"] + ([f"threads={opts.threads}"] if opts.threads else [])
    overrides += [f"{k}={getattr(opts, k)}" for k in ("solver", "solver_stop") if getattr(opts, k) is not None]
    cfg = TrainConfig.from_sources(run_dir / "config.yaml", overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = builders.resolve_device(cfg.device)
    task = builders.build_task(cfg)
    if opts.split not in task.eval_sets:
        raise ConfigError(f"split={opts.split}: task {cfg.task} evaluates on {', '.join(task.eval_sets)}")
    state = load_checkpoint(checkpoint)
    try:
        task.model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint in {run_dir} does not fit the model of its config.yaml ({str(err).splitlines()[0]})"
        ) from None
    task.model.to(device).eval()
    return cfg, task, device


@torch.no_grad()
def evaluate_budget(task: Any, cfg: TrainConfig, device: torch.device, split: str, batch_size: int) -> dict[str, Any]:
    """The task's metrics on ``split`` with the DEQ layers' solvers as ``cfg`` builds them, plus mean F
    evaluations per sample (``f_evals``), converged fraction and mean relative residual."""
    solver = builders.build_solver(cfg)
    for layer in deq_modules(task.model):
        layer.solver = solver
        layer.warn_not_converged = False  # small budgets miss the tolerance by design: the table says by how much
    meter = Meter()
    nstep = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    start = time.perf_counter()
    loader = DataLoader(as_dataset(task.eval_sets[split]), batch_size=batch_size, collate_fn=task.collate)
    for batch in loader:
        result = task.step(task.model, batch, device, None)
        meter.add(result)
        infos = result.info if isinstance(result.info, (list, tuple)) else [result.info]
        for info in infos:
            if hasattr(info, "nstep"):
                nstep += info.nstep.double().sum()
                samples += info.nstep.numel()
    meter.flush()  # one host sync
    metrics = meter.means(task.finalize)
    return {
        "solver_max_iter": cfg.solver_max_iter,
        "solver_tol": cfg.solver_tol,
        **{k: v for k, v in metrics.items() if k != "nstep"},
        "f_evals": float(nstep) / max(samples, 1),
        "seconds": time.perf_counter() - start,
    }


def run_grid(run_dir: Path, opts: EvalOptions) -> dict[str, Any]:
    """Evaluate every budget of the grid; returns the document written to ``evaluate.json``."""
    cfg, task, device = load_run(run_dir, opts)
    if opts.bn_recalibrate:
        require_batchnorm(task.model, opts.bn_recalibrate, f"the model of {run_dir}")
        # the batches of the run's last evaluation, had it trained with this key
        recalibrate_task(task, device, cfg.batch_size, opts.bn_recalibrate, draw_seed(cfg.seed, cfg.epochs - 1))
        task.model.eval()
    max_iters = opts.solver_max_iter or tuple(sorted({*DEFAULT_MAX_ITERS, cfg.solver_max_iter}))
    tols = opts.solver_tol or (cfg.solver_tol,)
    rows = []
    for tol in tols:
        for max_iter in max_iters:
            budget = dataclasses.replace(cfg, solver_max_iter=max_iter, solver_tol=tol)
            rows.append(evaluate_budget(task, budget, device, opts.split, opts.batch_size))
            log.debug("solver_max_iter=%d solver_tol=%g: %s", max_iter, tol, rows[-1])
    trained = {"solver_max_iter": cfg.solver_max_iter, "solver_tol": cfg.solver_tol}
    return {
        "run_dir": str(run_dir),
        "split": opts.split,
        "solver": cfg.solver,
        "solver_stop": cfg.solver_stop,
        "trained_with": trained,
        "bn_recalibrate": opts.bn_recalibrate,
        "device": str(device),
        "rows": rows,
        "cheapest_at_reference": cheapest(rows, trained),
    }


def cheapest(rows: list[dict[str, Any]], trained: dict[str, Any]) -> dict[str, Any] | None:
    """The budget with the fewest mean F evaluations whose accuracy is at least the reference's: the
    row of the budget the run was trained with where the grid has it, else the row with the most F
    evaluations. ``saving`` is the reference's F evaluations over its. None without an accuracy."""
    if not rows or "accuracy" not in rows[0]:
        return None
    same = [r for r in rows if all(r[k] == v for k, v in trained.items())]
    ref = same[0] if same else max(rows, key=lambda r: r["f_evals"])
    best = min((r for r in rows if r["accuracy"] >= ref["accuracy"]), key=lambda r: r["f_evals"])
    return {
        "reference": {k: ref[k] for k in ("solver_max_iter", "solver_tol", "f_evals", "accuracy")},
        "cheapest": {k: best[k] for k in ("solver_max_iter", "solver_tol", "f_evals", "accuracy")},
        "saving": ref["f_evals"] / best["f_evals"],
    }


def _cheapest_line(doc: dict[str, Any]) -> str:
    c = doc.get("cheapest_at_reference")
    if not c:
        return ""
    ref, best = c["reference"], c["cheapest"]
    return (
        f"At least the reference accuracy {ref['accuracy']:.4f} (solver_max_iter={ref['solver_max_iter']}, "
        f"solver_tol={ref['solver_tol']:g}: {ref['f_evals']:.3g} F evaluations per sample) with "
        f"{best['f_evals']:.3g} (solver_max_iter={best['solver_max_iter']}, solver_tol={best['solver_tol']:g}): "
        f"{c['saving']:.2f}x fewer."
    )


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    first = ["solver_max_iter", "solver_tol", "f_evals"]
    return first + [k for k in rows[0] if k not in first and k != "seconds"] + ["seconds"]


def table(doc: dict[str, Any]) -> str:
    """The rows as a Markdown table."""
    cols = _columns(doc["rows"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in doc["rows"]:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "n/a"
    return str(v)


def plot(doc: dict[str, Any], path: Path) -> None:
    """The first metric of the task (accuracy for classification) against mean F evaluations per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if "accuracy" in doc["rows"][0] else "loss"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for tol in sorted({r["solver_tol"] for r in doc["rows"]}):
        pts = sorted((r["f_evals"], r[metric]) for r in doc["rows"] if r["solver_tol"] == tol)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"tol {tol:g}")
    ax.set(xlabel="mean F evaluations per sample", ylabel=f"{doc['split']} {metric}", title="accuracy vs compute")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(doc: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_FILE).write_text(json.dumps(doc, indent=2))
    md = [
        f"# Anytime evaluation of `{doc['run_dir']}`",
        "",
        f"Split `{doc['split']}`, solver {doc['solver']} (stop {doc['solver_stop']}); trained with "
        f"solver_max_iter={doc['trained_with']['solver_max_iter']}, solver_tol={doc['trained_with']['solver_tol']:g}. "
        "`f_evals`: mean evaluations of F per sample; `converged`: fraction of samples that met the tolerance; "
        "`residual`: their mean final relative residual.",
        "",
        table(doc),
        "",
        _cheapest_line(doc),
        "",
        f"![accuracy vs compute]({PLOT_FILE})",
        "",
    ]
    (out_dir / MD_FILE).write_text("\n".join(md))
    plot(doc, out_dir / PLOT_FILE)


# ----------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1] if __doc__ else None
    parser.add_argument("run_dir", type=Path, help="a training run's out_dir (config.yaml and checkpoint.pt)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="solver_max_iter=2,4,8 solver_tol=1e-3,1e-5 solver= solver_stop= split= batch_size= device= threads= "
        "out_dir=",
    )


def run(args: argparse.Namespace) -> int:
    opts = EvalOptions.parse(list(args.overrides))
    doc = run_grid(Path(args.run_dir), opts)
    out_dir = Path(opts.out_dir) if opts.out_dir else Path(args.run_dir) / "evaluate"
    write(doc, out_dir)
    print(table(doc))
    if doc["cheapest_at_reference"]:
        print(_cheapest_line(doc))
    print(f"wrote {out_dir / MD_FILE}, {out_dir / JSON_FILE} and {out_dir / PLOT_FILE}")
    return 0


__all__ = ["EvalOptions", "run_grid", "evaluate_budget", "cheapest", "table", "write"]
