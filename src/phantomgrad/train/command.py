"""``phantomgrad train [--config FILE] [--resume [auto]] [--json PATH] [key=value ...]``.

Before anything is written the command checks what it will write (the run directory and the
``--json`` file): a path that is a file, a directory that cannot be written, a resume without a
run to resume end here with one line and exit code 2, and nothing is created.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from phantomgrad.cli import EXIT_CODES_HELP

from . import registry
from .config import ConfigError, TrainConfig, describe_keys

DEFAULT_RUNS_DIR = Path("runs")  # the trainer's default out_dir is runs/<dataset>-<backward>-<date-time>


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=3 backward=implicit"
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML or TOML config file (see configs/)")
    parser.add_argument(
        "--resume",
        nargs="?",
        action=_ResumeAction,
        default=None,
        metavar="auto",
        help="continue the run in out_dir from its last checkpoint; --resume auto: continue it when out_dir holds "
        "one, else start it (the default under torchrun, so that restarted workers resume)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the end-of-run summary here too")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        f"config keys (key=value overrides, or keys of the --config file):\n{describe_keys()}\n\n{EXIT_CODES_HELP}"
    )


class _ResumeAction(argparse.Action):
    """``--resume`` (True) or ``--resume auto``; ``--resume epochs=3`` is --resume then an override."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: object, opt: object = None
    ) -> None:
        namespace.resume = True if value is None else value
        if isinstance(value, str) and value != "auto":
            if "=" not in value:
                parser.error(f"--resume takes no value or 'auto', got {value!r}")
            namespace.resume = True
            if isinstance(getattr(namespace, "overrides", None), list):
                namespace.overrides.append(value)  # in its place among the overrides (later ones win)
            else:
                namespace.resume_overrides = [value]


# ---- pre-flight: every path the run will write, checked before it starts ----------------------


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def check_writable_dir(path: Path, what: str) -> None:
    """Raise ConfigError unless ``path`` is, or can be created as, a directory this process may
    write in. Nothing is left behind (a probe file is made and removed in the nearest existing
    directory, which is truer than permission bits: root, ACLs, read-only mounts)."""
    existing = _nearest_existing(path)
    if existing == path and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory; choose another {what} (nothing was written)")
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {existing} is a file; choose another {what}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(
            f"{what} {path} is not writable ({existing}: {reason}); choose a directory you can write "
            "to, or fix its permissions"
        ) from None


def preflight(cfg: TrainConfig, resume: bool | str | None, json_path: Path | None) -> None:
    """The checks of the paths the run writes: out_dir (or the default runs/), --json, --resume."""
    if resume is True and cfg.out_dir is None:
        raise ConfigError("--resume needs out_dir=... naming the run to continue")
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir is not None else DEFAULT_RUNS_DIR
    check_writable_dir(out_dir, "out_dir")
    if resume is True and not any((out_dir / n).is_file() for n in ("checkpoint.pt", "checkpoint.prev.pt")):
        raise ConfigError(
            f"--resume: no checkpoint.pt in {out_dir}; train without --resume first, "
            "or point out_dir at the run to resume"
        )
    if json_path is not None:
        if json_path.is_dir():
            raise ConfigError(f"--json {json_path} is a directory; name a file for the summary")
        check_writable_dir(json_path.parent, "--json folder")


# ---- the summary --------------------------------------------------------------------------

HEADLINES = {  # metric -> (label, format)
    "accuracy": ("test accuracy (final epoch)", "{:.4f}"),
    "ppl": ("test perplexity (final epoch)", "{:.2f}"),
    "bpc": ("test bits per character (final epoch)", "{:.3f}"),
}


def headline_rows(summary: dict, task: str, dataset: str) -> list[tuple[str, str]]:
    """The task's headline metrics (accuracy; perplexity and bits per character for language
    models) from the final epoch's test metrics."""
    final = summary.get("final_metrics") or {}
    rows = []
    for metric in registry.TASKS[task].headline:
        label, fmt = HEADLINES.get(metric, (f"test {metric} (final epoch)", "{:.4g}"))
        if metric == "bpc" and dataset == "wikitext103":
            label = "test bits per word (final epoch)"
        value = final.get(f"test_{metric}", summary.get(f"test_{metric}"))
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        shown = fmt.format(value) if finite else f"{value} (not finite)"
        rows.append((label, shown if value is not None else "missing: no test evaluation ran"))
    return rows


def format_summary(summary: dict, task: str = "image", dataset: str = "") -> str:
    rows = headline_rows(summary, task, dataset) + [
        ("seconds per epoch (median)", f"{summary['seconds_per_epoch']:.1f}"),
        ("training time", f"{summary['train_seconds']:.1f} s"),
        ("mean forward solver steps", f"{summary['mean_forward_steps']:.1f}"),
        ("share of step time in backward", f"{summary['backward_share']:.0%}"),
    ]
    skipped = (summary.get("final_metrics") or {}).get("train_unreadable_files")
    if skipped:
        rows.append(("unreadable files skipped", f"{int(skipped)} (named in the log)"))
    rows.append(("run directory", summary["out_dir"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_sources(args.config, getattr(args, "resume_overrides", []) + args.overrides)
    preflight(cfg, args.resume if args.resume is not None else cfg.resume, args.json)

    from .distributed import is_main_process
    from .trainer import train  # heavy imports only when training

    summary = train(cfg, resume=args.resume)
    if not is_main_process():  # under torchrun only rank 0 prints and writes the summary
        return 0
    print(format_summary(summary, cfg.task, cfg.dataset))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0
