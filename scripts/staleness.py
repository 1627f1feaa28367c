"""What fixed-point reuse's staleness costs, and what data augmentation does to it (issue 25).

    python scripts/staleness.py RUN_DIR [--samples 1024] [--batch 128] [--max-iter 40] [--threads 1] [--json F]

RUN_DIR is an image-task run trained with ``warm_start=reuse`` (its checkpoint holds the
fixed-point cache of the last epoch). On ``--samples`` training images found in the cache it
solves the trained model's equilibrium with the run's solver and tolerance, at most ``--max-iter``
steps, from four starts and reports the mean solver steps (F evaluations) and converged fraction:

* ``zeros``: what a run without reuse pays;
* ``cache``: the state cached at the sample's last visit (stale by up to one epoch of updates):
  what reuse paid in the run's last epoch;
* ``fresh``: the sample's fixed point under the final weights, stored in the cache's dtype: what a
  cache with no staleness would give (the floor; the gap to ``cache`` is the price of staleness);

and, for an augmented view of each image (a random crop with the dataset's own padding), the same
from zeros, from the cache (the state of the view seen last epoch) and from the fresh fixed point of
the un-augmented image: what reuse gives when every visit shows a new view.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import phantomgrad as pg
from phantomgrad.cache import FixedPointCache
from phantomgrad.data.images import RandomCropFlip
from phantomgrad.experiments.evaluate import EvalOptions, load_run
from phantomgrad.models.mdeq import MDEQ
from phantomgrad.train.checkpoint import load_checkpoint


def _solve(model: MDEQ, images: torch.Tensor, start) -> pg.DEQInfo:
    u, zeros = model.prepare(images)
    _, info = model.deq(u, start(zeros) if start is not None else zeros)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-iter", type=int, default=40)
    parser.add_argument("--padding", type=int, default=2, help="the augmentation's crop padding (Fashion-MNIST: 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    cfg, task, device = load_run(args.run_dir, EvalOptions(threads=args.threads, device="cpu"))
    model = task.model
    if not isinstance(model, MDEQ):
        print(f"staleness: {args.run_dir} is not an MDEQ image run", file=sys.stderr)
        return 2
    state = load_checkpoint(args.run_dir / "checkpoint.pt")
    saved = state["callbacks"].get("WarmStart:0", {}).get("cache")
    if saved is None:
        print(
            f"staleness: {args.run_dir} was not trained with warm_start=reuse (no cache in its checkpoint)",
            file=sys.stderr,
        )
        return 2
    train = task.train_set
    cache = FixedPointCache(len(train))
    cache.load_state_dict(saved)
    model.deq.solver = pg.Anderson(max_iter=args.max_iter, tol=cfg.solver_tol, stop=cfg.solver_stop)
    model.deq.warn_not_converged = False
    gen = torch.Generator().manual_seed(args.seed)
    held = cache.filled.nonzero().flatten()
    picked = held[torch.randperm(len(held), generator=gen)[: args.samples]]
    torch.manual_seed(args.seed)  # the crops
    crop = RandomCropFlip(padding=args.padding, flip=False, fill=float(train[0][0].min()))
    steps: dict[str, list[float]] = {}
    converged: dict[str, list[float]] = {}

    def record(name: str, info: pg.DEQInfo) -> None:
        steps.setdefault(name, []).extend(info.nstep.double().tolist())
        converged.setdefault(name, []).extend(info.converged.double().tolist())

    with torch.no_grad():
        for chunk in picked.split(args.batch):
            images = torch.stack([train[int(i)][0] for i in chunk]).to(device)
            views = torch.stack([crop(img) for img in images.cpu()]).to(device)
            record("zeros", _solve(model, images, None))
            record("cache", _solve(model, images, cache.start(chunk)))
            tight = FixedPointCache(len(train), dtype=cache.dtype)
            solver = model.deq.solver
            model.deq.solver = pg.Anderson(max_iter=200, tol=1e-6, stop=cfg.solver_stop)
            info = _solve(model, images, None)
            model.deq.solver = solver
            tight.store(chunk, info.fixed_point)
            record("fresh", _solve(model, images, tight.start(chunk)))
            record("augmented view: zeros", _solve(model, views, None))
            record("augmented view: cache", _solve(model, views, cache.start(chunk)))
            record("augmented view: fresh z* of the image", _solve(model, views, tight.start(chunk)))
    rows = [
        {"start": k, "mean_steps": statistics.fmean(v), "converged": statistics.fmean(converged[k])}
        for k, v in steps.items()
    ]
    print(
        f"{args.run_dir}: {len(picked)} training images held in the cache; {cfg.solver} to rel. tol "
        f"{cfg.solver_tol}, at most {args.max_iter} steps; augmentation: random crop, padding {args.padding}\n"
    )
    print("| start | mean F evaluations | converged |\n|---|---|---|")
    for r in rows:
        print(f"| {r['start']} | {r['mean_steps']:.2f} | {100 * r['converged']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps({"run_dir": str(args.run_dir), "samples": len(picked), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
