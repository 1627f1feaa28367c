"""Exact higher-order gradients of the implicit layer (``create_graph=True`` through ``pg.Implicit``).

Notation: z*(theta) solves z* = F(z*, theta), where theta stands for every tensor F reads that
needs a gradient (its parameters and the input x); J = dF/dz and F_theta = dF/dtheta at (z*, theta).

First order (what :class:`_ImplicitFunction` does when ``create_graph`` is off): the incoming
v = dL/dz* becomes

    g = (I - J^T)^{-1} v,        dL/dtheta = F_theta^T g,

with F_theta^T g taken through a graph of F made at a detached copy of z*. That graph knows nothing
of z*'s own dependence on theta, so differentiating *it* again misses dz*/dtheta (and the
derivative of the solve): it is right to first order only.

Second order (``create_graph=True``). The backward then builds, as a graph, a function of
(v, theta) whose value is F_theta^T g and whose derivative is the true one:

* F is evaluated at the layer's *output* z (not at a detached copy). Differentiating z again
  runs this same backward, so the path through z carries dz*/dtheta = (I - J)^{-1} F_theta.
  While the partial derivative F_theta^T g is taken, that path is switched off (:class:`_Tie`):
  the partial is taken at fixed z, as the formula says, and the path is switched on afterwards.
* g is the output of :class:`_AdjointFunction`, the fixed point of phi(g) = J(z, theta)^T g + v.
  Its own derivative is the implicit one of that fixed point: with a cotangent c on g,

      c' = (I - d phi/dg)^{-T} c = (I - J)^{-1} c        (a solve with products J u),
      d/dv: c',    d/d(z, theta): the partials of <J(z, theta)^T g, c'> at fixed g,

  where J u is the vector-Jacobian product of the linear map g -> J^T g (a VJP of a VJP) and
  the partials are second derivatives of F. The same backward solver solves both systems.

Every order. The adjoint's backward is built the same way under ``create_graph``: its output and
inputs are tied, the partials are taken with the ties off, and c' is the output of the adjoint of
*its* fixed point (:class:`_Level`: each level's map is the VJP of the level below, linear in its
unknown), so a k-th derivative takes k - 1 levels of adjoint solves (tested to third order).

The higher-order backward evaluates F again, so F must be deterministic (a dropout mask fixed per
batch, as the solvers need anyway) and read the same tensors as in the forward (checked).
The result is exact whenever z* is the fixed point and every solve converges. F must read theta
through torch operations (as for ``pg.Reversible``): the
tensors F reads are recorded by a :class:`~torch.overrides.TorchFunctionMode` on the one
evaluation of F that the first-order backward needs anyway, and a second-order backward checks
that no other path leads from F's output to a tensor that needs a gradient.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor

from ._reads import ReadRecorder, unseen_leaf

FlatFn = Callable[[Tensor], Tensor]
Adjoint = Callable[[Tensor, Callable[[Tensor], Tensor]], tuple[Tensor, Tensor | None]]
Context = Callable[[], contextlib.AbstractContextManager[Any]]


def _unseen_reads(out: Tensor, start: Tensor, reads: list[Tensor]) -> bool:
    """True when some path of ``out``'s graph reaches a leaf needing a gradient other than ``start``
    and ``reads`` without passing through one of ``reads`` (F read a tensor the probe did not see)."""
    return unseen_leaf(out, start, reads) is not None


class _Switch:
    """Whether a :class:`_Tie` passes gradients on (off while a partial derivative is taken)."""

    on = False


class _Tie(torch.autograd.Function):
    """The identity, whose backward passes the gradient on only while its switch is on."""

    @staticmethod
    def forward(ctx, z: Tensor, switch: _Switch) -> Tensor:
        ctx.switch = switch
        return z.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad if ctx.switch.on else None), None


class _Spec:
    """What the autograd functions share: F, the adjoint solve, the backward solver, the backward's context."""

    def __init__(self, fn: FlatFn, adjoint: Adjoint, solver: Any, fz: Tensor, start: Tensor, context: Context):
        self.fn, self.adjoint, self.solver, self.context = fn, adjoint, solver, context
        self.fz, self.start = fz, start  # F at a detached leaf for z*, made in the forward
        self.read_ids: set[int] = set()  # ids of the tensors F read in the forward (alive: they are inputs)


def _vjp_at(out: Tensor, at: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda v: torch.autograd.grad(out, at, v, retain_graph=True)[0]


class _ImplicitFunction(torch.autograd.Function):
    """Outputs z*; its backward is the implicit gradient, exact to every order (module docstring).

    Inputs: the shared :class:`_Spec`, z*, and the tensors F reads (``reads``), which receive
    their gradients from here only under ``create_graph`` (otherwise through ``spec.fz``'s graph).
    """

    @staticmethod
    def forward(ctx, spec: _Spec, fz: Tensor, z_star: Tensor, *reads: Tensor) -> Tensor:
        ctx.spec = spec
        ctx.set_materialize_grads(False)  # a switched-off _Tie sends None: nothing to do, no recursion
        out = z_star.clone()
        ctx.save_for_backward(out, *reads)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        spec = ctx.spec
        if grad is None:
            return None, None, None, *(None for _ in ctx.saved_tensors[1:])
        if not torch.is_grad_enabled():  # first order: route g through the forward's graph of F
            with torch.enable_grad(), spec.context():
                g, _ = spec.adjoint(grad, _vjp_at(spec.fz, spec.start))
            return None, g, None, *(None for _ in ctx.saved_tensors[1:])
        out, *reads = ctx.saved_tensors  # ``out`` carries this node: differentiating it recurses here
        if _unseen_reads(spec.fz, spec.start, reads):
            raise RuntimeError(
                "pg.Implicit cannot take a second-order gradient here: F reads a tensor that needs a gradient "
                "past torch's function dispatch; let F read its parameters and inputs through torch operations"
            )
        switch = _Switch()
        z = _Tie.apply(out, switch)
        with spec.context(), ReadRecorder(z) as probe:
            fz = spec.fn(z)
        if set(probe.found) != spec.read_ids:  # e.g. F's parameters were swapped back since the forward
            raise RuntimeError(
                "pg.Implicit's second-order backward evaluates F again, and F reads other tensors now than in the "
                "forward; run the backward while F reads what it read in the forward (e.g. inside the same "
                "reparametrisation)"
            )
        with spec.context():
            g = _AdjointFunction.apply(_implicit_level(spec), grad, z, *reads)
            grads = torch.autograd.grad(fz, reads, g, create_graph=True, allow_unused=True)  # partials at fixed z
        switch.on = True  # from now on, differentiating F(z) follows z back to theta
        return None, None, None, *grads


class _Level:
    """One adjoint fixed point a = (dP/dw)^T a + c, where P = ``prev(w, extras)`` is the map of the level
    below (F itself for the first adjoint level) at the point w; ``solve(c, vjp)`` finds a given
    ``vjp(u) = (dP/dw)^T u`` and returns it with the mask of samples that fell back (or None)."""

    def __init__(self, spec: _Spec, prev: Callable[[Tensor, list[Tensor]], Tensor], n_extras: int, solve):
        self.spec, self.prev, self.n_extras, self.solve = spec, prev, n_extras, solve

    def phi(self, a: Tensor, extras: list[Tensor]) -> Tensor:
        """This level's map a -> (dP/dw)^T a + c at w = extras[1], c = extras[0]: a VJP made with a graph."""
        c, w, rest = extras[0], extras[1], extras[2:]
        return torch.autograd.grad(self.prev(w, rest), w, a, create_graph=True)[0] + c

    def above(self) -> _Level:
        """The adjoint level of this one: its map is :meth:`phi` (linear in a, so its transpose is a JVP)."""
        solver = self.spec.solver

        def plain(c: Tensor, vjp: Callable[[Tensor], Tensor]) -> tuple[Tensor, None]:
            return solver.solve(lambda u: vjp(u) + c, c)[0], None

        return _Level(self.spec, self.phi, 2 + self.n_extras, plain)


def _implicit_level(spec: _Spec) -> _Level:
    """The first adjoint level: g = J(z, theta)^T g + v, solved by Implicit's own adjoint (info, fallback)."""

    def solve(v: Tensor, vjp: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None]:
        g, fell_back = spec.adjoint(v, vjp)
        if fell_back is not None and bool(fell_back.any()):  # host sync, higher orders only
            raise RuntimeError(
                f"pg.Implicit's backward solve did not converge for {int(fell_back.sum())} samples, which fell "
                "back to a phantom gradient, and a phantom gradient has no exact second derivative; raise the "
                "backward solver's max_iter, or pass fallback=None"
            )
        return g, None

    return _Level(spec, lambda w, extras: spec.fn(w), 0, solve)


class _AdjointFunction(torch.autograd.Function):
    """a with a = (dP/dw)^T a + c (see :class:`_Level`), differentiable to any order: its backward is the
    implicit derivative of that fixed point, whose own derivative (under ``create_graph``) is the next
    level's fixed point, and so on.

    Inputs: the level, c, w, the level's further ``extras`` and the tensors F reads. With a cotangent b
    on a: b' = (I - dP/dw)^{-1} b (a solve with products (dP/dw) u, VJPs of the linear map a -> phi(a));
    c receives b', and (w, extras, theta) the partials of <phi(a), b'> at fixed a. The forward keeps the
    graph of phi at detached copies for a first-order backward, so F is not evaluated again there.
    """

    @staticmethod
    def forward(ctx, level: _Level, c: Tensor, w: Tensor, *rest: Tensor) -> Tensor:
        extras, reads = list(rest[: level.n_extras]), rest[level.n_extras :]
        with torch.enable_grad(), level.spec.context():
            w_leaf = w.detach().requires_grad_()
            leaves = [e.detach().requires_grad_() for e in extras]
            p = level.prev(w_leaf, leaves)
            a, _ = level.solve(c, _vjp_at(p, w_leaf))
            a_leaf = a.detach().requires_grad_()
            ctx.jta = torch.autograd.grad(p, w_leaf, a_leaf, create_graph=True)[0]  # (dP/dw)^T a, a graph
        ctx.level, ctx.w_leaf, ctx.leaves, ctx.a_leaf = level, w_leaf, leaves, a_leaf
        ctx.set_materialize_grads(False)
        out = a.detach()
        ctx.save_for_backward(out, c, w, *extras, *reads)
        return out

    @staticmethod
    def backward(ctx, b: Tensor | None):
        level = ctx.level
        out, c, w, *rest = ctx.saved_tensors
        extras, reads = rest[: level.n_extras], rest[level.n_extras :]
        if b is None:
            return None, None, None, *(None for _ in rest)
        if not torch.is_grad_enabled():
            with torch.enable_grad(), level.spec.context():
                jvp = _vjp_at(ctx.jta, ctx.a_leaf)  # u -> (dP/dw) u: the transpose of the linear map a -> phi(a)
                b_adj, _ = level.spec.solver.solve(lambda u: jvp(u) + b, b)  # (I - dP/dw)^{-1} b
                grads = torch.autograd.grad(ctx.jta, [ctx.w_leaf, *ctx.leaves, *reads], b_adj, allow_unused=True)
            return None, b_adj, *grads
        switch = _Switch()  # create_graph: the same construction one level up, at tied copies of the inputs
        a_t, c_t, w_t = _Tie.apply(out, switch), _Tie.apply(c, switch), _Tie.apply(w, switch)
        extras_t = [_Tie.apply(e, switch) for e in extras]
        ex = [c_t, w_t, *extras_t]
        with level.spec.context():
            phi = level.phi(a_t, ex)
            b_adj = _AdjointFunction.apply(level.above(), b, a_t, *ex, *reads)
            grads = torch.autograd.grad(phi, [*ex, *reads], b_adj, create_graph=True, allow_unused=True)
        switch.on = True
        return None, *grads


def implicit_output(
    fn: FlatFn, z_star: Tensor, adjoint: Adjoint, solver: Any, context: Context = contextlib.nullcontext
) -> Tensor:
    """z* carrying the implicit gradient g ~ (I - J^T)^{-1} v, exact to every order.

    ``adjoint(v, vjp)`` solves g = J^T g + v given ``vjp(u) = J^T u`` and returns g and the mask of
    samples that fell back to another gradient (or None; it may also record the solve's info);
    ``solver`` solves the transposed system (I - J) c' = c
    of the second-order backward; F's evaluations and the backward passes run inside ``context()``. One evaluation of
    F, at a detached leaf for z*, recording which tensors F reads (Python work per operation of F).
    """
    start = z_star.detach().requires_grad_()
    with torch.enable_grad(), context(), ReadRecorder(start) as probe:
        fz = fn(start)
    reads = list(probe.found.values())
    spec = _Spec(fn, adjoint, solver, fz, start, context)
    spec.read_ids = set(probe.found)
    return _ImplicitFunction.apply(spec, fz, z_star, *reads)


__all__ = ["implicit_output"]
