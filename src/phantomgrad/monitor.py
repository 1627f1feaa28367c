"""Gradient quality: how close is the phantom gradient to the exact one, on the batch at hand?

After ``loss.backward()`` with a phantom backward mode (UPG, NPG, JFB...), ``p.grad`` holds the
phantom gradient g_phantom. :func:`gradient_quality` recomputes the loss on the *same* batch
with every DEQ layer's backward mode swapped for an exact one (``pg.Implicit``, Eq. 4 of the
paper), takes the exact gradient g_exact with ``torch.autograd.grad`` (so ``p.grad`` is left
as it was) and reports

    cosine     = <g_phantom, g_exact> / (||g_phantom|| ||g_exact||)
    norm_ratio = ||g_phantom|| / ||g_exact||

over all parameters, and again over the parameters of the DEQ layers alone (the maps F,
``*_deq``), where the phantom approximation enters most directly; plus an estimate of the
spectral radius rho(dF/dh) at the fixed point of that batch (power iteration with
vector-Jacobian products, as :func:`phantomgrad.spectral_radius`).

"The same batch" includes randomness: the caller passes the RNG state from just before the
training forward (``rng_state``), so dropout masks are redrawn identically. The RNG state and
the model's buffers (e.g. BatchNorm running statistics, updated by a forward in training mode)
are restored afterwards, so monitoring does not change the training run. Every swapped
backward mode is restored even when the recomputation raises.

The paper's Fig. 2 is the cosine of this kind along training; the norm ratio explains why SGD
sees a shorter step with a phantom gradient (see :class:`phantomgrad.train.monitor_callback.GradientMonitor`
for the optional rescaling by 1 / norm_ratio).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .backward import BackwardMode, Implicit
from .deq import DEQ
from .regularize import spectral_radius
from .swap import deq_layers, swap

log = logging.getLogger(__name__)

RNGState = tuple[Tensor, list[Tensor] | None]


@dataclass
class GradientQuality:
    """What :func:`gradient_quality` measured on one batch (plain floats; NaN where undefined).

    ``cosine``/``norm_ratio`` run over every parameter with a gradient, ``cosine_deq``/
    ``norm_ratio_deq`` over the parameters of the DEQ layers only. ``spectral_radius`` is the
    batch mean of the per-sample estimate of rho(dF/dh) at h* (the largest over DEQ layers),
    None when not asked for. ``reference_converged`` is the fraction of samples whose exact
    backward solve met its tolerance (None when the reference is not a solver-based mode):
    below 1, the "exact" gradient is itself approximate. ``seconds`` is the wall time spent.
    """

    cosine: float
    norm_ratio: float
    cosine_deq: float
    norm_ratio_deq: float
    phantom_norm: float
    exact_norm: float
    spectral_radius: float | None
    reference_converged: float | None
    reference_residual: float | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


deq_modules = deq_layers  # the one list of a model's DEQ layers (phantomgrad.swap)


@contextlib.contextmanager
def swapped_backward(model: nn.Module, mode: BackwardMode) -> Iterator[list[DEQ]]:
    """Within the block every DEQ layer of ``model`` uses ``mode``; on exit (also on error) each
    gets its own backward mode back: :func:`phantomgrad.swap` (the mechanism pretraining uses too)."""
    if not isinstance(mode, BackwardMode):
        raise TypeError(f"mode must be a phantomgrad backward mode such as pg.Implicit(), got {mode!r}")
    with swap(model, backward=mode) as layers:
        yield layers


def capture_rng_state(device: torch.device | str | None = None) -> RNGState:
    """The CPU generator's state, and every CUDA generator's when ``device`` is a CUDA device."""
    use_cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if use_cuda else None)


def _set_rng_state(state: RNGState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _preserved_state(model: nn.Module, rng_state: RNGState | None, device: torch.device | str | None) -> Iterator[None]:
    """Run the block from ``rng_state`` (if given) and leave the RNG and the model's buffers as they were."""
    cuda_in_use = rng_state is not None and rng_state[1] is not None
    before = capture_rng_state("cuda" if cuda_in_use else device)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if rng_state is not None:
            _set_rng_state(rng_state)
        yield
    finally:
        _set_rng_state(before)
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)


class _Recording(BackwardMode):
    """Delegates to ``inner`` and remembers what each DEQ layer handed it (for the spectral radius)."""

    def __init__(self, inner: BackwardMode):
        self.inner = inner
        self.calls: list[tuple[Callable[[Tensor], Tensor], Tensor, Any]] = []

    @property
    def differentiates_solver(self) -> bool:  # type: ignore[override]
        return self.inner.differentiates_solver

    def attach(self, fn, z_star, info):
        self.calls.append((fn, z_star.detach(), info))
        return self.inner.attach(fn, z_star, info)


def _norms(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[float, float, float]:
    """<a, b>, ||a||, ||b|| over lists of tensors, accumulated in float64."""
    dot = na = nb = 0.0
    for x, y in zip(a, b):
        x64, y64 = x.detach().double(), y.detach().double()
        dot += float((x64 * y64).sum())
        na += float(x64.pow(2).sum())
        nb += float(y64.pow(2).sum())
    return dot, math.sqrt(na), math.sqrt(nb)


def _cos_ratio(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[float, float, float, float]:
    dot, na, nb = _norms(a, b)
    cosine = dot / (na * nb) if na > 0 and nb > 0 else math.nan
    ratio = na / nb if nb > 0 else math.nan
    return cosine, ratio, na, nb


def gradient_quality(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    reference: BackwardMode | None = None,
    *,
    rng_state: RNGState | None = None,
    radius_iters: int = 10,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> GradientQuality:
    """Compare the phantom gradient in ``p.grad`` with the exact gradient on the same batch.

    Args:
        model: the model whose parameters hold the phantom gradient (after ``loss.backward()``).
            Every :class:`~phantomgrad.DEQ` inside it is switched to ``reference`` for the
            recomputation, then switched back.
        loss_fn: recomputes the scalar loss on the batch that produced ``p.grad``, e.g.
            ``lambda: F.cross_entropy(model(x)[0], y)``; the model must be in the same mode
            (training) as for the phantom gradient.
        reference: the exact backward mode (default ``pg.Implicit()``: Broyden, 30 steps,
            relative tolerance 1e-6). With a reference identical to the model's own mode the
            cosine is 1 and the ratio 1.
        rng_state: from :func:`capture_rng_state` just before the forward that made ``p.grad``,
            so dropout masks (and any other random draws in the forward) repeat exactly.
            Without it the current state is used (fine for models without randomness).
        radius_iters: power-iteration steps for rho(dF/dh) at h*; 0 skips it.
        reduce: applied to the exact gradients before comparing (e.g. an all-reduce mean under
            DistributedDataParallel, whose ``p.grad`` is already averaged over processes).

    Returns:
        a :class:`GradientQuality`. ``p.grad``, the backward modes, the RNG state and the
        model's buffers are as before the call, also when ``loss_fn`` raises.
    """
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require a gradient; nothing to compare")
    if all(p.grad is None for p in params):
        raise ValueError(
            "no phantom gradient in p.grad: call loss.backward() on the training loss before gradient_quality"
        )
    if radius_iters < 0:
        raise ValueError(f"radius_iters must be >= 0, got {radius_iters!r}")
    deq_ids = {id(p) for layer in deq_modules(model) for p in layer.parameters()}
    recorder = _Recording(reference if reference is not None else Implicit())
    device = params[0].device

    with _preserved_state(model, rng_state, device), swapped_backward(model, recorder):
        loss = loss_fn()
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}"
            )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        exact = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        if reduce is not None:
            exact = list(reduce(exact))
        radius = None
        if radius_iters and recorder.calls:
            radius = max(
                float(spectral_radius(lambda z, _x, fn=fn: fn(z), z, None, iters=radius_iters).float().mean())
                for fn, z, _ in recorder.calls
            )

    phantom = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    cosine, ratio, n_phantom, n_exact = _cos_ratio(phantom, exact)
    in_deq = [i for i, p in enumerate(params) if id(p) in deq_ids]
    if in_deq:
        cosine_deq, ratio_deq, _, _ = _cos_ratio([phantom[i] for i in in_deq], [exact[i] for i in in_deq])
    else:
        cosine_deq = ratio_deq = math.nan
    backward_infos = [info.backward for _, _, info in recorder.calls if getattr(info, "backward", None) is not None]
    converged = residual = None
    if backward_infos:
        converged = float(torch.cat([b.converged.float().reshape(-1) for b in backward_infos]).mean())
        residual = float(torch.cat([b.rel_residual.double().reshape(-1) for b in backward_infos]).mean())
    recorder.calls.clear()  # drop the closures (they hold the injection's graph)
    quality = GradientQuality(
        cosine,
        ratio,
        cosine_deq,
        ratio_deq,
        n_phantom,
        n_exact,
        radius,
        converged,
        residual,
        time.perf_counter() - start,
    )
    log.debug("gradient quality: %s", quality)
    return quality


__all__ = ["GradientQuality", "gradient_quality", "swapped_backward", "capture_rng_state", "deq_modules"]
