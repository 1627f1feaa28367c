"""The reversible fixed-point solver of RevDEQ (McCallum, Arora, Foster, 2025).

Two coupled states start at y_0 = z_0 and step, with a relaxation beta in (0, 2),

    y_{n+1} = (1 - beta) y_n + beta F(z_n),
    z_{n+1} = (1 - beta) z_n + beta F(y_{n+1}).

Each step is algebraically invertible,

    z_n = (z_{n+1} - beta F(y_{n+1})) / (1 - beta),
    y_n = (y_{n+1} - beta F(z_n)) / (1 - beta),

so backpropagation through every step (``pg.Backprop()``) can rebuild the states on its way back
instead of storing them: the exact gradient of the iteration, for a memory that does not depend on
the number of steps (two states and one evaluation of F at a time).

Numerical limits. The reversal divides by 1 - beta, and it runs a contracting iteration backwards,
which expands: a rounding error in the rebuilt states grows by up to about 1 / |1 - beta| per step
(the determinant of one step's Jacobian is (1 - beta)^2 per dimension). beta = 1 is singular and is
refused, as is any beta with |1 - beta| < ``MIN_GAP``. The tests check the gradient to 1e-8 relative
in float64 for beta in [0.2, 0.7] over 20 steps and in [1.2, 1.5] over 10 steps on a contraction;
docs/methods.md gives the measured error for other beta and step counts. In float32 keep the step
count small and beta well away from 1, or expect the gradient to drift.

The start y_0 = z_0 is kept, so the last reversed step is evaluated at the exact start: a map
whose Jacobian is huge there (MDEQ's group norms at z_0 = 0 amplify a 1e-15 error in the rebuilt
z_0 to 1e-5 in F(z_0)) would otherwise spoil the gradient.

Per-sample stopping. Every sample runs the same number of steps (a ``lockstep`` solver of the one
loop): the loop stops once every sample meets the tolerance (the host looks every ``check_every``
steps, as for every solver; ``None`` runs all max_iter // 2 steps), so the reversal needs no
per-sample bookkeeping.
The returned state is the last y (its residual F(y) - y comes free with the step), not the best
iterate seen, since the gradient is that of the last step.

F must be deterministic (no fresh dropout mask per call; a mask fixed per batch is fine): the
backward pass evaluates it again at the rebuilt states.

How the gradient reaches F's parameters and x: the solver is handed only the closure F, so it
evaluates F(z_0) once under a TorchFunctionMode that records the tensors requiring grad that F
reads without making them (its parameters, x, a cached weight), and passes them to the
autograd Function that :meth:`Reversible.finish` attaches to the last iterate (the iteration
itself runs in the one loop, with F evaluated without a graph); their gradients are the sums of
the vector-Jacobian products at the rebuilt states. A walk of that evaluation's graph checks that
no other path leads to a leaf, so a tensor F reads past torch's function dispatch is a one-line
error, not a lost gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import in_range
from .._reads import ReadRecorder, unseen_leaf
from .base import Solver
from .loop import FlatFn, Loop

MIN_GAP = 0.05  # smallest |1 - beta| accepted: the reversal divides by it once per step


def _check_beta(beta: float) -> float:
    beta = in_range("beta", beta, 0.0, 2.0, high_open=True)
    if abs(1 - beta) < MIN_GAP:
        raise ValueError(
            f"beta={beta!r} is too close to 1: the reversal divides by 1 - beta; use |1 - beta| >= {MIN_GAP}"
        )
    return float(beta)


def _graph_counter() -> int:
    """The sequence number the next autograd node will get, less one (numbers grow per thread)."""
    with torch.enable_grad():
        node = (torch.zeros((), requires_grad=True) * 1).grad_fn
        assert node is not None  # a product with a tensor that requires grad always records a node
        return node._sequence_nr()


def _check_complete(out: Tensor, start: Tensor, inputs: list[Tensor], before: int) -> None:
    """Fail unless every path from ``out`` = F(start) back to a tensor made before F was called
    (graph counter ``before``) ends at one of ``inputs``: otherwise F read a tensor in a way the
    probe could not see, and its gradient would be lost."""

    def unseen(shape) -> RuntimeError:
        return RuntimeError(
            f"pg.Reversible could not see how F reads a tensor of shape {tuple(shape)}; "
            "let F read its parameters and inputs through torch operations"
        )

    for t in inputs:
        if t.grad_fn is not None and t.grad_fn._sequence_nr() > before:  # made inside F: not an input
            raise unseen(t.shape)
    leaf = unseen_leaf(out, start, inputs)
    if leaf is not None:
        raise unseen(leaf.shape)


class _ReverseSolve(torch.autograd.Function):
    """Attaches the reversal to the last iterate of a solve run without a graph (the one loop, with
    F evaluated under ``no_grad``): its backward rebuilds the states step by step.

    Inputs: the solver, F, the number of coupled steps, the start z_0 (= y_0), the last y and z, and
    the tensors F reads (``inputs``), whose gradients are the sums over the steps of the
    vector-Jacobian products at the rebuilt states. The output is y (the value unchanged).
    """

    @staticmethod
    def forward(ctx, solver, fn, steps, z0, y, z, *inputs):
        ctx.solver, ctx.fn, ctx.steps = solver, fn, steps
        ctx.save_for_backward(z0, y, z, *inputs)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # True in a backward exactly when create_graph=True
            raise RuntimeError(
                "pg.Reversible's memory-free backward gives a first-order gradient only (create_graph=True); "
                "for higher orders use pg.Implicit() with another solver, or pg.Backprop() with pg.FixedPoint"
            )
        z0, y, z, *inputs = ctx.saved_tensors
        fn, b, steps = ctx.fn, ctx.solver.beta, ctx.steps
        a = 1.0 - b
        # adjoints of (y_{n+1}, z_{n+1}); the output is y_N, so z_N's adjoint starts at zero
        ay, az = grad_y, torch.zeros_like(grad_y)
        total = [None] * len(inputs)

        def vjp(state: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor | None]:
            """F(state), and (J_state^T v) with J_inputs^T v added to ``total`` (v scaled by beta)."""
            leaf = state.detach().requires_grad_()
            with torch.enable_grad():
                out = fn(leaf)
            if v is None:
                return out.detach(), None
            grads = torch.autograd.grad(out, [leaf, *inputs], b * v, allow_unused=True)
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    total[i] = g if total[i] is None else total[i] + g
            return out.detach(), grads[0]

        for n in range(steps):
            # z_{n+1} = a z_n + b F(y_{n+1})
            fy, jy = vjp(y, None if n == 0 else az)  # the last step's z does not reach the output
            if jy is not None:
                ay = ay + jy
            z = (z - b * fy) / a if n < steps - 1 else z0  # the start is known: no rounding in it
            az = a * az
            # y_{n+1} = a y_n + b F(z_n)
            fz, jz = vjp(z, ay)
            az = az + jz
            y = (y - b * fz) / a if n < steps - 1 else z0
            ay = a * ay
        # y_0 = z_0: the start's adjoint is the sum (the DEQ layer detaches z0, so it is usually unused)
        return None, None, None, ay + az, None, None, *total


@dataclass
class _ReversibleState:
    z: Tensor  # the z chain (the loop iterates on y)
    fn: FlatFn  # F itself (the loop may evaluate it without a graph)
    start: Tensor  # z_0 = y_0
    inputs: list[Tensor]  # the tensors F reads that need a gradient: the reversal is attached for them


class Reversible(Solver):
    """RevDEQ's algebraically reversible coupled iteration (see the module docstring).

    Args:
        beta: relaxation in (0, 2), |1 - beta| >= ``MIN_GAP`` (see the numerical limits above).
        max_iter: largest number of evaluations of F; each step takes two, so at most max_iter // 2 steps.
        tol, stop, trace, check_every: as for every solver; the residual is that of y_n, ||F(y_n) - y_n||.

    With ``pg.Backprop()`` the gradient is that of every step, by reversal (memory independent of
    max_iter); with any other backward mode it is a plain solver. Inside ``torch.compile`` the
    reversal is not used: autograd stores the steps (memory grows with max_iter).

    Examples:
        >>> import torch, phantomgrad as pg
        >>> from phantomgrad.models.toy import TanhMap
        >>> f = TanhMap(dim=6, in_dim=4, lipschitz=0.5, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        >>> z0 = torch.zeros(3, 6, dtype=torch.float64)
        >>> def grad(solver, backward):  # d/dW of sum(z) through the layer
        ...     f.zero_grad()
        ...     z, info = pg.DEQ(f, solver=solver, backward=backward, warn_not_converged=False)(x, z0)
        ...     z.sum().backward()
        ...     return f.W.grad.clone()
        >>> exact = grad(pg.Anderson(max_iter=50, tol=1e-12), pg.Implicit(pg.Broyden(max_iter=50, tol=1e-12)))
        >>> reversible = grad(pg.Reversible(beta=0.5, max_iter=120, tol=1e-12), pg.Backprop())  # rebuilt, not stored
        >>> torch.allclose(reversible, exact, rtol=1e-8, atol=1e-12)
        True
    """

    beta: float = 0.5
    fused: bool = field(default=False, init=False)  # the lockstep bookkeeping has no fused form

    lockstep: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_iter < 2:
            raise ValueError(
                f"max_iter must be >= 2 for pg.Reversible (each step evaluates F twice), got {self.max_iter}"
            )
        self.beta = _check_beta(self.beta)

    def init(self, loop: Loop, z0: Tensor) -> tuple[_ReversibleState, Tensor]:
        """F(z_0) (recording, where autograd records, the tensors F reads) and y_1 = (1 - beta) z_0 + beta F(z_0)."""
        if loop.keep:
            raise ValueError(
                "pg.Reversible does not return intermediate states (keep=...); use another solver for them"
            )
        fn = loop.fn
        z0 = z0.detach()
        inputs: list[Tensor] = []
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            # Inside torch.compile the probe (a TorchFunctionMode) cannot be traced: autograd records
            # the steps instead (the same gradient up to rounding, memory growing with the steps).
            f0 = fn(z0)
        else:
            start = z0.detach().requires_grad_()  # a fresh leaf: what F makes from it is told apart from its inputs
            before = _graph_counter()
            with ReadRecorder(start) as probe:  # F(z_0), recording which tensors F reads
                f0 = fn(start)
            inputs = list(probe.found.values())
            if inputs:  # the iteration runs without a graph; the reversal gives the gradient
                _check_complete(f0, start, inputs, before)
                loop.fn = torch.no_grad()(fn)
            f0 = f0.detach()
        b = self.beta
        return _ReversibleState(z=z0, fn=fn, start=z0, inputs=inputs), (1.0 - b) * z0 + b * f0

    def step(
        self, loop: Loop, state: _ReversibleState, z: Tensor, fz: Tensor, g: Tensor
    ) -> tuple[_ReversibleState, Tensor]:
        """From y_n (``z`` here) and F(y_n): z_n = (1 - beta) z_{n-1} + beta F(y_n), then y_{n+1}."""
        b, a = self.beta, 1.0 - self.beta
        state.z = a * state.z + b * fz
        return state, a * z + b * loop.fn(state.z)

    def finish(self, loop: Loop, state: _ReversibleState, z: Tensor, fz: Tensor, g: Tensor) -> Tensor:
        """The last y; with ``pg.Backprop`` (tensors F reads need a gradient) it carries the reversal."""
        if not state.inputs:
            return z
        z_last = (1.0 - self.beta) * state.z + self.beta * fz
        return _ReverseSolve.apply(self, state.fn, loop.evals, state.start, z, z_last, *state.inputs)


__all__ = ["Reversible", "MIN_GAP"]
