"""Where per-epoch metrics go: a CSV file, and TensorBoard when it is installed and asked for."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

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
                log.warning("tensorboard=true but the tensorboard package is missing: pip install 'phantomgrad[tensorboard]'")

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.tb is not None:
            step = row.get("epoch", 0)
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop rows of epochs after the checkpoint's, so no epoch is counted twice."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if int(r["epoch"]) <= epoch]
        if len(keep) != len(rows):
            with self.path.open("w", newline="") as fh:
                if keep:
                    writer = csv.DictWriter(fh, fieldnames=list(keep[0]))
                    writer.writeheader()
                    writer.writerows(keep)
