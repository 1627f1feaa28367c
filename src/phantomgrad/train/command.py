"""``phantomgrad train [--config FILE] [--resume] [--json PATH] [key=value ...]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=3 backward=implicit")
    parser.add_argument("--config", type=Path, default=None, help="YAML or TOML config file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last checkpoint")
    parser.add_argument("--json", type=Path, default=None, help="write the end-of-run summary here too")


def format_summary(summary: dict) -> str:
    rows = [
        ("test accuracy (final epoch)", f"{summary['test_accuracy']:.4f}" if summary["test_accuracy"] is not None else "n/a"),
        ("seconds per epoch (median)", f"{summary['seconds_per_epoch']:.1f}"),
        ("training time", f"{summary['train_seconds']:.1f} s"),
        ("mean forward solver steps", f"{summary['mean_forward_steps']:.1f}"),
        ("share of step time in backward", f"{summary['backward_share']:.0%}"),
        ("run directory", summary["out_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from .trainer import train  # heavy imports only when training

    cfg = TrainConfig.from_sources(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    print(format_summary(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0
