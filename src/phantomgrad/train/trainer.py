"""The training loop, readable top to bottom.

    for each epoch:
        for each batch:  logits, info = model(x)  ->  loss  ->  backward (the DEQ's backward mode)
                         ->  optimiser step  ->  lr schedule step
        evaluate on the test split (model.eval(): the layer returns h*, no backward work)
        append a row to metrics.csv, write the checkpoint atomically

The reported accuracy is the final epoch's test accuracy: nothing is selected by looking
at the test set.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import builders
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsWriter
from .tasks import StepResult, build_task

log = logging.getLogger(__name__)

# keys that may differ between a run and its resumption
RESUMABLE_CHANGES = {"epochs", "progress", "out_dir", "tensorboard", "eval_every", "device", "threads"}


@dataclass
class Meter:
    """Running sums over one epoch (metric sums from the task, solver steps, timings)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    nstep: float = 0.0
    batches: int = 0
    forward_s: float = 0.0
    backward_s: float = 0.0
    step_s: float = 0.0

    def add(self, result: StepResult) -> None:
        for key, value in result.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += result.count
        self.batches += 1
        if result.info is not None:
            self.nstep += float(result.info.nstep.float().mean())

    def means(self, finalize) -> dict[str, float]:
        return {**finalize(self.sums, self.count), "nstep": self.nstep / max(self.batches, 1)}


class Trainer:
    """Trains one model as configured by a :class:`TrainConfig`; ``fit()`` returns the summary."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.resume = resume
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = builders.resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.task = build_task(cfg)
        self.model = self.task.model.to(self.device)
        self.train_set = self.task.train_set
        self.optimizer = builders.build_optimizer(cfg, self.model)
        self.steps_per_epoch = -(-len(self.train_set) // cfg.batch_size)
        self.scheduler = builders.build_scheduler(cfg, self.optimizer, cfg.epochs * self.steps_per_epoch)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps taken
        self.history: list[dict[str, Any]] = []

    # ---- data -------------------------------------------------------------------------
    def _train_loader(self, epoch: int) -> DataLoader:
        """Shuffled with a generator seeded by (seed, epoch): the data order is a function of
        the epoch alone, so a resumed run sees the same batches."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True, generator=gen, collate_fn=self.task.collate)

    # ---- one epoch ----------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        meter = Meter()
        bar = tqdm(self._train_loader(epoch), desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not self.cfg.progress, dynamic_ncols=True)
        after_step = getattr(self.model, "after_optimizer_step", None)
        for batch in bar:
            t0 = time.perf_counter()
            result = self.task.step(self.model, batch, self.device, self.step)
            t1 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            t2 = time.perf_counter()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if after_step is not None:
                after_step()
            self.step += 1
            t3 = time.perf_counter()
            meter.add(result)
            meter.forward_s += t1 - t0
            meter.backward_s += t2 - t1
            meter.step_s += t3 - t0
            shown = meter.means(self.task.finalize)
            bar.set_postfix({k: f"{shown[k]:.3f}" for k in self.task.progress_keys if k in shown} | {"nstep": f"{shown['nstep']:.1f}"})
        bar.close()
        out = {f"train_{k}": v for k, v in meter.means(self.task.finalize).items()}
        out.update(train_seconds=meter.step_s, forward_seconds=meter.forward_s, backward_seconds=meter.backward_s)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every evaluation split, in eval mode (the DEQ returns h*, no backward work)."""
        self.model.eval()
        out: dict[str, float] = {}
        for split, dataset in self.task.eval_sets.items():
            meter = Meter()
            for batch in DataLoader(dataset, batch_size=max(self.cfg.batch_size, 256), collate_fn=self.task.collate):
                meter.add(self.task.step(self.model, batch, self.device, None))
            out.update({f"{split}_{k}": v for k, v in meter.means(self.task.finalize).items()})
        return out

    # ---- the run ----------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._restore()
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        writer = MetricsWriter(self.out_dir, tensorboard=self.cfg.tensorboard, resume=self.resume)
        if self.resume:
            writer.truncate_after(self.epoch)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("training %s (%d parameters) on %s, %s, %d epochs", self.cfg.model, n_params, self.cfg.dataset,
                 getattr(getattr(self.model, "deq", None), "backward_mode", "?"), self.cfg.epochs)
        while self.epoch < self.cfg.epochs:
            epoch = self.epoch
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            row.update(self.train_epoch(epoch))
            if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs:
                row.update(self.evaluate())
            self.epoch += 1
            self.history.append(row)
            writer.write(row)
            self._save()
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        summary = self.summary(n_params)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def summary(self, n_params: int) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        epoch_times = [r["train_seconds"] for r in self.history]
        fwd = sum(r["forward_seconds"] for r in self.history)
        bwd = sum(r["backward_seconds"] for r in self.history)
        total = sum(epoch_times)
        return {
            "model": self.cfg.model,
            "dataset": self.cfg.dataset,
            "backward": self.cfg.backward,
            "parameters": n_params,
            "epochs": self.epoch,
            "final_metrics": {k: v for k, v in last.items() if k.startswith(("test_", "valid_", "train_"))},
            "test_accuracy": last.get("test_accuracy"),
            "seconds_per_epoch": median(epoch_times) if epoch_times else None,
            "train_seconds": total,
            "mean_forward_steps": sum(r["train_nstep"] for r in self.history) / max(len(self.history), 1),
            "backward_share": bwd / total if total else None,
            "forward_share": fwd / total if total else None,
            "accuracy_selection": "final epoch (no selection on the test set)",
            "out_dir": str(self.out_dir),
        }

    # ---- checkpoints ------------------------------------------------------------------
    def _save(self) -> None:
        save_checkpoint(self.out_dir / "checkpoint.pt", {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": self.history,
        })

    def _restore(self) -> None:
        state = load_checkpoint(self.out_dir / "checkpoint.pt")
        saved = state["config"]
        diff = sorted(k for k, v in self.cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if diff:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in diff)
            raise CheckpointError(f"checkpoint in {self.out_dir} was made with a different config ({changes}); "
                                  "resume with the same config or use a new out_dir")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint in {self.out_dir} does not fit this model ({err}); use a new out_dir") from None
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        log.info("resumed from %s after epoch %d (step %d)", self.out_dir / "checkpoint.pt", self.epoch, self.step)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to out_dir/summary.json)."""
    return Trainer(cfg, resume=resume).fit()
