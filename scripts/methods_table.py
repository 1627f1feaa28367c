"""Every gradient method on one synthetic layer: cosine to the exact gradient, F evaluations, saved bytes.

    PYTHONPATH=src python scripts/methods_table.py [--dim 64 --lipschitz 0.9 --seeds 5]

The layer is the tests' F(z, x) = tanh(W z + U x + b) (tests/conftest.py, ||W||_2 = lipschitz), in
float64, batch 8, loss <w, h>. "Exact" is the implicit gradient at a fixed point solved to 1e-12
with a backward solve to 1e-12. Counted per training step (forward + backward): evaluations of F
(calls of the layer), vector-Jacobian products through F (backward passes through an output of F),
and the bytes autograd saves for backward (torch.autograd.graph.saved_tensors_hooks). No timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import phantomgrad as pg
from phantomgrad.deq import DEQInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import TanhLayer  # noqa: E402

D = torch.float64


class Counted(torch.nn.Module):
    """Wraps F: counts its calls and the backward passes through its outputs."""

    def __init__(self, f):
        super().__init__()
        self.f, self.calls, self.vjps = f, 0, 0

    def forward(self, z, x):
        self.calls += 1
        out = self.f(z, x)
        if out.requires_grad:
            out.register_hook(self._count)
        return out

    def _count(self, grad):
        self.vjps += 1


def methods():
    fwd = dict(max_iter=40, tol=1e-6)
    return {
        "Implicit (Broyden backward, tol 1e-6)": (pg.Broyden(**fwd), pg.Implicit()),
        "UPG A_{5,0.5}": (pg.Broyden(**fwd), pg.UPG(5, 0.5)),
        "NPG A_{5,0.5}": (pg.Broyden(**fwd), pg.NPG(5, 0.5)),
        "JFB": (pg.Broyden(**fwd), pg.JFB()),
        "SHINE": (pg.Broyden(**fwd), pg.SHINE(fallback="none")),
        "SHINE, refine 5": (pg.Broyden(**fwd), pg.SHINE(refine=5, fallback="none")),
        "Backprop through Broyden": (pg.Broyden(**fwd), pg.Backprop()),
        "Reversible beta=0.5 + Backprop": (pg.Reversible(beta=0.5, **fwd), pg.Backprop()),
        "Reversible beta=0.8 + Backprop": (pg.Reversible(beta=0.8, **fwd), pg.Backprop()),
    }


def flat_grad(layer):
    return torch.cat([p.grad.reshape(-1) for p in layer.parameters()])


def run(layer, x, w, solver, mode):
    counted = Counted(layer)
    deq = pg.DEQ(counted, solver=solver, backward=mode)
    layer.zero_grad()
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    z0 = torch.zeros(x.shape[0], w.shape[1], dtype=D)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        try:
            out, info = deq(x, z0)
        except ValueError as err:  # a layer that does not yet solve with keep_inverse for SHINE
            if "inverse-Jacobian" not in str(err):
                raise
            counted.calls = 0
            fn = lambda z: counted(z, x)  # noqa: E731
            with torch.no_grad():
                z, info = solver.solve(fn, z0, keep_inverse=True)
            out = mode.attach(fn, z, DEQInfo(**vars(info)))
    (out * w).sum().backward()
    return flat_grad(layer), counted.calls, counted.vjps, saved, float(info.rel_residual.max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lipschitz", type=float, default=0.9)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    rows = {name: [] for name in methods()}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        layer = TanhLayer(dim=args.dim, in_dim=16, lipschitz=args.lipschitz)
        x, w = torch.randn(8, 16, dtype=D), torch.randn(8, args.dim, dtype=D)
        exact_mode = pg.Implicit(pg.Broyden(max_iter=300, tol=1e-12, stop="rel"))
        exact = run(layer, x, w, pg.Broyden(max_iter=300, tol=1e-12), exact_mode)[0]
        for name, (solver, mode) in methods().items():
            g, calls, vjps, saved, res = run(layer, x, w, solver, mode)
            cos = float(torch.nn.functional.cosine_similarity(g, exact, dim=0))
            rows[name].append((cos, calls, vjps, saved, res))
    print(f"dim={args.dim} lipschitz={args.lipschitz} batch=8 float64, {args.seeds} seeds (mean; cosine min)\n")
    print(
        "| method | cosine to exact (mean / min) | F evaluations | VJPs | saved for backward (KiB) "
        "| forward rel. residual (max) |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = torch.tensor(r, dtype=D)
        print(
            f"| {name} | {t[:, 0].mean():.6f} / {t[:, 0].min():.6f} | {t[:, 1].mean():.1f} | {t[:, 2].mean():.1f} "
            f"| {t[:, 3].mean() / 1024:.1f} | {t[:, 4].max():.1e} |"
        )


if __name__ == "__main__":
    main()
