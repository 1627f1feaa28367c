"""Swap the solve or the gradient of every DEQ layer of a model, for the length of a block.

A DEQ layer is a choice of solver (how z* is found) and backward mode (what gradient flows),
and a few training phases are just another choice of the two for a while:

* pretraining (MDEQ, the DEQ transformer): F as a weight-tied stack of ``depth`` layers
  trained by ordinary backpropagation, i.e. ``solver=pg.Unrolled(depth)``,
  ``backward=pg.Backprop()`` (:func:`pretraining`);
* the gradient monitor's exact reference: ``backward=pg.Implicit(...)``.

:func:`swap` is the one mechanism for both::

    with pg.swap(model, solver=pg.Unrolled(6), backward=pg.Backprop()):
        logits, info = model(x)          # every pg.DEQ inside model runs the unrolled stack

On exit (also on error) every layer gets its own solver and backward mode back. The model's
own forward runs unchanged, so wrappers such as DistributedDataParallel keep working.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, cast

from torch import nn

from .backward import Backprop, BackwardMode
from .deq import DEQ
from .solvers import Solver, Unrolled


def deq_layers(model: nn.Module) -> list[DEQ]:
    """Every :class:`phantomgrad.DEQ` inside ``model`` (the model itself included)."""
    return [m for m in model.modules() if isinstance(m, DEQ)]


@contextlib.contextmanager
def swap(model: nn.Module, solver: Solver | None = None, backward: BackwardMode | None = None) -> Iterator[list[DEQ]]:
    """Within the block every DEQ layer of ``model`` solves with ``solver`` and makes its gradient
    with ``backward`` (None keeps that layer's own); yields the layers. On exit each layer gets
    its own solver and backward mode back.

    Raises TypeError for an argument that is not a phantomgrad solver or backward mode, and
    ValueError when ``model`` holds no DEQ layer (the swap would silently do nothing).

    Examples:
        >>> import torch, phantomgrad as pg
        >>> from phantomgrad.models.toy import TanhMap
        >>> f = TanhMap(dim=6, in_dim=4, lipschitz=0.5, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        >>> z0 = torch.zeros(3, 6, dtype=torch.float64)
        >>> model = torch.nn.ModuleDict({"deq": pg.DEQ(f, warn_not_converged=False)})
        >>> with pg.swap(model, solver=pg.Unrolled(3), backward=pg.Backprop()) as layers:
        ...     z, info = model["deq"](x, z0)  # three weight-tied steps of F, differentiated by backprop
        >>> len(layers), int(info.nstep.max()), model["deq"].solver  # the layer's own solver is back
        (1, 3, Anderson(...))
    """
    if solver is not None and not isinstance(solver, Solver):
        raise TypeError(f"solver must be a phantomgrad solver such as pg.Unrolled(6), got {solver!r}")
    if backward is not None and not isinstance(backward, BackwardMode):
        raise TypeError(f"backward must be a phantomgrad backward mode such as pg.Backprop(), got {backward!r}")
    layers = deq_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no phantomgrad.DEQ layer: there is nothing to swap")
    saved = [(layer.solver, layer.backward_mode) for layer in layers]
    try:
        for layer in layers:
            if solver is not None:
                layer.solver = solver
            if backward is not None:
                layer.backward_mode = backward
        yield layers
    finally:
        for layer, (own_solver, own_backward) in zip(layers, saved):
            layer.solver, layer.backward_mode = own_solver, own_backward


def pretraining(
    model: nn.Module, depth: int, tol: float = 1e-4, stop: str = "rel"
) -> contextlib.AbstractContextManager:
    """``swap(model, solver=pg.Unrolled(depth, tol=tol, stop=stop), backward=pg.Backprop())``: within
    the block the model's forward is its pretraining phase, F applied as a weight-tied stack of
    ``depth`` layers from z0 and differentiated by backpropagation through them (as MDEQ and the
    DEQ transformer are pretrained). ``info`` then describes the last layer (the residual of its
    input, ``nstep = depth``; ``tol`` and ``stop`` only decide ``info.converged``)."""
    unrolled = Unrolled(depth, tol=tol, stop=cast(Literal["rel", "abs"], stop))  # Unrolled checks the value
    return swap(model, solver=unrolled, backward=Backprop())


__all__ = ["swap", "pretraining", "deq_layers"]
