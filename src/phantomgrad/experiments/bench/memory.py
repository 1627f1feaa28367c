"""Peak memory of one training step.

CUDA: in-process, ``torch.cuda.max_memory_allocated`` over the step minus what was allocated
before it. CPU: a fresh Python process (``python -m phantomgrad.experiments.bench
--memory-worker SPEC``) builds the same problem, resets the kernel's resident-set high-water mark (VmHWM),
runs one step and reports the new high-water mark minus the RSS before the step
(``step_mib``) and the high-water mark itself (``peak_rss_mib``).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import subprocess
import sys
from dataclasses import asdict

import torch

from .config import BenchConfig
from .modes import Variant
from .problem import build_problem
from .runner import Runner

log = logging.getLogger(__name__)


def measure_memory(cfg: BenchConfig, v: Variant, runner: Runner | None = None) -> dict[str, float]:
    """Peak memory of a training step under variant v, in MiB (see the module docstring)."""
    if cfg.device.startswith("cuda"):
        assert runner is not None
        runner.step(v)
        runner.restore()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner.step(v)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        runner.restore()
        return {"step_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20}
    spec = json.dumps({"config": asdict(cfg), "variant": asdict(v)})
    proc = subprocess.run(
        [sys.executable, "-m", "phantomgrad.experiments.bench", "--memory-worker", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        log.warning("memory worker for %s failed: %s", v.label, proc.stderr.strip()[-2000:])
        return {"step_mib": math.nan, "peak_rss_mib": math.nan}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _rss_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def worker(spec_json: str) -> int:
    """The subprocess: one step of the variant in ``spec_json``; prints its memory as JSON."""
    spec = json.loads(spec_json)
    cfg = BenchConfig(**spec["config"])
    v = Variant(**spec["variant"])
    torch.set_num_threads(cfg.threads)
    runner = Runner(cfg, build_problem(cfg))
    if v.lib == "torchdeq":
        runner.torchdeq(v)  # import and build outside the measured window
    if v.compiled or v.fused:
        runner.step(v)  # compile outside the measured window
        runner.restore()
    _rss_reset()
    before = _rss_kib("VmRSS")
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.step(v)
    hwm = _rss_kib("VmHWM")
    if hwm is None or before is None:  # no /proc: fall back to ru_maxrss (not resettable)
        hwm, before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base_max
    print(json.dumps({"step_mib": max(0, hwm - before) / 1024, "peak_rss_mib": hwm / 1024}))
    return 0


__all__ = ["measure_memory", "worker"]
