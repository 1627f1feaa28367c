"""Learned initial states: start the solve at g(x) instead of zeros, and train g to predict z*.

    deq = pg.DEQ(f, solver=..., backward=..., init=g)
    z, info = deq(x)                              # the solve starts at g(x) (a given z0 still wins)
    loss = task_loss(z) + w * info.init_loss      # trains g; nothing of it reaches f or x

An explicit network g that predicts the fixed point from the input lets the solver start close
to it: SkipDEQ (Pal, Edelman, Rackauckas, 2022) trains g(x) jointly with a loss ||g(x) - z*||^2
and reports 2.5x faster training; HyperDEQ's initialiser (Bai, Koltun, Kolter, "Neural Deep
Equilibrium Solvers", ICLR 2022) is the same idea with a relative loss. The auxiliary loss here is

    init_loss = mean_b ||g(x_b) - sg(z*_b)||^2 / max(||sg(z*_b)||^2, eps)

with sg the stop-gradient and the norms over all parts of a tuple state. Two choices make it reach
the parameters of g ONLY:

* z* is detached: the loss does not pull the equilibrium (nor F's parameters) towards g's guess;
* x is detached where it enters g: g learns to read the injection as it is, and the layers that
  compute x (a stem) are trained by the task's loss alone, not bent to make z* easy to predict.

The solve itself starts from g(x) detached: the backward modes' gradients are unchanged (none
of them differentiates through the starting state; ``pg.Backprop`` through the solver's
iterations starts from a constant).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

State = Tensor | tuple[Tensor, ...]

# relative distances of states with ||z*|| below this are measured against it instead (a zero z*)
_EPS = 1e-12


def detached(x: Any) -> Any:
    """``x`` with every tensor in it detached (tuples, lists and dicts are walked; other objects,
    e.g. ``None`` parts of MDEQ's injection or an adjacency wrapper, pass unchanged)."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(detached(p) for p in x)
    if isinstance(x, list):
        return [detached(p) for p in x]
    if isinstance(x, dict):
        return {k: detached(v) for k, v in x.items()}
    return x


def detach_state(z: State) -> State:
    """A tensor or a tuple of tensors, detached."""
    return tuple(p.detach() for p in z) if isinstance(z, (tuple, list)) else z.detach()


def relative_distance(guess: Tensor, target: Tensor) -> Tensor:
    """mean_b ||guess_b - target_b||^2 / max(||target_b||^2, eps) of two (B, D) tensors; the
    target is detached (see the module docstring), the result a scalar in target's dtype."""
    target = target.detach()
    err = (guess.to(target.dtype) - target).pow(2).sum(1)
    return (err / target.pow(2).sum(1).clamp_min(_EPS)).mean()


def initial_state(
    init: Callable[[Any], State] | None, x: Any, z0: State | Callable[[State | None], State] | None
) -> tuple[State, State | None]:
    """Where the solve starts, and g(x) (None without ``init``).

    ``z0`` may be a state (it wins), None (start at g(x), detached), or a start provider
    ``z0(default) -> state`` called with g(x) detached (or None without ``init``), e.g.
    :meth:`phantomgrad.FixedPointCache.start`, which keeps the rows it has no state for.
    """
    guess = init(detached(x)) if init is not None else None
    default = detach_state(guess) if guess is not None else None
    if z0 is not None and callable(z0) and not isinstance(z0, (Tensor, tuple, list)):
        z0 = z0(default)
    if z0 is None:
        if default is None:
            raise ValueError(
                "no starting state: call deq(x, z0) with z0 shaped like f's output (e.g. zeros), "
                "or build the layer with init=g, a module predicting it from x"
            )
        z0 = default
    return z0, guess


def model_start(z0: Any, zeros: State, layer: Any) -> Any:
    """The ``z0`` a model passes to its DEQ ``layer`` when its own start would be ``zeros``: ``z0`` as
    given (a state, or a start provider); None when ``z0`` is None and the layer has an ``init`` (the
    solve starts at g(x)); ``zeros`` when neither; a start provider is called with ``zeros`` here
    when the layer has no ``init`` (with one, the layer calls it with g(x))."""
    has_init = getattr(layer, "init", None) is not None
    if z0 is None:
        return None if has_init else zeros
    if not has_init and callable(z0) and not isinstance(z0, (Tensor, tuple, list)):
        return z0(zeros)
    return z0


__all__ = ["detached", "detach_state", "relative_distance", "initial_state", "model_start"]
