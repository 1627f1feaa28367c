"""The ``phantomgrad`` command: parses arguments and dispatches, nothing else.

Each sub-command lives in a module exposing ``add_arguments(parser)`` and
``run(args) -> int``; the table below is the only place that lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "train": ("phantomgrad.train.command", "train an implicit model (default: MDEQ on digits with UPG A_{5,0.5})"),
    "ablate": ("phantomgrad.experiments.ablate", "the paper's Table 1 and Fig. 3 at CPU scale on Fashion-MNIST"),
    "cosine": ("phantomgrad.experiments.cosine", "the paper's Fig. 1: cosine of UPG/NPG to the exact gradient vs k"),
    "bench": ("phantomgrad.experiments.bench", "time and memory of every backward mode (the paper's Table 2), optionally against TorchDEQ"),
    "report": ("phantomgrad.train.report", "render a run's report (JSON + Markdown with plots) from its directory"),
    "adaptive-compare": ("phantomgrad.experiments.adaptive_compare", "AdaptivePhantom vs fixed UPG (Table 1 rows) and SGD gradient rescaling on Fashion-MNIST"),
    "graph-table": ("phantomgrad.experiments.graph_table", "the paper's Table 4 at CPU scale: IGNN, implicit vs UPG"),
    "lm-table": ("phantomgrad.experiments.lm_table", "the paper's Table 3 at CPU scale: DEQ transformer, implicit vs UPG"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported for its arguments, so one command's
    heavy or broken imports never slow down or break another (``phantomgrad --help`` imports none)."""
    parser = argparse.ArgumentParser(prog="phantomgrad", description="Train implicit models fast with phantom gradients.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"phantomgrad {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
