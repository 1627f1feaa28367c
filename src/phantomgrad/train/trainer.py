"""The training loop, readable top to bottom.

    for each epoch:
        for each batch:  loss = task.step(model, batch)     (forward solve; F under autocast for bf16)
                         loss.backward()                    (the DEQ's backward mode makes the gradient)
                         guard: a code on the device, non-zero for a non-finite loss, residual or gradient
                         callbacks (e.g. the gradient-quality monitor)
                         optimiser step, undone on the device when the code is non-zero or a weight
                         became non-finite; lr schedule step
                         every log_every steps: metrics, skipped steps and the progress bar reach the host
        evaluate every split (model.eval(): the layer returns h*, no backward work)
        append a row to metrics.csv, write the checkpoint atomically   (rank 0 only)

The host waits for the device once per logging interval (``log_every`` steps), not once per step:
the metric sums, the guard's codes and the meter stay on the device until then. The guard never
lets a bad step reach the weights (see :mod:`phantomgrad.train.guard`); it *stops* the run when
``max_bad_steps`` steps in a row were bad, which the host sees at the end of the interval, so at
most ``log_every - 1`` further steps run before the stop. ``step`` counts the training steps taken;
the summary's ``steps`` counts the updates applied (``step - skipped``). A skipped step still
advances the lr schedule.

Under torchrun the model is wrapped in DistributedDataParallel, each process reads its
share of every global batch (``batch_size`` is the global batch), and metrics are summed
over processes. The reported accuracy is the final epoch's: nothing is selected on the test set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from phantomgrad.monitor import deq_modules

from . import builders, elastic
from .callbacks import Callback, default_callbacks
from .checkpoint import TRAINER_STATE, CheckpointError, has_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .context import RunContext, recomputing
from .distributed import (
    all_reduce_max,
    barrier,
    broadcast_object,
    init_distributed,
    quiet_other_ranks,
    shutdown_distributed,
)
from .environment import environment
from .errors import DivergenceError, TrainingInterrupted
from .guard import StepGuard, problem
from .meter import Meter
from .metrics import MetricsWriter
from .report import write_report
from .rundir import RunLock, writing
from .stop import GracefulStop
from .tasks import as_dataset

log = logging.getLogger(__name__)

# keys that may differ between a run and its resumption
RESUMABLE_CHANGES = {
    "epochs",
    "progress",
    "out_dir",
    "tensorboard",
    "eval_every",
    "device",
    "threads",
    "max_bad_steps",
    "log_every",
    "resume",
    "dist_timeout",
    "radius_every",  # a measurement that leaves the run as it was (RNG restored, no cache write)
    "warn_not_converged",
}
# steps between host reads of the metrics and the guard: a sync costs nothing on a CPU (it ran the step itself)
DEFAULT_LOG_EVERY = {"cpu": 1, "cuda": 50}


class Trainer:
    """Trains one model as configured by a :class:`TrainConfig`; ``fit()`` returns the summary."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool | str | None = None,
        callbacks: list[Callback] | None = None,
        log_every: int | None = None,
    ):
        self.cfg = cfg
        if resume is True and cfg.out_dir is None:
            raise ConfigError("--resume needs out_dir=... naming the run to continue")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = builders.resolve_device(cfg.device)
        self.dist = init_distributed(device.type == "cuda", getattr(cfg, "dist_timeout", None))
        quiet_other_ranks(self.dist)
        # rank 0 names the run directory (a time stamp, or torchrun's run id) and every process uses that name
        default = Path("runs") / elastic.default_run_name(cfg.dataset, cfg.backward, f"{datetime.now():%Y%m%d-%H%M%S}")
        self.out_dir = Path(broadcast_object(str(cfg.out_dir or default), self.dist))
        self.resume = resume = elastic.resolve_resume(resume, getattr(cfg, "resume", None), self.out_dir, self.dist)
        if not resume and has_checkpoint(self.out_dir / "checkpoint.pt"):
            raise ConfigError(
                f"out_dir {self.out_dir} already holds a run (checkpoint.pt); continue it with --resume, "
                "or choose another out_dir (nothing was overwritten)"
            )
        self.device = torch.device("cuda", self.dist.local_rank) if device.type == "cuda" else device
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size={cfg.batch_size} (the global batch) must be divisible by the "
                f"{self.dist.world_size} processes"
            )
        torch.manual_seed(cfg.seed)
        self.task = builders.build_task(cfg)
        self.model = self.task.model.to(self.device)
        builders.configure_layers(cfg, self.model)  # fallback solver, not-converged warning in CLI syntax
        if self.dist.enabled and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        ):
            if self.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:
                log.warning(
                    "BatchNorm statistics are per process under gloo; use arch.outer_norm=group for results "
                    "that do not depend on the number of processes"
                )
        self.net = DistributedDataParallel(self.model) if self.dist.enabled else self.model  # what the steps call
        self.optimizer = builders.build_optimizer(cfg, self.model)
        self.guard = StepGuard(list(self.model.parameters()), self.optimizer, self.dist, self.device)
        log_every = log_every or getattr(cfg, "log_every", None) or DEFAULT_LOG_EVERY.get(self.device.type, 50)
        if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
            raise ConfigError(
                f"log_every must be an integer >= 1 (steps between host reads of the metrics), got {log_every!r}"
            )
        self.log_every = log_every
        self.local_batch = cfg.batch_size // self.dist.world_size
        self.steps_per_epoch = len(self._train_loader(0))
        self.scheduler = builders.build_scheduler(cfg, self.optimizer, cfg.epochs * self.steps_per_epoch)
        self.callbacks: list[Callback] = list(callbacks or []) + default_callbacks(cfg, self.model, self.device)
        self.callbacks += self.task.callbacks  # e.g. the warm start's fixed-point cache, saved with the checkpoint
        self.epoch = 0  # epochs completed
        self.step = 0  # training steps taken (every batch; the summary's steps leave out the skipped ones)
        self.skipped = 0  # steps skipped by the divergence guard
        self.bad_in_a_row = 0  # the last steps, all skipped (as far as the host has seen)
        self.step_code: torch.Tensor | None = None  # this step's guard code on the device (0: applied); see guard.py
        self.history: list[dict[str, Any]] = []
        self.stop: GracefulStop | None = None  # set while fit() runs
        self.context = RunContext(
            self.out_dir, self.model, self.device, cfg, self.dist, resume, self._autocast, self._recompute_loss
        )
        self._partial: dict[str, Any] | None = None  # a checkpoint's unfinished epoch, until it is continued
        self._epoch_lr = 0.0  # the lr at the start of the current epoch (for its metrics row)

    # ---- data -------------------------------------------------------------------------
    def _train_loader(self, epoch: int, start: int = 0) -> DataLoader:
        """The order is a function of (seed, epoch) alone, so a resumed run sees the same
        batches, and the processes of a distributed run split each global batch; ``start``
        batches of the epoch are left out (a run resumed in the middle of an epoch)."""
        sampler: Any = DistributedSampler(
            as_dataset(self.task.train_set),
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            shuffle=True,
            seed=self.cfg.seed,
        )
        sampler.set_epoch(epoch)
        if start:
            sampler = list(sampler)[start * self.local_batch :]
        return DataLoader(
            as_dataset(self.task.train_set), batch_size=self.local_batch, sampler=sampler, collate_fn=self.task.collate
        )

    def _autocast(self) -> Any:
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _recompute_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of ``batch`` at the current step (for callbacks; no DDP gradient sync)."""
        with self._autocast(), recomputing():
            return self.task.step(self.model, batch, self.device, self.step).loss

    def _ctx(self) -> RunContext:
        """The callbacks' context, brought up to date."""
        ctx = self.context
        ctx.step, ctx.epoch, ctx.skipped, ctx.step_code = self.step, self.epoch, self.skipped, self.step_code
        return ctx

    # ---- one epoch ----------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.net.train()
        partial, self._partial = self._partial, None
        start = partial["batch"] if partial else 0
        meter = Meter.from_state(partial["meter"]) if partial and self.dist.is_main else Meter()  # sums of all ranks
        loader = self._train_loader(epoch, start)
        batches = iter(loader)  # draws a seed from the global RNG
        if partial:  # the RNG as it was at the interruption, after that draw
            _set_rng(partial["rng"])
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            leave=False,
            disable=builders.progress_disabled(self.cfg, self.dist.is_main),
            dynamic_ncols=True,
        )
        after_step = getattr(self.model, "after_optimizer_step", None)

        def apply() -> None:  # the update the guard undoes for a bad step
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            if after_step is not None:
                after_step()

        # Host syncs on every step: the DEQ layer's own (named in deq.py; none with check_every=None) and the
        # task's copy of the batch to the device (from the loader's pageable memory a CUDA copy waits for the
        # queued work; a pinned loader with non_blocking copies would lift it). Rare ones are named where they
        # are (the guard's first update of a parameter, the monitor's measured steps). The metric sums, the
        # guard's code and the meter stay on the device until _flush, once per log_every steps.
        for done, batch in enumerate(batches, start + 1):
            t0 = time.perf_counter()
            with self._autocast():
                result = self.task.step(self.net, batch, self.device, self.step)
            t1 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            t2 = time.perf_counter()
            self.step_code = self.guard.check(result.loss, result.info)
            for cb in self.callbacks:
                if hasattr(cb, "after_backward"):
                    cb.after_backward(self._ctx(), batch, result)
            self.guard.update(self.step_code, apply)
            self.scheduler.step()
            meter.add(result, self.step_code, self.step)
            self.step += 1
            t3 = time.perf_counter()
            meter.forward_s += t1 - t0
            meter.backward_s += t2 - t1
            meter.step_s += t3 - t0
            if self.step % self.log_every == 0:
                self._flush(meter, bar)
            if self._stop_requested(done % self.log_every == 0 or done == self.steps_per_epoch):
                self._interrupt(meter, bar, done)
        self._flush(meter, bar)
        bar.close()
        reduced = meter.reduce(self.dist, self.device)
        out = {f"train_{k}": v for k, v in reduced.means(self.task.finalize).items()}
        out.update(
            train_seconds=meter.step_s,
            forward_seconds=meter.forward_s,
            backward_seconds=meter.backward_s,
            skipped_steps=self.skipped,
        )
        return out

    def _flush(self, meter: Meter, bar: tqdm) -> None:
        """The host reads the interval's metrics and guard codes (one sync); stops a diverged run."""
        steps = meter.flush()
        diverged = None
        for step, code in steps:
            if not code:
                self.bad_in_a_row = 0
                continue
            self.skipped += 1
            self.bad_in_a_row += 1
            log.warning("step %d skipped: non-finite %s (%d in a row)", step, problem(code), self.bad_in_a_row)
            if self.bad_in_a_row >= self.cfg.max_bad_steps and diverged is None:
                diverged = (self.bad_in_a_row, problem(code), step)
        if diverged is not None:
            n, what, step = diverged
            raise DivergenceError(
                f"training diverged: {n} steps in a row had a non-finite {what} (last at step {step}); "
                "try a smaller damping, Jacobian regularisation (jac_reg_weight, jac_reg_freq), fewer solver steps, "
                "a lower lr or grad_clip"
            )
        if steps and not bar.disable:
            shown = meter.means(self.task.finalize)
            bar.set_postfix(
                {k: f"{shown[k]:.3f}" for k in self.task.progress_keys if k in shown}
                | {"nstep": f"{shown['nstep']:.1f}"}
            )
            bar.update(len(steps))

    def _stop_requested(self, at_interval: bool) -> bool:
        """Whether a signal asked to stop: this process's flag after any step; under torchrun the
        processes agree at the end of a logging interval (an all-reduce), so all stop at the same step."""
        flag = self.stop is not None and self.stop.signum is not None
        if not self.dist.enabled:
            return flag
        if not at_interval:
            return False
        signum = all_reduce_max((self.stop.signum or 0) if self.stop else 0, self.dist, self.device)
        if signum and self.stop is not None and self.stop.signum is None:
            self.stop.signum = signum
        return bool(signum)

    def _interrupt(self, meter: Meter, bar: tqdm, done: int) -> None:
        """Write a checkpoint that continues after batch ``done`` of the current epoch; raise."""
        self._flush(meter, bar)
        bar.close()
        partial = {"batch": done, "meter": meter.reduce(self.dist, self.device).state_dict(), "rng": _rng_state()}
        partial["lr"] = self._epoch_lr
        if done == self.steps_per_epoch:  # the last batch: nothing of the epoch is left but its end
            log.info("the epoch's last step was taken; stopping before its evaluation")
        path = self._save(partial) if self.dist.is_main else None
        barrier(self.dist)
        assert self.stop is not None and self.stop.signum is not None
        raise TrainingInterrupted(
            self.stop.signum,
            path or self.out_dir / "checkpoint.pt",
            f", {done} of {self.steps_per_epoch} steps of epoch {self.epoch + 1}",
        )

    def _interrupted_at_once(self, signum: int) -> TrainingInterrupted:
        """The second signal: stop where we are; the checkpoint on disk (if any) is the last good one."""
        path = self.out_dir / "checkpoint.pt"
        return TrainingInterrupted(signum, path if path.exists() else None, ", the last one written")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every evaluation split, in eval mode (the DEQ returns h*, no backward work);
        each process takes every world_size-th sample and the sums are reduced."""
        self.net.eval()
        out: dict[str, float] = {}
        for split, data in self.task.eval_sets.items():
            dataset = as_dataset(data)
            if self.dist.enabled:
                dataset = Subset(dataset, range(self.dist.rank, len(data), self.dist.world_size))
            meter = Meter()
            for batch in DataLoader(dataset, batch_size=max(self.local_batch, 256), collate_fn=self.task.collate):
                with self._autocast():
                    meter.add(self.task.step(self.model, batch, self.device, None))
            meter.flush()  # one host sync per split
            meter = meter.reduce(self.dist, self.device)
            out.update({f"{split}_{k}": v for k, v in meter.means(self.task.finalize).items()})
        return out

    # ---- the run ----------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train (or continue) to ``cfg.epochs``. Rank 0 holds the run directory's lock throughout;
        SIGINT/SIGTERM stop the run at the next step boundary with a checkpoint (see stop.py)."""
        if self.resume:  # reads only: a checkpoint that cannot be resumed is refused before the lock file is made
            self._restore()
        lock = RunLock(self.out_dir) if self.dist.is_main else contextlib.nullcontext()
        with lock, GracefulStop(self._interrupted_at_once) as self.stop:
            try:
                return self._fit()
            finally:
                self.stop = None

    def _fit(self) -> dict[str, Any]:
        main = self.dist.is_main
        writer = None
        keep = "nothing was overwritten"
        if main:
            with writing(f"the run files in out_dir {self.out_dir}", keep):
                config = yaml.safe_dump(self.cfg.to_dict() | {"out_dir": str(self.out_dir)}, sort_keys=False)
                (self.out_dir / "config.yaml").write_text(config)
                writer = MetricsWriter(self.out_dir, tensorboard=self.cfg.tensorboard, resume=self.resume)
                if self.resume:
                    writer.truncate_after(self.epoch)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "training %s (%d parameters) on %s with %s, %d epochs, %d process(es), out_dir %s",
            self.cfg.model,
            n_params,
            self.cfg.dataset,
            getattr(deq_modules(self.model)[0], "backward_mode", "?") if deq_modules(self.model) else "?",
            self.cfg.epochs,
            self.dist.world_size,
            self.out_dir,
        )
        while self.epoch < self.cfg.epochs:
            epoch = self.epoch
            lr = self._partial["lr"] if self._partial else self.optimizer.param_groups[0]["lr"]  # at the epoch's start
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            self._epoch_lr = lr
            row.update(self.train_epoch(epoch))
            if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs:
                for cb in self.callbacks:
                    if hasattr(cb, "before_evaluate"):
                        cb.before_evaluate(self._ctx())
                row.update(self.evaluate())
            for cb in self.callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(self._ctx(), row)
            self.epoch += 1
            self.history.append(row)
            if main:
                keep = (
                    f"the checkpoint after epoch {epoch} is intact: resume from it with --resume"
                    if epoch
                    else "no checkpoint was written yet"
                )
                assert writer is not None  # opened above on the main process
                with writing(f"out_dir {self.out_dir}", keep):
                    writer.write(row)
                self._save()
            barrier(self.dist)
            log.info(
                "epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            )
            if self._stop_requested(True):  # a signal during the evaluation or the checkpoint
                assert self.stop is not None and self.stop.signum is not None
                raise TrainingInterrupted(
                    self.stop.signum, self.out_dir / "checkpoint.pt", f", after epoch {self.epoch}"
                )
        summary = self.summary(n_params)
        if main:
            with writing(f"out_dir {self.out_dir}", "the checkpoint of the last epoch is intact"):
                (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                write_report(self.out_dir, environment(self.device, self.dist.world_size, self.cfg.seed))
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
            "steps": self.step - self.skipped,  # updates applied
            "skipped_steps": self.skipped,
            "processes": self.dist.world_size,
            "final_metrics": {k: v for k, v in last.items() if k.startswith(("test_", "valid_", "train_"))},
            "test_accuracy": last.get("test_accuracy"),
            "seconds_per_epoch": median(epoch_times) if epoch_times else math.nan,
            "train_seconds": total,
            "mean_forward_steps": sum(r["train_nstep"] for r in self.history) / max(len(self.history), 1),
            "backward_share": bwd / total if total else math.nan,
            "forward_share": fwd / total if total else math.nan,
            "accuracy_selection": "final epoch (no selection on the test set)",
            "out_dir": str(self.out_dir),
        }

    # ---- checkpoints ------------------------------------------------------------------
    def _save(self, partial: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint atomically; ``partial`` continues an unfinished epoch (batches done,
        the meter's sums, the RNG after the epoch's data loader drew its seed)."""
        path = self.out_dir / "checkpoint.pt"
        save_checkpoint(
            path,
            {
                "config": self.cfg.to_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "skipped": self.skipped,
                "bad_in_a_row": self.bad_in_a_row,
                "partial_epoch": partial,
                "callbacks": {key: cb.state_dict() for key, cb in self._stateful_callbacks().items()},
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": self.history,
                "world_size": self.dist.world_size,
                "steps_per_epoch": self.steps_per_epoch,
            },
        )
        return path

    def _stateful_callbacks(self) -> dict[str, Any]:
        """Callbacks with ``state_dict``/``load_state_dict``, keyed by class name and occurrence."""
        out: dict[str, Any] = {}
        for cb in self.callbacks:
            if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict"):
                name = type(cb).__name__
                out[f"{name}:{sum(k.startswith(name + ':') for k in out)}"] = cb
        return out

    def _restore(self) -> None:
        state = load_checkpoint(self.out_dir / "checkpoint.pt", require=TRAINER_STATE)
        saved = state["config"]
        defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
        # a key the checkpoint lacks was added by a later version: unchanged while it keeps its default
        diff = sorted(
            k
            for k, v in self.cfg.to_dict().items()
            if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != v
        )
        if diff:
            changes = ", ".join(f"{k}: {saved.get(k, defaults.get(k))!r} -> {getattr(self.cfg, k)!r}" for k in diff)
            raise CheckpointError(
                f"checkpoint in {self.out_dir} was made with a different config ({changes}); "
                "resume with the same config or use a new out_dir"
            )
        elastic.check_world_size(state, self.out_dir, self.dist.world_size, self.steps_per_epoch)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"checkpoint in {self.out_dir} does not fit this model ({str(err).splitlines()[0]}); use a new out_dir"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.skipped = state.get("skipped", 0)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.guard.after_load()
        self._partial = state.get("partial_epoch")
        saved_callbacks = state.get("callbacks") or {}
        for key, cb in self._stateful_callbacks().items():
            if key in saved_callbacks:
                cb.load_state_dict(saved_callbacks[key])
        where = (
            f"{self._partial['batch']} steps into epoch {self.epoch + 1}"
            if self._partial
            else f"after epoch {self.epoch}"
        )
        log.info("resumed from %s %s (step %d)", self.out_dir / "checkpoint.pt", where, self.step)


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    cfg: TrainConfig, resume: bool | str | None = None, callbacks: list[Callback] | None = None
) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to out_dir/summary.json).

    Under torchrun every process leaves the process group at the end, after the others (not
    on an error: a barrier there could wait for a peer that has died; torchrun stops them all).
    """
    with elastic.peer_failures() as watch:  # a peer's failure: one line, exit code 75 (see elastic.py)
        trainer = Trainer(cfg, resume=resume, callbacks=callbacks)
        watch.checkpoint = trainer.out_dir / "checkpoint.pt"
        summary = trainer.fit()
        info = trainer.dist
        del trainer  # the DDP reducer must go before its process group (see shutdown_distributed)
        shutdown_distributed(info)
    return summary
