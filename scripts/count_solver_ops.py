"""Count the operations a solver dispatches per step, besides those of F, with torch.profiler on CPU.

    PYTHONPATH=src python scripts/count_solver_ops.py

Counts top-level aten operators (those not called from inside another one) and leaves out views
and allocations (slice, select, unsqueeze, transpose, ...), which launch no kernel: a proxy for
the kernels a step launches on a GPU. The per-step figure is the difference between solves of 30
and 20 steps, divided by 10, minus F's own operators. The problem never converges (tol=1e-30), so
every step does the same work. The last column, ``fused=True``, counts each kernel that inductor
generated for the compiled bookkeeping as one operator (it profiles them by name).
"""

from __future__ import annotations

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

import phantomgrad as pg

NO_KERNEL = {
    "aten::slice",
    "aten::select",
    "aten::view",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::transpose",
    "aten::t",
    "aten::diagonal",
    "aten::narrow",
    "aten::expand",
    "aten::as_strided",
    "aten::alias",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::permute",
    "aten::detach",
    "aten::lift_fresh",
    "aten::unbind",
    "aten::split",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::_unsafe_view",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::mT",
    "aten::adjoint",
    "aten::result_type",
    "aten::contiguous",
}


def kernel_ops(run) -> int:
    """Top-level aten operators that are not views or allocations, dispatched by ``run()``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(
        (e for e in prof.events() if e.name.startswith("aten::") or "_fused_" in e.name),
        key=lambda e: (e.time_range.start, -e.time_range.end),
    )
    count, end = 0, -1
    for e in events:
        if e.time_range.start >= end:  # not nested in the previous top-level operator
            end = e.time_range.end
            count += e.name not in NO_KERNEL
    return count


def main() -> None:
    torch._inductor.config.cpp.enable_kernel_profile = True  # name inductor's CPU kernels in the profile
    torch.manual_seed(0)
    w, x = torch.randn(64, 64) * 0.05, torch.randn(8, 64)

    def fn(z):
        return torch.tanh(z @ w + x)

    f_ops = kernel_ops(lambda: fn(x))
    rows = [
        ("FixedPoint", lambda n, ce, fu: pg.FixedPoint(max_iter=n, tol=1e-30, check_every=ce, fused=fu), False),
        ("Anderson(m=5)", lambda n, ce, fu: pg.Anderson(m=5, max_iter=n, tol=1e-30, check_every=ce, fused=fu), False),
        (
            "Broyden(memory=5)",
            lambda n, ce, fu: pg.Broyden(memory=5, max_iter=n, tol=1e-30, check_every=ce, fused=fu),
            False,
        ),
        (
            "Broyden(memory=5), keep_inverse",
            lambda n, ce, fu: pg.Broyden(memory=5, max_iter=n, tol=1e-30, check_every=ce, fused=fu),
            True,
        ),
    ]
    print(f"F: {f_ops} operators per call")
    print(f"{'solver':34s} {'check_every=1':>14s} {'check_every=None':>17s} {'None, fused=True':>17s}")
    for name, make, keep_inverse in rows:
        per_step = []
        for check_every, fused in ((1, False), (None, False), (None, True)):
            counts = {}
            for n in (20, 30):
                solver = make(n, check_every, fused)
                with torch.no_grad():
                    solver.solve(fn, torch.zeros(8, 64), keep_inverse=keep_inverse)  # warm-up
                    counts[n] = kernel_ops(lambda: solver.solve(fn, torch.zeros(8, 64), keep_inverse=keep_inverse))
            per_step.append((counts[30] - counts[20]) / 10 - f_ops)
        print(f"{name:34s} {per_step[0]:14.1f} {per_step[1]:17.1f} {per_step[2]:17.1f}")


if __name__ == "__main__":
    main()
