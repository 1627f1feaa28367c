"""Reading and writing the small files of a run directory (CSV and JSON), in one place.

CSV files are rewritten through a temporary file and an atomic rename, so a reader (or a run
killed mid-write) never sees half a file; appends add rows and write the header only to a new file.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header ([] when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: Iterable[dict[str, Any]], fields: list[str]) -> None:
    """Replace ``path`` by a header and ``rows`` (missing columns blank, extra keys ignored)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def append_csv(path: Path, rows: Iterable[dict[str, Any]], fields: list[str]) -> None:
    """Append ``rows``; a new file gets the header first."""
    path = Path(path)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def json_default(value: Any) -> Any:
    """For ``json.dumps(default=...)``: tensors and NumPy values as numbers or lists, anything else as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def finite_or_none(obj: Any) -> Any:
    """NaN and Inf become None (null), so the JSON written is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


__all__ = ["read_csv", "write_csv", "append_csv", "read_json", "json_default", "finite_or_none"]
