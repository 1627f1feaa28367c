"""Instruments of the bench: a clock, a window on the DEQ layer's backward, and wrappers on F
that count or time its evaluations."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn


def parts(z: Any) -> list[Tensor]:
    if isinstance(z, Tensor):
        return [z]
    if isinstance(z, (tuple, list)):
        return [p for q in z for p in parts(q)]
    return []


class Clock:
    """Wall clock that synchronises CUDA before reading."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class BackwardWindow:
    """Times the DEQ layer's backward: from the moment the gradient of its output is
    complete (the last output part's hook) to the moment the injection's gradient is
    complete (the last input part's hook). The CPU autograd engine runs in the calling
    thread, so these hooks fire in order."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.start = self.end = math.nan

    def arm(self, outputs: Any, inputs: Any) -> None:
        self.start = self.end = math.nan
        for t in parts(outputs):
            if t.requires_grad:
                t.register_hook(self._on_output)
        for t in parts(inputs):
            if t.requires_grad:
                t.register_hook(self._on_input)

    def _on_output(self, grad: Tensor) -> None:
        now = self.clock()
        self.start = now if math.isnan(self.start) else max(self.start, now)

    def _on_input(self, grad: Tensor) -> None:
        now = self.clock()
        self.end = now if math.isnan(self.end) else max(self.end, now)

    @property
    def elapsed(self) -> float:
        return self.end - self.start


class _CountVJP(torch.autograd.Function):
    """Identity on F's output that counts the backward passes through it."""

    @staticmethod
    def forward(ctx, counter: "FCounter", *tensors: Tensor):
        ctx.counter = counter
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        ctx.counter.vjp += 1
        return (None, *grads)


class _ForwardWrapper:
    """Wraps the ``forward`` of one module instance while installed: ``install()`` puts
    ``self._wrap(original_forward)`` on the instance, ``remove()`` restores the class's."""

    module: nn.Module

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def install(self):
        self.module.forward = self._wrap(self.module.forward)
        return self

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class FCounter(_ForwardWrapper):
    """Counts evaluations of F (a module) by phase, and backward passes through them.

    ``install()`` wraps the module instance's ``forward``; ``remove()`` restores it. Used
    in a counting pass of its own, never while timing (the wrapper copies F's output).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.phase = "forward"
        self.calls: dict[str, int] = {}
        self.vjp = 0

    def reset(self) -> None:
        self.calls, self.vjp, self.phase = {}, 0, "forward"

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.calls[self.phase] = self.calls.get(self.phase, 0) + 1
            parts = list(out) if isinstance(out, (tuple, list)) else [out]
            if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
                parts = list(_CountVJP.apply(self, *parts))
                return type(out)(parts) if isinstance(out, (tuple, list)) else parts[0]
            return out

        return counted


class FTimer(_ForwardWrapper):
    """Accumulates the wall time spent inside F (a module) while installed, so a solve's
    overhead is measured against the F evaluations of the same run (immune to drift
    between separate measurements). Synchronises CUDA around each call."""

    def __init__(self, module: nn.Module, clock: Clock):
        self.module, self.clock = module, clock
        self.seconds, self.calls = 0.0, 0

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = self.clock()
            out = original(*args, **kwargs)
            self.seconds += self.clock() - t0
            self.calls += 1
            return out

        return timed


__all__ = ["parts", "Clock", "BackwardWindow", "FCounter", "FTimer"]
