"""The paper's Table 4 at CPU scale: IGNN trained with the exact gradient vs UPG.

Geng et al. (2021, Table 4) train implicit graph neural networks (IGNN; Gu, Chang, Zhu,
Sojoudi, El Ghaoui 2020) on COX2, PROTEINS and PPI with implicit differentiation and with
UPG A_{5,lambda}, lambda in {0.5, 0.8, 1.0}, and find the same accuracy for less time.
Here, on the data that installs offline:

* MUTAG (188 graphs, graph classification): 10-fold stratified cross-validation with a
  fixed fold seed; each fold's number is its FINAL epoch's test accuracy (nothing is
  selected on the test fold); mean +- std over folds.
* Chains (IGNN's synthetic node-classification task): the class sits on the first node of
  each chain and must travel chain_len - 1 hops; several seeds (each a new graph and a new
  initialisation); final-epoch test accuracy, mean +- std over seeds.

Every run goes through :func:`phantomgrad.train.trainer.train` with the same config apart
from the backward mode; the runs of one fold or seed follow each other, so a busy machine
slows all methods alike. Time is the trainer's ``train_seconds`` (forward, backward and
optimiser steps, no evaluation), summed over folds, relative to Implicit.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class GraphTableConfig:
    """What ``phantomgrad graph-table`` runs; the defaults are the committed table's."""

    folds: int = 10  # MUTAG folds to run (the first ``folds`` of the 10)
    mutag_epochs: int = 100
    mutag_batch_size: int = 32
    mutag_hidden: int = 32
    chain_lens: tuple[int, ...] = (20, 40)  # one Chains column per length
    chains_seeds: int = 3
    chains_epochs: int = 200
    chains_hidden: int = 16
    chains_per_class: int = 20
    chains_split: tuple[int, int, int] = (20, 100, 200)
    k: int = 5
    dampings: tuple[float, ...] = (0.5, 0.8, 1.0)
    lr: float = 0.01
    kappa: float = 0.9
    solver_max_iter: int = 300  # IGNN's fixed-point iteration, forward and (Implicit) backward
    solver_tol: float = 3e-6
    threads: int = 1
    out: str = "runs/graph_table"

    @classmethod
    def tiny(cls, out: str) -> "GraphTableConfig":
        """Seconds, for the tests: 2 folds and 1 epoch of MUTAG, 1 seed of short chains."""
        return cls(
            folds=2,
            mutag_epochs=1,
            mutag_hidden=8,
            chain_lens=(4,),
            chains_seeds=1,
            chains_epochs=2,
            chains_hidden=8,
            chains_per_class=3,
            chains_split=(4, 4, 8),
            solver_max_iter=30,
            out=out,
        )

    def methods(self) -> list[tuple[str, dict[str, Any]]]:
        rows: list[tuple[str, dict[str, Any]]] = [("Implicit", {"backward": "implicit"})]
        rows += [
            (f"UPG A_{{{self.k},{lam}}}", {"backward": "upg", "k": self.k, "damping": lam}) for lam in self.dampings
        ]
        return rows


def _common(cfg: GraphTableConfig) -> dict[str, Any]:
    return {
        "task": "graph",
        "model": "ignn",
        "lr": cfg.lr,
        "schedule": "cosine",
        "optimizer": "adam",
        "solver": "fixed_point",
        "solver_max_iter": cfg.solver_max_iter,
        "solver_tol": cfg.solver_tol,
        "backward_solver": "fixed_point",
        "backward_max_iter": cfg.solver_max_iter,
        "backward_tol": cfg.solver_tol,
        "threads": cfg.threads,
        "progress": False,
    }


def mutag_config(cfg: GraphTableConfig, method: dict[str, Any], fold: int, out_dir: Path) -> dict[str, Any]:
    return {
        **_common(cfg),
        **method,
        "dataset": "mutag",
        "data_options": {"fold": fold, "n_folds": 10, "fold_seed": 0},
        "arch": {"hidden": cfg.mutag_hidden, "kappa": cfg.kappa},
        "epochs": cfg.mutag_epochs,
        "batch_size": cfg.mutag_batch_size,
        "eval_every": cfg.mutag_epochs,
        "seed": 0,
        "out_dir": str(out_dir),
    }


def chains_config(
    cfg: GraphTableConfig, method: dict[str, Any], chain_len: int, seed: int, out_dir: Path
) -> dict[str, Any]:
    options = {
        "chain_len": chain_len,
        "chains_per_class": cfg.chains_per_class,
        "split": list(cfg.chains_split),
        "seed": seed,
    }
    return {
        **_common(cfg),
        **method,
        "dataset": "chains",
        "data_options": options,
        "weight_decay": 5e-4,
        "arch": {"hidden": cfg.chains_hidden, "kappa": cfg.kappa},
        "epochs": cfg.chains_epochs,
        "eval_every": cfg.chains_epochs,
        "seed": seed,
        "out_dir": str(out_dir),
    }


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("{", "").replace("}", "").replace(",", "_")


def run_table(cfg: GraphTableConfig, report=None) -> dict[str, Any]:
    """Train every (dataset, method, fold/seed); return the per-run summaries and the aggregates."""
    from phantomgrad.train.config import TrainConfig
    from phantomgrad.train.trainer import train

    start = time.perf_counter()
    out = Path(cfg.out)
    methods = cfg.methods()
    earlier = sorted(out.glob("*/*/*/checkpoint.pt"))
    if earlier:
        raise ValueError(
            f"--out {out} already holds runs of an earlier table (e.g. {earlier[0].parent}); "
            "pass a new --out or delete that directory"
        )
    runs: list[dict[str, Any]] = []
    plan = [("mutag", i) for i in range(cfg.folds)]
    plan += [(f"chains{length}", s) for length in cfg.chain_lens for s in range(cfg.chains_seeds)]
    for dataset, index in plan:
        for name, method in methods:
            run_dir = out / dataset / _slug(name) / str(index)
            if dataset == "mutag":
                values = mutag_config(cfg, method, index, run_dir)
            else:
                values = chains_config(cfg, method, int(dataset.removeprefix("chains")), index, run_dir)
            summary = train(TrainConfig.from_dict(values))
            row = {
                "dataset": dataset,
                "method": name,
                "index": index,
                "test_accuracy": summary["test_accuracy"],
                "train_accuracy": summary["final_metrics"].get("train_accuracy"),
                "train_seconds": summary["train_seconds"],
                "mean_forward_steps": summary["mean_forward_steps"],
                "backward_share": summary["backward_share"],
            }
            runs.append(row)
            log.info(
                "%s %s #%d: test accuracy %.4f, %.1f s",
                dataset,
                name,
                index,
                row["test_accuracy"],
                row["train_seconds"],
            )
            if report is not None:
                report(row)
    result = {
        "config": asdict(cfg),
        "runs": runs,
        "aggregate": aggregate(runs, [m for m, _ in methods]),
        "seconds": time.perf_counter() - start,
    }
    return result


def aggregate(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """dataset -> method -> accuracy mean/std (over folds or seeds), total seconds, time relative to Implicit."""
    agg: dict[str, dict[str, dict[str, float]]] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        agg[dataset] = {}
        for method in methods:
            rows = [r for r in runs if r["dataset"] == dataset and r["method"] == method]
            if not rows:
                continue
            acc = [r["test_accuracy"] for r in rows]
            agg[dataset][method] = {
                "n": len(rows),
                "accuracy_mean": statistics.mean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "train_accuracy_mean": statistics.mean(r["train_accuracy"] for r in rows),
                "seconds": sum(r["train_seconds"] for r in rows),
                "forward_steps": statistics.mean(r["mean_forward_steps"] for r in rows),
                "backward_share": statistics.mean(r["backward_share"] for r in rows),
            }
        base = agg[dataset].get("Implicit", {}).get("seconds")
        for stats in agg[dataset].values():
            stats["time_vs_implicit"] = stats["seconds"] / base if base else float("nan")
    return agg


def format_table(result: dict[str, Any]) -> str:
    cfg, agg = result["config"], result["aggregate"]
    datasets = list(agg)
    titles = {
        d: f"MUTAG ({cfg['folds']} folds)"
        if d == "mutag"
        else f"Chains, length {d.removeprefix('chains')} ({cfg['chains_seeds']} seeds)"
        for d in datasets
    }
    header = "| gradient | " + " | ".join(f"{titles[d]} accuracy (%) | time" for d in datasets) + " |"
    lines = [header, "|---|" + "---|---|" * len(datasets)]
    methods = list(dict.fromkeys(m for d in datasets for m in agg[d]))
    for method in methods:
        cells = []
        for d in datasets:
            s = agg[d].get(method)
            if s is None:
                cells += ["", ""]
                continue
            cells.append(f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}")
            cells.append(f"{s['time_vs_implicit']:.2f}x ({s['seconds']:.0f} s)")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = GraphTableConfig()
    parser.add_argument("--folds", type=int, default=d.folds, help="MUTAG folds to run, 1-10 (default %(default)s)")
    parser.add_argument(
        "--mutag-epochs", type=int, default=d.mutag_epochs, help="epochs per MUTAG fold (default %(default)s)"
    )
    parser.add_argument(
        "--chain-lens",
        type=int,
        nargs="+",
        default=list(d.chain_lens),
        help="nodes per chain, one Chains column each (default %(default)s)",
    )
    parser.add_argument(
        "--chains-seeds", type=int, default=d.chains_seeds, help="Chains graphs/initialisations (default %(default)s)"
    )
    parser.add_argument(
        "--chains-epochs",
        type=int,
        default=d.chains_epochs,
        help="epochs (= full-graph steps) on Chains (default %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(d.out), help="directory for the runs (default %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, help="write every run and the aggregates here")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (2 folds, 1 epoch); not a result")


def run(args: argparse.Namespace) -> int:
    if args.tiny:
        cfg = GraphTableConfig.tiny(str(args.out))
    else:
        if not 1 <= args.folds <= 10:
            raise ValueError(f"--folds must be in 1..10, got {args.folds}")
        for key in ("mutag_epochs", "chains_seeds", "chains_epochs", "threads"):
            if getattr(args, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
        if min(args.chain_lens) < 2:
            raise ValueError(f"--chain-lens must be >= 2 nodes each, got {args.chain_lens}")
        cfg = GraphTableConfig(
            folds=args.folds,
            mutag_epochs=args.mutag_epochs,
            chain_lens=tuple(args.chain_lens),
            chains_seeds=args.chains_seeds,
            chains_epochs=args.chains_epochs,
            threads=args.threads,
            out=str(args.out),
        )

    def report(row: dict[str, Any]) -> None:
        print(
            f"{row['dataset']:>8} #{row['index']} {row['method']:<14} test accuracy {row['test_accuracy']:.4f}"
            f"  train {row['train_seconds']:.1f} s",
            flush=True,
        )

    result = run_table(cfg, report=report)
    table = format_table(result)
    print(table)
    print(f"whole table: {result['seconds']:.0f} s wall")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
        print(f"wrote {args.markdown}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0
