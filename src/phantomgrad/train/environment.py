"""The environment of a run (environment.json): enough to tell whether two runs are comparable."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ENV_FILE = "environment.json"


def environment(device: torch.device | None = None, processes: int = 1, seed: int | None = None) -> dict[str, Any]:
    """Versions and machine; with ``device``, also the device, the number of processes and the seeds."""
    import numpy

    import phantomgrad

    env: dict[str, Any] = {
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "phantomgrad": phantomgrad.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if _git("rev-parse", "HEAD") else None,
    }
    if device is not None:
        env["device"] = str(device)
        env["device_name"] = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        )
        env["processes"] = processes
        env["seeds"] = {
            "seed": seed,
            "torch_initial_seed": torch.initial_seed(),
            "data_subsets": "fixed permutation seeded by the dataset size (same for every run)",
            "batch_order": "DistributedSampler(seed=seed), set_epoch(epoch)",
        }
    return env


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


__all__ = ["environment", "ENV_FILE"]
