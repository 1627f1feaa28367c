"""One Markdown page from several `phantomgrad bench --json` files: a summary of every mode's training
step against TorchDEQ's (where both ran), then each run's own tables.

    python scripts/bench_summary.py OUT.md RUN.json [RUN.json ...]      (missing files are noted, not fatal)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from phantomgrad.experiments.bench import format_tables, from_json


def _ms(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.1f}"


def summary_rows(name: str, data: dict) -> list[str]:
    """One line per phantomgrad row: its step, TorchDEQ's step, and the ratio (per round, median)."""
    cfg = data["config"]
    setting = f"{cfg['model']} b{cfg['batch']}"
    rows = data["rows"]
    out = []
    for r in rows:
        if r["lib"] != "phantomgrad":
            continue
        if r.get("na"):
            out.append(f"| {name} | {setting} | {r['label']} | n/a: {r['na']} | | |")
            continue
        main_row = not r.get("compiled") and r.get("check_every", "default") == cfg.get("check_every", "default")
        td = next((t for t in rows if t["lib"] == "torchdeq" and t["mode"] == r["mode"]), None) if main_row else None
        if td is None:
            td_cell = "-"
        elif td.get("na"):
            td_cell = f"n/a ({td['na']})"
        else:
            td_cell = _ms(td["step_ms"])
        ratio = r.get("torchdeq_over_phantomgrad_step")
        out.append(
            f"| {name} | {setting} | {r['label']} | {_ms(r['step_ms'])} | {td_cell} | "
            f"{f'{ratio:.2f}x' if ratio else '-'} |"
        )
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, files = Path(argv[0]), [Path(a) for a in argv[1:]]
    lines = [
        "# phantomgrad bench: summary",
        "",
        "| run | setting | mode | phantomgrad step ms | TorchDEQ step ms | TorchDEQ / phantomgrad |",
        "|---|---|---|---|---|---|",
    ]
    details = []
    for path in files:
        if not path.exists():
            lines.append(f"| {path.stem} | missing: the run failed or timed out | | | | |")
            continue
        data = json.loads(path.read_text())
        lines += summary_rows(path.stem, data)
        details += [
            "",
            f"## {path.stem}",
            "",
            f"machine: {data.get('machine', {})}",
            "",
            format_tables(from_json(data)),
        ]
    out.write_text("\n".join(lines + details) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
