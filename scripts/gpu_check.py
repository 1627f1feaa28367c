"""A short GPU check (a few minutes on one H100/H200): correctness of every backward mode on
CUDA against float64 CPU, bf16 on CUDA, MDEQ-Tiny step times per mode, and a short training
run with device=cuda. Writes gpu_check.json (and prints it) into the directory in argv[1].

    python scripts/gpu_check.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import phantomgrad as pg
from phantomgrad.models import MDEQ, MDEQConfig, TanhMap


def Layer() -> TanhMap:  # noqa: N802
    """F(z, x) = tanh(W z + U x) with ||W||_2 = 0.7, the same weights on every call (seed 0)."""
    return TanhMap(64, 32, 0.7, bias=False, generator=torch.Generator().manual_seed(0))


MODES = {
    "implicit": lambda: pg.Implicit(pg.Broyden(max_iter=100, tol=1e-10)),
    "upg": lambda: pg.UPG(5, 0.5),
    "npg": lambda: pg.NPG(5, 0.5),
    "jfb": pg.JFB,
    "backprop": pg.Backprop,
}


def grads(device, dtype, mode):
    layer = Layer().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = torch.randn(16, 64, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    deq = pg.DEQ(
        layer, solver=pg.Anderson(max_iter=100, tol=1e-10 if dtype == torch.float64 else 1e-6), backward=MODES[mode]()
    )
    z, info = deq(x, torch.zeros(16, 64, device=device, dtype=dtype))
    (z * w).sum().backward()
    return torch.cat([p.grad.flatten() for p in layer.parameters()]).double().cpu(), info


def correctness():
    out = {}
    for mode in MODES:
        ref, _ = grads("cpu", torch.float64, mode)
        g64, _ = grads("cuda", torch.float64, mode)
        g32, info = grads("cuda", torch.float32, mode)
        out[mode] = {
            "max_abs_diff_cuda64_vs_cpu64": float((g64 - ref).abs().max()),
            "cosine_cuda32_vs_cpu64": float(torch.nn.functional.cosine_similarity(g32, ref, dim=0)),
            "cuda32_converged": bool(info.converged.all()),
        }
    return out


def time_modes(batch=32, repeats=10):
    torch.manual_seed(0)
    cfg = MDEQConfig.named("mdeq-tiny", in_channels=3, image_size=32, num_classes=10)
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    modes = {
        "implicit-broyden30": pg.Implicit(pg.Broyden(max_iter=30, tol=1e-30)),
        "upg-5-0.5": pg.UPG(5, 0.5),
        "npg-5-0.5": pg.NPG(5, 0.5),
        "jfb": pg.JFB(),
    }
    results = {}
    for name, mode in modes.items():
        model = MDEQ(cfg, solver=pg.Anderson(max_iter=30, tol=1e-30), backward=mode).cuda()
        for precision in ("fp32", "bf16"):
            times, fwd = [], []
            for i in range(repeats + 3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits, _ = model(x)
                    loss = nn.functional.cross_entropy(logits, y)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                loss.backward()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                if i >= 3:
                    times.append(t2 - t0)
                    fwd.append(t1 - t0)
            results[f"{name}/{precision}"] = {
                "step_ms": 1e3 * statistics.median(times),
                "forward_ms": 1e3 * statistics.median(fwd),
            }
    base = results["implicit-broyden30/fp32"]["step_ms"]
    for r in results.values():
        r["speedup_vs_implicit_fp32"] = base / r["step_ms"]
    return results


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["correctness"] = correctness()
    report["mdeq_tiny_batch32"] = time_modes()
    t0 = time.perf_counter()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "phantomgrad",
            "train",
            "device=cuda",
            "epochs=3",
            "progress=false",
            f"out_dir={out / 'digits-cuda'}",
            "--json",
            str(out / "train_summary.json"),
        ],
        capture_output=True,
        text=True,
    )
    report["train_digits_cuda"] = {
        "returncode": run.returncode,
        "wall_s": time.perf_counter() - t0,
        "stdout": run.stdout[-1500:],
        "stderr": run.stderr[-1500:],
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
