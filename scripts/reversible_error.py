"""How far pg.Reversible's gradient (rebuilt states) is from backprop through the stored iteration.

    PYTHONPATH=src python scripts/reversible_error.py [--seeds 5]

On the tests' layer F(z, x) = tanh(W z + U x + b) (tests/conftest.py: dim 6, ||W||_2 = 0.6), batch 3,
for each beta and number of coupled steps: the largest relative error over the seeds of the
parameter and input gradients, in float64 and in float32, against autograd through the same
coupled iteration stored in full in float64.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import phantomgrad as pg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import TanhLayer  # noqa: E402


def coupled(f, x, z0, beta, steps):
    y = z = z0
    for _ in range(steps):
        y = (1 - beta) * y + beta * f(z, x)
        z = (1 - beta) * z + beta * f(y, x)
    return y


def error(beta, steps, seed, dtype):
    torch.manual_seed(seed)
    layer = TanhLayer()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64)
    z0 = torch.zeros(3, 6, dtype=torch.float64)
    ref = coupled(layer, x, z0, beta, steps)
    want = torch.autograd.grad((ref * w).sum(), [*layer.parameters(), x])
    layer_d = TanhLayer(dtype=dtype)
    layer_d.load_state_dict({k: v.to(dtype) for k, v in layer.state_dict().items()})
    x_d = x.detach().to(dtype).requires_grad_()
    deq = pg.DEQ(layer_d, solver=pg.Reversible(beta=beta, max_iter=2 * steps, tol=1e-30), backward=pg.Backprop())
    out, _ = deq(x_d, z0.to(dtype))
    got = torch.autograd.grad((out * w.to(dtype)).sum(), [*layer_d.parameters(), x_d])
    return max(float((g.double() - r).norm() / r.norm()) for g, r in zip(got, want))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    betas = (0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 1.05, 1.1, 1.2, 1.5)
    all_steps = (10, 20, 40)
    print("| beta | " + " | ".join(f"{s} steps f64 | {s} steps f32" for s in all_steps) + " |")
    print("|---|" + "---|---|" * len(all_steps))
    for beta in betas:
        cells = []
        for steps in all_steps:
            for dtype in (torch.float64, torch.float32):
                cells.append(f"{max(error(beta, steps, s, dtype) for s in range(args.seeds)):.0e}")
        print(f"| {beta} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
