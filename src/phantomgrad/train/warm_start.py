"""Warm starts of the forward solve in training: ``warm_start = none | learned | reuse | learned+reuse``.

* ``learned``: the model is built with its init head (``arch.init_head``: MDEQ's
  :class:`~phantomgrad.models.mdeq.MDEQInitHead`, the DEQ transformer's
  :class:`~phantomgrad.models.transformer.TransformerInitHead`), so every solve, in training and
  in evaluation, starts at the head's guess g(u) of z* instead of zeros; the training loss gets
  ``warm_start_weight * info.init_loss`` (:mod:`phantomgrad.init`: it reaches the head only).
* ``reuse``: a :class:`~phantomgrad.FixedPointCache` of the training set. A training batch
  starts each of its samples from the fixed point it was solved to at its last visit (samples
  not seen yet from the init head's guess, or zeros); the solver's h* of each sample is stored
  (float16, on the CPU) when the next step begins, so that a callback's recomputation of a step
  (``RunContext.recompute_loss``: the gradient monitor, the spectral radius) starts where the step
  did and writes nothing. Keyed by the index each batch carries
  (:class:`~phantomgrad.data.batch.Batch`), so it holds under shuffling; under torchrun each
  process caches the samples its sampler gave it (see the cache's docstring). Evaluation neither
  reads nor writes it: test figures are those of the model's own start (what inference costs).
* ``learned+reuse``: both; the head is trained on every batch and starts the samples not cached.
* ``auto`` (the default): the task's choice, ``task.extra["warm_start"]`` (``none`` when it names
  none). The image task chooses ``reuse``: on the README's main job it cut the final epoch's forward
  steps from 19.2 to 9.2 of 20 (docs/convergence.md); the language-model and graph tasks choose
  ``none`` (not measured; an LM's cache of every chunk's (L, d) state is large). Under torchrun
  ``auto`` is ``none`` (see Resume below); ask for ``reuse`` by name there.

Resume: the cache is saved with the checkpoint (this object is a stateful callback of the
trainer), so a resumed run starts every sample where the uninterrupted run would (bit-exact). Under
torchrun only rank 0 writes the checkpoint: on resume every rank starts from rank 0's cache (valid
fixed points of those samples, but not what each rank had), so a resumed multi-process run with
``reuse`` is not bit-exact; that is why ``auto`` does not choose it there. Pretraining steps
(``pretrain_steps``) neither read nor write the cache. Language models: the chunks are shuffled
and each is modelled on its own (``lm_task``), so the previous segment's state would belong to
another sequence; the cache gives each chunk its own last state instead. Graph classification
(IGNN on mutag/tu) solves a whole batch of graphs as one DEQ sample whose make-up changes every
epoch, so it has nothing to reuse per graph and refuses ``reuse``; the transductive ``chains``
graph is one sample and reuses it.

The train metrics get ``init_loss`` (mean over samples, learned) and ``reused`` (the fraction of
samples that started from the cache, reuse).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import FixedPointCache
from ..data.batch import Batch
from .config import ConfigError, TrainConfig
from .context import is_recomputing
from .tasks import StepResult, Task

WARM_STARTS = ("auto", "learned", "reuse", "learned+reuse", "none")
SUM_KEYS = ("init_loss", "reused")


def learned(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` asks for a learned initial state (the model builders then set ``init_head``)."""
    return "learned" in cfg.warm_start


def resolve(cfg: TrainConfig, task: "Task") -> str:
    """``cfg.warm_start``, with ``auto`` replaced by the task's choice (``task.extra["warm_start"]``, else
    none); under torchrun (``WORLD_SIZE`` > 1) ``auto`` is none: each process would cache other samples, and
    only rank 0's cache reaches the checkpoint, so a resumed multi-process run would not be bit-exact."""
    if cfg.warm_start != "auto":
        return cfg.warm_start
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "none"
    return str(task.extra.get("warm_start", "none"))


def arch_with_init_head(cfg: TrainConfig, arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` with ``init_head: true`` added when ``warm_start`` is learned (an explicit
    ``arch.init_head`` wins)."""
    return {"init_head": True, **arch} if learned(cfg) else dict(arch)


class WarmStart:
    """The trainer's warm start (see the module docstring); a callback only for its checkpoint state."""

    def __init__(self, cache: FixedPointCache | None):
        self.cache = cache
        # (indices, h*) of the last training step, stored when the next step begins (or the checkpoint
        # is written): a callback's recomputation of that step (the gradient monitor's exact reference)
        # then starts where the step itself did
        self.pending: tuple[torch.Tensor, Any] | None = None

    def flush(self) -> None:
        """Store the last training step's fixed points in the cache."""
        if self.pending is not None and self.cache is not None:
            self.cache.store(*self.pending)  # a device-to-host copy (a sync on a GPU)
        self.pending = None

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {"cache": self.cache.state_dict() if self.cache is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = None
        if self.cache is not None and state.get("cache") is not None:
            self.cache.load_state_dict(state["cache"])


def _has_init(model: nn.Module) -> bool:
    from ..monitor import deq_modules

    return any(getattr(layer, "init", None) is not None for layer in deq_modules(model))


def _default(key: str) -> Any:
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == key)


def _cache(cfg: TrainConfig, num_samples: int) -> FixedPointCache:
    """The reuse cache of ``warm_start_cache_mb``: in memory under that cap, or (0) a memory-mapped file in
    the run directory, one per process under torchrun (each caches the samples its sampler gave it)."""
    if cfg.warm_start_cache_mb:
        return FixedPointCache(num_samples, max_bytes=cfg.warm_start_cache_mb << 20)
    if cfg.out_dir is None:
        raise ConfigError(
            "warm_start_cache_mb=0 memory-maps the reuse cache into <out_dir>/fixed_points.bin; pass out_dir=..."
        )
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    name = f"fixed_points.rank{rank}.bin" if world > 1 else "fixed_points.bin"
    return FixedPointCache(num_samples, path=Path(cfg.out_dir) / name)


def with_warm_start(task: "Task", cfg: TrainConfig) -> "Task":
    """``task`` with the warm start of ``cfg`` in its training step; ``task`` itself for ``none``.

    Raises:
        ConfigError: ``learned`` for a model without an init head, ``reuse`` for a task whose
            DEQ sample is not one sample of its dataset (graph classification), a
            ``warm_start_weight`` without ``learned`` or a ``warm_start_cache_mb`` without ``reuse`` (they
            would act on nothing), or ``warm_start_cache_mb=0`` (a file) without ``out_dir``.
    """
    mode = resolve(cfg, task)
    want_init = "learned" in mode
    if not want_init and cfg.warm_start_weight != _default("warm_start_weight"):
        raise ConfigError(
            f"warm_start_weight={cfg.warm_start_weight:g} weighs the init head's loss, which only warm_start=learned "
            f"or learned+reuse adds (warm_start={cfg.warm_start}); drop it or set warm_start"
        )
    if "reuse" not in mode and cfg.warm_start_cache_mb != _default("warm_start_cache_mb"):
        raise ConfigError(
            f"warm_start_cache_mb={cfg.warm_start_cache_mb} sizes the reuse cache, which only warm_start=reuse or "
            f"learned+reuse keeps (warm_start={cfg.warm_start}, here {mode}); drop it or set warm_start"
        )
    if mode == "none":
        return task
    reuse = "reuse" in mode
    if want_init and not _has_init(task.model):
        raise ConfigError(
            f"warm_start={cfg.warm_start}: model {cfg.model!r} has no init head (MDEQ and the DEQ transformer have "
            "one); use warm_start=reuse or none"
        )
    if reuse and task.extra.get("reuse") is False:
        raise ConfigError(
            f"warm_start={cfg.warm_start}: {task.name} on {cfg.dataset} solves a whole batch of graphs as one DEQ "
            "sample, so there is no per-sample state to reuse; use warm_start=none (or dataset=chains)"
        )
    cache = _cache(cfg, len(task.train_set)) if reuse else None
    state = WarmStart(cache)
    inner_step, inner_finalize = task.step, task.finalize

    def step(model: nn.Module, batch: Any, device: torch.device, global_step: int | None) -> "StepResult":
        training = global_step is not None and global_step >= cfg.pretrain_steps
        use_cache = cache is not None and training and isinstance(batch, Batch) and batch.indices is not None
        # a callback's recomputation of this step's loss reads the cache as the step did and writes nothing
        recompute = is_recomputing()
        if use_cache:
            assert cache is not None and isinstance(batch, Batch) and batch.indices is not None
            if not recompute:
                state.flush()
            found = cache.found(batch.indices)  # on the CPU: no device sync
            batch.start = cache.start(batch.indices)
        try:
            result = inner_step(model, batch, device, global_step)
        finally:
            if use_cache:
                batch.start = None
        if not training:
            return result
        info = result.info
        if use_cache:
            assert cache is not None and isinstance(batch, Batch) and batch.indices is not None
            if not recompute and info is not None and getattr(info, "fixed_point", None) is not None:
                state.pending = (batch.indices, info.fixed_point)  # stored when the next step begins
            result.sums["reused"] = float(found.sum()) * result.count / max(len(batch.indices), 1)
        init_loss = getattr(info, "init_loss", None) if want_init else None
        if want_init:
            result.sums["init_loss"] = 0.0
            if init_loss is not None:
                result.loss = result.loss + cfg.warm_start_weight * init_loss
                result.sums["init_loss"] = init_loss.detach().double() * result.count
        return result

    def finalize(sums: dict[str, float], count: int) -> dict[str, float]:
        own = {k: sums[k] for k in SUM_KEYS if k in sums}
        out = inner_finalize({k: v for k, v in sums.items() if k not in own}, count)
        for key, value in own.items():
            out[key] = value / max(count, 1)
        return out

    return dataclasses.replace(task, step=step, finalize=finalize, callbacks=[*task.callbacks, state])


__all__ = ["WARM_STARTS", "WarmStart", "with_warm_start", "arch_with_init_head", "learned", "resolve"]
