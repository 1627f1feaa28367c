"""Where per-epoch metrics go: a CSV file, and TensorBoard when it is installed and asked for."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .runfiles import append_csv, read_csv, write_csv

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one row per epoch to ``metrics.csv`` (columns fixed by the first row)."""

    def __init__(self, out_dir: Path, tensorboard: bool = False, resume: bool = False):
        self.path = out_dir / "metrics.csv"
        if not resume and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                log.warning(
                    "tensorboard=true but the tensorboard package is missing: pip install 'phantomgrad[tensorboard]'"
                )

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row``; when it brings new columns (e.g. test metrics on an evaluation
        epoch), the file is rewritten with the union of columns, earlier rows left blank there."""
        rows = read_csv(self.path)
        columns = list(rows[0]) if rows else []
        new = [k for k in row if k not in columns]
        if rows and not new:
            append_csv(self.path, [row], columns)
        else:
            write_csv(self.path, rows + [row], columns + new)
        if self.tb is not None:
            step = row.get("epoch", 0)
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop rows of epochs after the checkpoint's, so no epoch is counted twice."""
        rows = read_csv(self.path)
        keep = [r for r in rows if int(r["epoch"]) <= epoch]
        if len(keep) != len(rows):
            write_csv(self.path, keep, list(rows[0]))
