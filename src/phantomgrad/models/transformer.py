"""A weight-tied deep equilibrium transformer language model.

The DEQ transformer of Bai, Kolter, Koltun, "Deep Equilibrium Models" (NeurIPS 2019),
in the two flavours the phantom-gradient paper (Geng et al., NeurIPS 2021, Table 3)
trains: PostLN, and PreLN with Jacobian regularisation (Bai, Koltun, Kolter,
"Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021). Written
from the papers; nothing is copied from their code.

Data path, for tokens of shape (B, L)::

    x = E[tokens] * sqrt(d) + P          token embedding plus positions, (B, L, d)
    u = W_u drop(x) + b_u                the input injection, (B, L, 3d)
    z* = F(z*, u)                        solved by pg.DEQ from z0 = 0, (B, L, d)
    logits = norm_out(drop(z*)) E^T + c  tied output embedding, (B, L, V)

The equilibrium map F (:class:`TransformerBlock`) is one causal transformer block.
As in the DEQ transformer, the injection enters through the attention's query, key
and value projections, ``[q, k, v] = W_qkv s + u``, where s is the block's
normalised or raw state; attention is causal (position t sees positions <= t only),
so every logit at position t is a function of tokens[:t+1] alone, and so is the
fixed point: F is causal, hence the solve's iterates are, hence z* is. With
``A(s; u) = W_o softmax(mask(q k^T / sqrt(d_h))) v`` (per head) and
``FF(s) = W_2 drop(GELU(W_1 s + b_1)) + b_2``:

* PostLN (LayerNorm after each residual)::

      a    = LN_1(z + drop(A(z; u)))
      F(z) = LN_2(a + drop(FF(a)))

* PreLN (LayerNorm on each sub-layer's input)::

      a    = z + drop(A(LN_1(z); u))
      n    = LN_2(a)
      F(z) = n + drop(FF(n))

  The feed-forward residual starts from the normalised n, not from a, as in the
  DEQ transformer's pre-LN variant: with a plain identity path ``F(z) = z + g(z)``
  every fixed point would be a root of g, the Jacobian would be I + dg/dz, and F
  could never be a contraction. With it, ||F(z)|| stays bounded, but F is still
  further from a contraction than PostLN's map, which is why the papers pair PreLN
  with Jacobian regularisation. A final LayerNorm (``final_norm``, on by default for
  PreLN) normalises z* before the tied output layer.

Other choices:

* Weight norm (``torch.nn.utils.parametrizations.weight_norm``, dim 0) on the four
  linear maps of F (W_qkv, W_o, W_1, W_2), as in the DEQ transformer. Within one
  forward the normalised weights are computed once (``parametrize.cached``).
* Dropout inside F is :class:`~phantomgrad.nn.seq_dropout.VariationalSeqDropout`:
  one mask per sample and feature, drawn at the start of every model forward and
  used unchanged by every solver iteration, by the backward mode's steps (UPG's
  unrolled steps, NPG's or Implicit's vector-Jacobian products) and by the Jacobian
  penalty of that forward. The embedding and the equilibrium state before the head
  get the same kind of dropout.
* Positions: fixed sinusoids (default) or a learned table of ``max_len`` rows, added
  to the embedding, hence part of the injection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm

from ..backward import BackwardMode
from ..deq import DEQ, DEQInfo
from ..init import model_start
from ..nn.seq_dropout import VariationalSeqDropout
from ..regularize import jacobian_penalty as _jacobian_penalty
from ..regularize import spectral_radius as _spectral_radius
from ..solvers import Solver

# ----------------------------------------------------------------------------- config

PRESETS: dict[str, dict[str, Any]] = {
    # for tests and smoke runs (14K parameters with a 63-character vocabulary)
    "deq-transformer-tiny": dict(d_model=32, n_heads=2, d_ff=64),
    # the CPU-scale Table 3 model of `phantomgrad lm-table` (67K parameters)
    "deq-transformer-small": dict(d_model=64, n_heads=4, d_ff=256),
    # a larger default for longer runs (257K parameters)
    "deq-transformer": dict(d_model=128, n_heads=4, d_ff=512),
}


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a :class:`DEQTransformer` (plain data; build one with :meth:`named`).

    Args:
        vocab_size: number of token ids.
        d_model: width d of the state, embedding and injection (3d).
        n_heads: attention heads; d_model must be divisible by it.
        d_ff: inner width of the feed-forward sub-layer.
        norm: ``"post"`` (PostLN) or ``"pre"`` (PreLN); see the module docstring.
        positions: ``"sinusoidal"`` (fixed) or ``"learned"`` (a table of max_len rows).
        max_len: longest sequence accepted with learned positions.
        dropout: variational dropout probability (embedding, inside F, before the head).
        weight_norm: weight-normalise the linear maps of F.
        tie_weights: the output layer reuses the token embedding (logits = h E^T + c).
        final_norm: LayerNorm on z* before the output layer; None means on for PreLN
            and off for PostLN (whose z* is already a LayerNorm output).
        init_head: give the DEQ a learned initial state (:class:`TransformerInitHead`, a
            position-wise two-layer MLP of the injection): the solve starts at its guess of z*,
            ``info.init_loss`` trains it (the trainer's ``warm_start=learned`` turns this on).
    """

    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    norm: str = "post"
    positions: str = "sinusoidal"
    max_len: int = 1024
    dropout: float = 0.0
    weight_norm: bool = True
    tie_weights: bool = True
    final_norm: bool | None = None
    init_head: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be an integer >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}; "
                "change one of them (e.g. arch.n_heads=4)"
            )
        if self.norm not in ("post", "pre"):
            raise ValueError(f"TransformerConfig.norm must be 'post' (PostLN) or 'pre' (PreLN), got {self.norm!r}")
        if self.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"TransformerConfig.positions must be 'sinusoidal' or 'learned', got {self.positions!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("weight_norm", "tie_weights", "init_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TransformerConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.final_norm is not None and not isinstance(self.final_norm, bool):
            raise ValueError(f"TransformerConfig.final_norm must be true, false or null, got {self.final_norm!r}")

    @property
    def use_final_norm(self) -> bool:
        return self.norm == "pre" if self.final_norm is None else self.final_norm

    @classmethod
    def named(cls, name: str, vocab_size: int, **overrides: Any) -> "TransformerConfig":
        """A preset (see :data:`PRESETS`) for ``vocab_size`` tokens, with fields overridden
        by keyword (e.g. ``norm="pre"``). An unknown keyword raises TypeError naming it
        and the valid fields, a bad value ValueError."""
        try:
            preset = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown DEQ transformer config {name!r}; choose one of {sorted(PRESETS)}") from None
        fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown TransformerConfig field(s) {unknown}; valid fields are {sorted(fields)}")
        return cls(vocab_size=vocab_size, **{**preset, **overrides})


# ----------------------------------------------------------------------------- F


def _linear(d_in: int, d_out: int, weight_norm: bool, bias: bool = True) -> nn.Linear:
    """A linear map, weight-normalised per output unit (w = g v / ||v||) when asked."""
    layer = nn.Linear(d_in, d_out, bias=bias)
    return _torch_weight_norm(layer, name="weight", dim=0) if weight_norm else layer


def causal_mask(length: int, device: torch.device) -> Tensor:
    """(L, L) boolean mask, True where position i must not see position j (j > i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class TransformerBlock(nn.Module):
    """The equilibrium map F(z, u) of the DEQ transformer: one causal self-attention +
    feed-forward block with the injection u added to the q, k, v projections (see the
    module docstring for the PostLN and PreLN formulas).

    ``forward(z, u)``: z of shape (B, L, d), u of shape (B, L, 3d); returns (B, L, d).
    Attention is written out (not ``F.scaled_dot_product_attention``) so that it has
    the double backward the Jacobian penalty needs.

    With dropout > 0 in training, call :meth:`reset_dropout` once per model forward
    before the first evaluation (:class:`DEQTransformer` does).
    """

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, norm: str = "post", dropout: float = 0.0, weight_norm: bool = True
    ):
        super().__init__()
        if norm not in ("post", "pre"):
            raise ValueError(f"norm must be 'post' or 'pre', got {norm!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.norm = d_model, n_heads, norm
        self.qkv = _linear(d_model, 3 * d_model, weight_norm, bias=False)  # the injection supplies the offset
        self.out = _linear(d_model, d_model, weight_norm)
        self.ff1 = _linear(d_model, d_ff, weight_norm)
        self.ff2 = _linear(d_ff, d_model, weight_norm)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.drop_attn = VariationalSeqDropout(dropout)
        self.drop_hidden = VariationalSeqDropout(dropout)
        self.drop_ff = VariationalSeqDropout(dropout)

    def reset_dropout(self, like: Tensor) -> None:
        """Draw every dropout mask of F for states shaped like ``like`` (B, L, d)."""
        self.drop_attn.reset(like)
        self.drop_ff.reset(like)
        self.drop_hidden.reset(like.new_empty(like.shape[0], 1, self.ff1.out_features))

    def attention(self, s: Tensor, u: Tensor) -> Tensor:
        """Causal multi-head attention A(s; u) with [q, k, v] = W_qkv s + u."""
        b, length, d = s.shape
        h = self.n_heads
        qkv = (self.qkv(s) + u).view(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d_h)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        scores = scores.masked_fill(causal_mask(length, s.device), float("-inf"))
        mixed = scores.softmax(dim=-1) @ v  # (B, H, L, d_h)
        return self.out(mixed.transpose(1, 2).reshape(b, length, d))

    def feed_forward(self, s: Tensor) -> Tensor:
        return self.ff2(self.drop_hidden(F.gelu(self.ff1(s))))

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        if z.dim() != 3 or z.shape[-1] != self.d_model or u.shape[:2] != z.shape[:2] or u.shape[-1] != 3 * self.d_model:
            raise ValueError(
                f"TransformerBlock expects z of shape (B, L, {self.d_model}) and u of shape "
                f"(B, L, {3 * self.d_model}), got {tuple(z.shape)} and {tuple(u.shape)}"
            )
        if self.norm == "post":
            a = self.ln1(z + self.drop_attn(self.attention(z, u)))
            return self.ln2(a + self.drop_ff(self.feed_forward(a)))
        a = z + self.drop_attn(self.attention(self.ln1(z), u))
        n = self.ln2(a)
        return n + self.drop_ff(self.feed_forward(n))


def sinusoids(length: int, d_model: int, device: torch.device | None = None, dtype=torch.float32) -> Tensor:
    """Fixed positions P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(t / 10000^(2i/d)), shape (L, d)."""
    t = torch.arange(length, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, device=device, dtype=torch.float64) / d_model)
    table = torch.zeros(length, d_model, device=device, dtype=torch.float64)
    table[:, 0::2] = torch.sin(t * freq)
    table[:, 1::2] = torch.cos(t * freq)[:, : d_model // 2]
    return table.to(dtype)


# ----------------------------------------------------------------------------- the model


@dataclass
class LMOutput:
    """What :meth:`DEQTransformer.solve` returns: the logits, the solve's info, and the
    inputs of a Jacobian penalty at the fixed point (z is the state the head saw: h*, or
    UPG's h_k in training; ``injection`` is u with its graph to the embedding)."""

    logits: Tensor
    info: DEQInfo
    z: Tensor
    injection: Tensor


class TransformerInitHead(nn.Module):
    """A learned initial state of the DEQ transformer: g(u) = W_2 GELU(W_1 u + b_1) + b_2 per
    position, from the injection u (B, L, 3d) to a guess of z* (B, L, d). Position-wise, so it
    sees no other token: it predicts the part of z* that the token and its position decide."""

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, u: Tensor) -> Tensor:
        return self.net(u)


class DEQTransformer(nn.Module):
    """Weight-tied DEQ transformer language model (see the module docstring).

    ``forward(tokens)`` takes ids of shape (B, L) and returns ``(logits, info)``:
    logits (B, L, V) where position t predicts token t + 1 from tokens[:t+1], and the
    forward solve's :class:`~phantomgrad.deq.DEQInfo` (per sequence). Any phantomgrad
    backward mode works: the model only calls ``pg.DEQ``.

    Jacobian regularisation: ``out = model.solve(tokens)`` returns the logits together
    with z* and u; ``model.jacobian_penalty(out)`` is the Hutchinson estimate of
    ||dF/dz||_F^2 / (L d) at z* (differentiable), ``model.spectral_radius(out)`` a
    power-iteration estimate of rho(dF/dz) per sequence. Both evaluate F with the
    dropout masks of that forward.

    Args:
        config: the architecture, e.g. ``TransformerConfig.named("deq-transformer-tiny", vocab_size=63)``.
        solver: forward solver (``pg.DEQ``'s default when None).
        backward: backward mode (``pg.DEQ``'s default when None).
    """

    def __init__(self, config: TransformerConfig, solver: Solver | None = None, backward: BackwardMode | None = None):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(
                f"config must be a TransformerConfig (e.g. TransformerConfig.named(...)), got {type(config).__name__}"
            )
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=d**-0.5)  # x = E[t] sqrt(d) has unit-variance entries
        self.pos: nn.Parameter | None
        if config.positions == "learned":
            self.pos = nn.Parameter(torch.zeros(config.max_len, d))
            nn.init.normal_(self.pos, std=0.02)
        else:
            self.pos = None
        self.drop_in = VariationalSeqDropout(config.dropout)
        self.inject = nn.Linear(d, 3 * d)
        block = TransformerBlock(d, config.n_heads, config.d_ff, config.norm, config.dropout, config.weight_norm)
        init = TransformerInitHead(d) if config.init_head else None
        self.deq = DEQ(block, solver=solver, backward=backward, init=init)  # F at self.deq.f, init head at .init
        self.drop_out = VariationalSeqDropout(config.dropout)
        self.norm_out: nn.Module = nn.LayerNorm(d) if config.use_final_norm else nn.Identity()
        self.decoder: nn.Linear | None
        self.out_bias: nn.Parameter | None
        if config.tie_weights:
            self.decoder = None
            self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        else:
            self.decoder = nn.Linear(d, config.vocab_size)
            self.out_bias = None

    @property
    def block(self) -> TransformerBlock:
        """The equilibrium map F."""
        return cast(TransformerBlock, self.deq.f)

    # ---- pieces ------------------------------------------------------------------------
    def injection(self, tokens: Tensor) -> Tensor:
        """u = W_u drop(E[tokens] sqrt(d) + P) + b_u, shape (B, L, 3d); redraws the embedding dropout mask."""
        cfg = self.config
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"DEQTransformer expects integer token ids of shape (B, L), got {tuple(tokens.shape)} {tokens.dtype}"
            )
        length = tokens.shape[1]
        x = self.embed(tokens) * math.sqrt(cfg.d_model)
        if self.pos is not None:
            if length > cfg.max_len:
                raise ValueError(
                    f"sequence length {length} exceeds max_len={cfg.max_len} of the learned positions; "
                    f"raise arch.max_len or use arch.positions=sinusoidal"
                )
            x = x + self.pos[:length]
        else:
            x = x + sinusoids(length, cfg.d_model, tokens.device, x.dtype)
        self.drop_in.reset(x)
        return self.inject(self.drop_in(x))

    def head(self, z: Tensor) -> Tensor:
        """logits = norm_out(drop(z)) E^T + c (tied) or a separate linear decoder."""
        h = self.norm_out(self.drop_out(z))
        if self.decoder is not None:
            return self.decoder(h)
        return F.linear(h, self.embed.weight, self.out_bias)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """The context one forward (:meth:`prepare`, ``self.deq``, :meth:`head`) runs in:
        ``parametrize.cached()``, so the weight-normalised weights of F are computed once per
        forward and reused by every evaluation of F. Code that drives the pieces itself
        (``phantomgrad bench``) enters it as :meth:`solve` does."""
        return parametrize.cached()

    def prepare(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Everything before the DEQ: the injection u (B, L, 3d), z0 = 0 (B, L, d) and fresh
        dropout masks for this forward. Returns ``(u, z0)``; the forward is then
        ``z, info = self.deq(u, z0)`` and ``logits = self.head(z)``, all inside
        :meth:`forward_context`.

        Inside ``parametrize.cached()`` it first computes the weight-normalised weights of F,
        with autograd as the caller has it, so that the cache holds weights with a graph to g
        and v even though the solver then runs under ``no_grad`` (a weight first computed
        there would be cached without one, and the backward mode's gradient would never
        reach the weight-norm parameters).
        """
        for module in self.block.modules():
            if parametrize.is_parametrized(module, "weight"):
                module.weight  # noqa: B018 (fills the cache)
        u = self.injection(tokens)
        z0 = u.new_zeros(tokens.shape[0], tokens.shape[1], self.config.d_model)
        self.block.reset_dropout(z0)
        self.drop_out.reset(z0)
        return u, z0

    # ---- forward -----------------------------------------------------------------------
    def solve(self, tokens: Tensor, z0: Any = None) -> LMOutput:
        """The full forward: logits, the solve's info, the state z and the injection u. ``z0``:
        where the solve starts (None: zeros, or the init head's guess; a (B, L, d) state; or a
        start provider such as :meth:`phantomgrad.FixedPointCache.start`)."""
        with self.forward_context():  # weight norm computed once per forward, reused by every F evaluation
            u, zeros = self.prepare(tokens)
            z, info = self.deq(u, model_start(z0, zeros, self.deq))
            logits = self.head(z)
        return LMOutput(logits, info, z, u)

    def forward(self, tokens: Tensor, return_state: bool = False, z0: Any = None) -> tuple[Tensor, DEQInfo] | LMOutput:
        """``(logits, info)``; with ``return_state=True`` the :class:`LMOutput` of :meth:`solve`
        (a keyword rather than a method, so that it also goes through wrappers such as
        DistributedDataParallel). Pretraining, F as a weight-tied stack trained by backprop, is
        this forward with the DEQ's solve and gradient swapped:
        ``with pg.pretraining(model, depth): logits, info = model(tokens)``. ``z0``: see :meth:`solve`."""
        out = self.solve(tokens, z0)
        return out if return_state else (out.logits, out.info)

    # ---- Jacobian regularisation and diagnostics ---------------------------------------
    def jacobian_penalty(self, out: LMOutput, n_samples: int = 1) -> Tensor:
        """Hutchinson estimate of ||dF/dz||_F^2 / (L d) at ``out.z`` (batch mean),
        differentiable in the parameters of F and in the injection (hence the embedding):
        E_eps ||eps^T J||^2 = ||J||_F^2 for eps ~ N(0, I). The regulariser of Bai, Koltun,
        Kolter (2021); see :func:`phantomgrad.jacobian_penalty`."""
        return _jacobian_penalty(self.block, out.z.detach(), out.injection, n_samples=n_samples)

    def spectral_radius(self, out: LMOutput, iters: int = 10) -> Tensor:
        """Per-sequence power-iteration estimate of rho(dF/dz) at ``out.z`` (no gradient), shape (B,)."""
        return _spectral_radius(self.block, out.z.detach(), out.injection.detach(), iters=iters)


__all__ = [
    "PRESETS",
    "TransformerConfig",
    "TransformerBlock",
    "TransformerInitHead",
    "DEQTransformer",
    "LMOutput",
    "sinusoids",
    "causal_mask",
]
