"""Language modelling: a DEQ transformer on a text corpus, next-token cross-entropy.

Data. The corpus (:func:`phantomgrad.data.text.load_corpus`) is cut into
non-overlapping chunks of ``seq_len`` tokens: chunk i is the input
``tokens[i L : (i+1) L]`` and the target ``tokens[i L + 1 : (i+1) L + 1]``. The
trainer's DataLoader shuffles the train chunks; valid and test chunks are evaluated
in order. Every chunk is modelled on its own (no memory carried over from the
previous chunk), so position t of a chunk is predicted from t + 1 tokens of context.

Loss and metrics. Mean cross-entropy per token (nats). ``finalize`` reports ``loss``,
``ppl`` = exp(loss), ``bpc`` = loss / ln 2 (bits per character on the character
corpora, bits per word on WikiText-103), ``rel_residual`` (mean relative residual of
the forward solve) and ``tokens`` (the count the means run over).

Jacobian regularisation (Bai, Koltun, Kolter 2021). On a training step, with
probability ``jac_reg_freq`` (a draw seeded by ``(seed, step)``, so a resumed run
makes the same draws), the step adds ``jac_reg_weight * ||dF/dz||_F^2 / (L d)``
(Hutchinson estimate at the fixed point, :meth:`DEQTransformer.jacobian_penalty`)
to the loss. Training metrics then include ``jac_penalty`` (its mean over the steps
that drew it; NaN in an epoch with none) and ``jac_steps``; ``jac_reg_weight=0``
with ``jac_reg_freq > 0`` measures the penalty without regularising.

Spectral radius. Every ``RADIUS_EVERY``-th training step (step 0 included), with or
without regularisation, the step estimates rho(dF/dz) at the fixed point by
``RADIUS_ITERS`` power iterations (:meth:`DEQTransformer.spectral_radius`); training
metrics include ``spectral_radius`` (mean over the measured steps, NaN in an epoch
with none). This costs about ``RADIUS_ITERS / RADIUS_EVERY`` vector-Jacobian
products per step, a few percent, the same for every backward mode.

Options. ``data_options`` is checked by :class:`LMDataOptions` (``seq_len``,
``train_tokens``, ``eval_tokens``); ``arch`` by
:class:`~phantomgrad.models.transformer.TransformerConfig` (``d_model``, ``n_heads``,
``d_ff``, ``norm``, ``positions``, ...). ``model`` names a preset
(``deq-transformer-tiny``, ``deq-transformer-small``, ``deq-transformer``); left unset,
TrainConfig resolves it to ``deq-transformer`` for task=lm.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data.batch import BatchCollate, Indexed, as_batch
from ..swap import pretraining
from . import builders
from .config import ConfigError, TrainConfig
from .tasks import StepResult, Task
from .warm_start import arch_with_init_head

log = logging.getLogger(__name__)

RADIUS_ITERS = 10  # power-iteration steps for the logged spectral radius
RADIUS_EVERY = 25  # ... measured on every RADIUS_EVERY-th training step


@dataclass(frozen=True)
class LMDataOptions:
    """``data_options`` of the lm task.

    Args:
        seq_len: tokens per chunk (the length the model sees).
        train_tokens: use only the first N tokens of the train split (None: all).
        eval_tokens: use only the first N tokens of the valid and test splits (None: all).
    """

    seq_len: int = 64
    train_tokens: int | None = None
    eval_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 1:
            raise ConfigError(f"data_options.seq_len must be an integer >= 1, got {self.seq_len!r}")
        for name in ("train_tokens", "eval_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= self.seq_len):
                raise ConfigError(
                    f"data_options.{name} must be null or an integer > seq_len={self.seq_len} "
                    f"(at least one chunk), got {value!r}"
                )

    @classmethod
    def from_dict(cls, options: dict) -> "LMDataOptions":
        try:
            return cls(**options)
        except TypeError:
            known = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(options) - set(known))
            raise ConfigError(
                f"unknown data_options key(s) {unknown} for task=lm; valid keys: {', '.join(known)}"
            ) from None


class LMChunks(Dataset):
    """Non-overlapping (input, target) chunks of a 1-D token stream.

    Item i is ``(tokens[i L : (i+1) L], tokens[i L + 1 : (i+1) L + 1])`` with L = seq_len;
    there are floor((N - 1) / L) items, the last tokens that do not fill a chunk are dropped.
    """

    def __init__(self, tokens: Tensor, seq_len: int):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one chunk of seq_len={seq_len} (+1 target)")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"chunk {i} out of range for {self.n} chunks")
        i = i % self.n
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len], self.tokens[start + 1 : start + 1 + self.seq_len]


def lm_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    """loss (nats per token), ppl = exp(loss), bpc = loss / ln 2, rel_residual, tokens;
    plus spectral_radius (training) and jac_penalty, jac_steps (training with JR) when
    the sums hold them."""
    n = max(count, 1)
    loss = sums.get("loss", 0.0) / n
    out = {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpc": loss / math.log(2),
        "rel_residual": sums.get("rel_residual", 0.0) / n,
        "tokens": float(count),
    }
    if "radius_steps" in sums:
        steps = sums["radius_steps"]
        out["spectral_radius"] = sums["spectral_radius"] / steps if steps else math.nan
    if "jac_steps" in sums:
        steps = sums["jac_steps"]
        out["jac_penalty"] = sums["jac_penalty"] / steps if steps else math.nan
        out["jac_steps"] = steps
    return out


def _draw(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends on (seed, step) only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return float(torch.rand((), generator=gen))


def build_lm_task(cfg: TrainConfig) -> Task:
    """The lm task for ``cfg`` (see the module docstring)."""
    from phantomgrad.data.text import load_corpus
    from phantomgrad.models.transformer import PRESETS, DEQTransformer, TransformerConfig

    options = LMDataOptions.from_dict(dict(cfg.data_options))
    if cfg.model not in PRESETS:
        raise ConfigError(
            f"model {cfg.model!r} is not a DEQ transformer; for task=lm choose one of {', '.join(PRESETS)}"
        )
    if cfg.jac_reg_weight > 0 and cfg.jac_reg_freq == 0:
        log.warning(
            "jac_reg_weight=%g but jac_reg_freq=0: no Jacobian penalty will be added; set jac_reg_freq > 0",
            cfg.jac_reg_weight,
        )

    corpus = load_corpus(cfg.dataset, data_dir=cfg.data_dir)
    train_tokens = corpus.train if options.train_tokens is None else corpus.train[: options.train_tokens]
    valid_tokens, test_tokens = corpus.valid, corpus.test
    if options.eval_tokens is not None:
        valid_tokens, test_tokens = valid_tokens[: options.eval_tokens], test_tokens[: options.eval_tokens]
    try:
        train_set = LMChunks(train_tokens, options.seq_len)
        eval_sets = {"valid": LMChunks(valid_tokens, options.seq_len), "test": LMChunks(test_tokens, options.seq_len)}
    except ValueError as err:
        sizes = "/".join(str(len(t)) for t in (train_tokens, valid_tokens, test_tokens))
        raise ConfigError(
            f"data_options: {err} ({cfg.dataset} gives {sizes} train/valid/test tokens); lower seq_len, "
            "raise the token counts, or check that the corpus files are complete"
        ) from None

    arch = {"dropout": cfg.dropout, **arch_with_init_head(cfg, cfg.arch)}
    try:
        model_cfg = TransformerConfig.named(cfg.model, vocab_size=corpus.vocab_size, **arch)
    except TypeError as err:
        raise ConfigError(f"bad arch options for {cfg.model}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"bad arch options for {cfg.model}: {err}") from None
    if model_cfg.positions == "learned" and options.seq_len > model_cfg.max_len:
        raise ConfigError(
            f"data_options.seq_len={options.seq_len} exceeds arch.max_len={model_cfg.max_len} "
            "of the learned positions; raise arch.max_len or use arch.positions=sinusoidal"
        )
    model = DEQTransformer(model_cfg, solver=builders.build_solver(cfg), backward=builders.build_backward(cfg))
    vocab = corpus.vocab_size

    def step(model: nn.Module, batch, device: torch.device, global_step: int | None) -> StepResult:
        """One :class:`~phantomgrad.data.batch.Batch` of (B, L) inputs and targets (or the pair);
        global_step is None in evaluation; the solve starts at ``batch.start`` (None: the model's own).

        The forward goes through ``model(...)`` (which may be a DistributedDataParallel
        wrapper); the penalty and the radius use the wrapped model's methods. The metric sums are
        device tensors (no host sync; the trainer's Meter reads them once per logging interval),
        products with the token count formed in float64 as the host floats would be."""
        batch = as_batch(batch)
        inp, tgt = batch.inputs.to(device), batch.targets.to(device)
        inner = cast(DEQTransformer, getattr(model, "module", model))  # this task's model, maybe DDP-wrapped
        out = None
        if global_step is not None and global_step < cfg.pretrain_steps:
            with pretraining(model, cfg.pretrain_depth, cfg.solver_tol, cfg.solver_stop):
                logits, info = model(inp)
        else:
            out = model(inp, return_state=True, z0=batch.start)
            logits, info = out.logits, out.info
        loss = F.cross_entropy(logits.reshape(-1, vocab), tgt.reshape(-1))
        n = tgt.numel()
        sums: dict[str, float | Tensor] = {
            "loss": loss.detach().double() * n,
            "rel_residual": info.rel_residual.detach().float().mean().double() * n,
        }
        if global_step is not None:  # training: the same keys on every step, so every epoch has the same columns
            sums.update(radius_steps=0.0, spectral_radius=0.0)
            if out is not None and global_step % RADIUS_EVERY == 0:
                radius = inner.spectral_radius(out, iters=RADIUS_ITERS)
                sums.update(radius_steps=1.0, spectral_radius=radius.detach().mean())
        if global_step is not None and cfg.jac_reg_freq > 0:
            sums.update(jac_steps=0.0, jac_penalty=0.0)
            # _draw reads a CPU generator: no device sync
            if out is not None and _draw(cfg.seed, global_step) < cfg.jac_reg_freq:
                penalty = inner.jacobian_penalty(out)
                if cfg.jac_reg_weight > 0:
                    loss = loss + cfg.jac_reg_weight * penalty
                sums.update(jac_steps=1.0, jac_penalty=penalty.detach())
        return StepResult(loss, sums, n, info)

    log.info(
        "lm task: %s, vocabulary %d, %d train / %d valid / %d test chunks of %d tokens",
        cfg.dataset,
        vocab,
        len(train_set),
        len(eval_sets["valid"]),
        len(eval_sets["test"]),
        options.seq_len,
    )
    return Task(
        "lm",
        model,
        Indexed(train_set),  # items (input, target, chunk index)
        {name: Indexed(chunks) for name, chunks in eval_sets.items()},
        step,
        lm_metrics,
        collate=BatchCollate(),
        progress_keys=("loss", "bpc"),
        extra={"corpus": corpus, "data_options": options, "jacobian_penalty": "task"},  # added by step itself
    )


__all__ = ["LMDataOptions", "LMChunks", "lm_metrics", "build_lm_task", "RADIUS_ITERS", "RADIUS_EVERY"]
