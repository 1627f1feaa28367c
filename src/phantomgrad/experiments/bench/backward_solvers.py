"""Implicit's backward solve with each registered solver: GMRES against Broyden, Anderson and the
fixed-point iteration on the bench's models (issue 26 item 3).

    python -m phantomgrad.experiments.bench.backward_solvers --model conv-cell --batch 32 --train-steps 100

For each solver S that iterates a linear fixed point to a tolerance (every entry of ``SOLVERS`` but
the lockstep ones, GMRES included), the model's DEQ layer runs with ``pg.Implicit(S(max_iter=K,
tol, stop="rel"))`` behind a Broyden forward solve; a cross-entropy loss on the batch's labels is
backpropagated, and the backward solve of g = J_h^T g + dL/dh reports per sample whether it reached
the tolerance and in how many evaluations (vector-Jacobian products). Reported per solver: the
converged fraction, the mean evaluations of the converged samples (steps to ``tol``), the mean
final relative residual, and the median time of ``loss.backward()`` over ``repeats`` rounds.

``--train-steps N`` first trains the model N steps (Adam, UPG A_{5,0.5}) on the same batch, the
quick way to a model whose map is no longer a contraction at its fixed point (training on a
fixed batch grows the weights); the untrained models are contractive.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

import phantomgrad as pg
from phantomgrad.solvers import SOLVERS

from .config import BenchConfig
from .problem import Problem, build_problem


@dataclass
class BackwardSolverConfig:
    model: str = "conv-cell"
    batch: int = 32
    image_size: int = 32
    max_iter: int = 60  # the backward solve's evaluations
    tol: float = 1e-4  # relative
    forward_iter: int = 30  # the forward Broyden solve
    train_steps: int = 0
    lr: float = 1e-3
    repeats: int = 3
    threads: int = 2
    seed: int = 0


def backward_solver_names() -> list[str]:
    """The registered solvers Implicit may use: they take max_iter and tol and stop per sample."""
    return [name for name, cls in SOLVERS.items() if not cls.lockstep]


def _loss(p: Problem) -> tuple[torch.Tensor, Any]:
    with p.context():
        u, z0 = p.prepare(p.x)
        z, info = p.deq(u, z0)
        return torch.nn.functional.cross_entropy(p.logits(z), p.y), info


def train(p: Problem, steps: int, lr: float) -> list[float]:
    """``steps`` of Adam with UPG A_{5,0.5} on the problem's batch; the losses."""
    opt = torch.optim.Adam(p.model.parameters(), lr=lr)
    losses = []
    with pg.swap(p.model, backward=pg.UPG(k=5, damping=0.5)):
        for _ in range(steps):
            opt.zero_grad()
            loss, _ = _loss(p)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def measure(cfg: BackwardSolverConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    bench = BenchConfig(model=cfg.model, batch=cfg.batch, image_size=cfg.image_size, seed=cfg.seed)
    p = build_problem(bench)
    losses = train(p, cfg.train_steps, cfg.lr) if cfg.train_steps else []
    forward = pg.Broyden(max_iter=cfg.forward_iter, tol=1e-4)
    rows = []
    for name in backward_solver_names():
        solver = SOLVERS[name](max_iter=cfg.max_iter, tol=cfg.tol, stop="rel")
        times, infos = [], []
        with pg.swap(p.model, solver=forward, backward=pg.Implicit(solver)):
            for _ in range(cfg.repeats):
                p.model.zero_grad()
                loss, info = _loss(p)
                start = time.perf_counter()
                loss.backward()
                times.append(time.perf_counter() - start)
                infos.append(info.backward)
        back = infos[-1]  # the same batch and weights every round: the same solve
        converged = back.converged
        steps = back.nstep[converged].double().mean().item() if converged.any() else float("nan")
        rows.append(
            {
                "solver": name,
                "converged": converged.double().mean().item(),
                "steps_to_tol": steps,
                "steps_mean": back.nstep.double().mean().item(),
                "rel_residual": back.rel_residual.double().mean().item(),
                "backward_ms": 1e3 * statistics.median(times),
                "forward_converged": info.converged.double().mean().item(),
            }
        )
    return {"config": vars(cfg), "train_losses": losses, "rows": rows, "torch": torch.__version__}


def render(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"{cfg['model']}, batch {cfg['batch']}, {cfg['train_steps']} training steps; backward solve to "
        f"{cfg['tol']:g} relative, at most {cfg['max_iter']} evaluations",
        "",
        "| backward solver | converged | steps to tol | steps (all) | rel. residual | backward ms | fwd converged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['solver']} | {100 * r['converged']:.0f}% | {r['steps_to_tol']:.1f} | {r['steps_mean']:.1f} | "
            f"{r['rel_residual']:.2e} | {r['backward_ms']:.0f} | {100 * r['forward_converged']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m phantomgrad.experiments.bench.backward_solvers", description=__doc__
    )
    defaults = BackwardSolverConfig()
    parser.add_argument("--model", default=defaults.model, choices=("conv-cell", "mdeq-tiny", "synthetic"))
    for key in ("batch", "image_size", "max_iter", "forward_iter", "train_steps", "repeats", "threads", "seed"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=getattr(defaults, key))
    parser.add_argument("--tol", type=float, default=defaults.tol)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = vars(parser.parse_args(argv))
    out = args.pop("json")
    result = measure(BackwardSolverConfig(**args))
    print(render(result))
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()


__all__ = ["BackwardSolverConfig", "backward_solver_names", "measure", "render", "train", "main"]
