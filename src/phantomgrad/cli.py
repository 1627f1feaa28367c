"""The ``phantomgrad`` command: parses arguments and dispatches, nothing else.

Each sub-command lives in a module exposing ``add_arguments(parser)`` and
``run(args) -> int``; the table below is the only place that lists them.

Exit codes (the error contract of every command):

* 0: done;
* 1: a bug in phantomgrad: the traceback is shown, with a line saying where to report it;
* 2: bad input or environment (config, data, files, checkpoints): one line naming the problem and the fix;
* 3: training diverged (one line);
* 75: another process of a torchrun job failed (a lost peer, a collective timeout, a failed rendezvous;
  one line naming the rank and the intact checkpoint; the same command resumes; 75 is EX_TEMPFAIL);
* 130 / 143: interrupted by SIGINT / SIGTERM (one line).

An exception that carries an integer ``exit_code`` attribute ends the command with that code and
its message on one line; so do :class:`ValueError` (ConfigError, CheckpointError ...),
:class:`OSError` and :class:`ImportError` (a missing optional package), with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PEER_FAILED = 75  # phantomgrad.train.errors.PeerFailure; EX_TEMPFAIL of sysexits.h: running it again continues
EXIT_INTERRUPTED = 130  # 128 + SIGINT; 143 = 128 + SIGTERM
EXIT_CODES_HELP = (
    "exit codes: 0 done; 1 a bug in phantomgrad (traceback shown, please report it); 2 bad input or "
    "environment (config, data, files, checkpoints; one line, nothing written); 3 training diverged; "
    "75 a peer process of a torchrun job failed (the same command resumes); 130/143 interrupted by SIGINT/SIGTERM"
)

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "train": ("phantomgrad.train.command", "train an implicit model (default: MDEQ on digits with UPG A_{5,0.5})"),
    "ablate": ("phantomgrad.experiments.ablate", "the paper's Table 1 and Fig. 3 at CPU scale on Fashion-MNIST"),
    "cosine": (
        "phantomgrad.experiments.cosine",
        "the paper's Fig. 1: cosine of UPG/NPG to the exact gradient vs k, on a synthetic layer (seconds)",
    ),
    "methods": (
        "phantomgrad.experiments.methods",
        "every gradient method side by side: cosine to the exact gradient, F evaluations, saved memory",
    ),
    "bench": (
        "phantomgrad.experiments.bench",
        "time and memory of every backward mode (the paper's Table 2), optionally against TorchDEQ",
    ),
    "report": ("phantomgrad.train.report", "render a run's report (JSON + Markdown with plots) from its directory"),
    "evaluate": ("phantomgrad.experiments.evaluate", "a run's test accuracy at several solver budgets (vs F evals)"),
    "adaptive-compare": (
        "phantomgrad.experiments.adaptive_compare",
        "AdaptivePhantom vs fixed UPG (Table 1 rows) and SGD gradient rescaling on Fashion-MNIST",
    ),
    "graph-table": ("phantomgrad.experiments.graph_table", "the paper's Table 4 at CPU scale: IGNN, implicit vs UPG"),
    "lm-table": (
        "phantomgrad.experiments.lm_table",
        "the paper's Table 3 at CPU scale: DEQ transformer, implicit vs UPG",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported for its arguments, so one command's
    heavy or broken imports never slow down or break another (``phantomgrad --help`` imports none)."""
    parser = argparse.ArgumentParser(
        prog="phantomgrad", epilog=EXIT_CODES_HELP, description="Train implicit models fast with phantom gradients."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("phantomgrad")
    except PackageNotFoundError:
        from phantomgrad import __version__

        return __version__


def bug_tracker() -> str:
    """Where to report a bug: the ``Issues`` (or ``Bug Tracker``) project URL of the installed
    distribution's metadata, else a description."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("phantomgrad").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("issues", "bug tracker", "bugs"):
            return url.strip()
    return "the phantomgrad issue tracker"


def exit_code(err: BaseException) -> int | None:
    """The exit code of an error the user can cause or fix, or None for a bug of ours.

    Duck-typed: any exception with an integer ``exit_code`` attribute names its own code."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    trainer = sys.modules.get("phantomgrad.train.trainer")  # loaded if training ran; imported lazily
    diverged = getattr(trainer, "DivergenceError", None)
    if diverged is not None and isinstance(err, diverged):
        return EXIT_DIVERGED
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, ImportError) and (err.name or "").startswith("phantomgrad"):
        return None  # our own module failed to import: a bug
    if isinstance(err, (ValueError, OSError, ImportError)):  # ImportError: a missing optional package
        return EXIT_BAD_INPUT
    return None


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text += f" ({err.filename})"
    return text


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(_is_override(e) for e in extra):
        args.overrides += extra  # key=value after an option (train --resume epochs=3): argparse leaves them over
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        code = exit_code(err)
        if code is None:
            traceback.print_exc()
            print(
                f"phantomgrad {args.command}: internal error: this is a bug in phantomgrad {version()}, "
                f"not in your input; please report it, with the command and the traceback above, at {bug_tracker()}",
                file=sys.stderr,
            )
            return 1
        print(f"phantomgrad {args.command}: error: {one_line(err)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
