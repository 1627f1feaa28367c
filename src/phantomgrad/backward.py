"""Backward modes: how the gradient of a DEQ layer is made.

All of them approximate the exact implicit gradient (the paper's Eq. 4)

    dL/dtheta = J_theta^T (I - J_h^T)^{-1} dL/dh,

with J_h = dF/dh and J_theta = dF/dtheta at the fixed point h*, by replacing
(I - J_h)^{-1} with a matrix A (Eq. 5). A backward mode receives

* ``fn``: the flat map z -> F(z, x), differentiable in the parameters and in x,
* ``z_star``: the detached fixed point, shape (B, D),
* ``info``: the forward solver's :class:`~phantomgrad.deq.DEQInfo`,

and returns the tensor the layer outputs, carrying the gradient it prescribes.
Backward modes know nothing about models or solvers' internals.

``Backprop`` is different: it needs the solver to run with autograd on, so the
DEQ layer asks ``mode.differentiates_solver`` before solving.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ._checks import positive_int
from .solvers import Broyden, Solver, _check_damping

FlatFn = Callable[[Tensor], Tensor]


def _allow_repeated_vjps_under_compile() -> None:
    """Let the backward of a torch.compile'd F run more than once (retain_graph=True).

    NPG and Implicit take several VJPs through one graph of F (and the gradient monitor does so
    in any run). AOTAutograd by default compiles backward graphs that free ("donate") their
    saved tensors and then refuses retain_graph=True, or, when the backward was first run
    without it, would reuse freed buffers. Graphs compiled with ``donated_buffer`` off keep
    their saved tensors, so it is turned off when phantomgrad is imported (a memory
    optimisation of compiled backward passes is lost; nothing changes without torch.compile).
    """
    try:
        import torch._functorch.config as aot_config
    except ImportError:
        return
    if getattr(aot_config, "donated_buffer", False):
        aot_config.donated_buffer = False


_allow_repeated_vjps_under_compile()


def _check_k(k: int, name: str = "k (number of phantom-gradient steps)") -> int:
    return positive_int(name, k)


class BackwardMode(abc.ABC):
    """How a DEQ layer's gradient is made: subclass it and implement :meth:`attach`.

    Class attributes a mode declares (each has a default here):

    * ``config_keys``: the names of the ``__init__`` arguments that a config may set (e.g.
      ``("k", "damping")``); every name is a parameter of ``__init__`` with a default, so its
      annotation and default are read with ``inspect.signature(cls)``. Values are plain data
      (int, float, bool, str), except an argument annotated as a :class:`Solver` (Implicit's
      ``solver``), which a config builds from its solver keys. ``make_backward`` accepts
      exactly these keys.
    * ``differentiates_solver``: the forward solve runs with autograd on (``Backprop``).
    * ``outputs_fixed_point``: ``attach`` returns a tensor whose value is z* (Implicit, NPG,
      Backprop); others (UPG's h_k) get the straight-through form in eval mode.

    A new mode is one subclass plus one line in ``phantomgrad.modes.BACKWARD_MODES``.
    """

    config_keys: ClassVar[tuple[str, ...]] = ()
    differentiates_solver: ClassVar[bool] = False
    outputs_fixed_point: ClassVar[bool] = False
    needs_inverse_jacobian: ClassVar[bool] = False  # SHINE: the forward solve keeps its inverse-Jacobian estimate

    # A hook with a do-nothing default (most modes take any solver), so deliberately not abstract.
    def check_solver(self, solver: Any) -> None:  # noqa: B027
        """Refuse a forward solver this mode cannot work with (a one-line error); most modes take any."""

    @abc.abstractmethod
    def attach(self, fn: FlatFn, z_star: Tensor, info: Any) -> Tensor:
        """Return the layer's output in training, carrying this mode's gradient.

        Called only when autograd records. ``fn`` is the flat map z -> F(z, x) on (B, D),
        differentiable in the parameters and in x; ``z_star`` the solver's state (detached
        unless ``differentiates_solver``); ``info`` the forward solve's :class:`DEQInfo`, which
        a mode may fill in (Implicit sets ``info.backward`` when its backward runs). The
        gradient that reaches the parameters and x through the output is the mode's
        approximation of J_theta^T (I - J_h^T)^{-1} dL/dh.
        """

    def attach_at_fixed_point(self, fn: FlatFn, z_star: Tensor, info: Any) -> Tensor:
        """What the layer returns in eval mode with autograd recording: the value z*, the gradient of ``attach``.

        For a mode whose ``attach`` outputs another state (UPG's h_k, JFB's F(h*)) this is the
        straight-through form z* + (out - out.detach()): the value is z* exactly (out - out.detach()
        is 0), and the gradient is the one ``attach`` prescribes. Modes whose ``attach`` already
        outputs z* (``outputs_fixed_point = True``) return it unchanged.
        """
        out = self.attach(fn, z_star, info)
        if self.outputs_fixed_point:
            return out
        return z_star.detach() + (out - out.detach())

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({keys})"


class _RouteGradient(torch.autograd.Function):
    """Outputs z* exactly; in backward, maps the incoming dL/dh through ``transform``
    and hands the result to ``fz`` = F(z*), whose graph carries it on to the
    parameters and the input as J_theta^T (...) and J_x^T (...).

    ``transform(grad, vjp)`` gets ``vjp(v) = J_h^T v`` at z* (through the graph of
    fz, which it reuses, so F is not evaluated again).
    """

    @staticmethod
    def forward(ctx, fz: Tensor, z_req: Tensor, z_star: Tensor, transform):
        ctx.fz = fz  # an input, not an output: no reference cycle
        ctx.z_req = z_req
        ctx.transform = transform
        return z_star.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        fz, z_req = ctx.fz, ctx.z_req

        def vjp(v: Tensor) -> Tensor:
            return torch.autograd.grad(fz, z_req, v, retain_graph=True)[0]

        with torch.enable_grad():
            routed = ctx.transform(grad, vjp)
        return routed, None, None, None


class _RouteGradientRecomputed(torch.autograd.Function):
    """:class:`_RouteGradient` for compiled graphs: ``fz`` = F(z*) carries a graph to the
    parameters and the input only, and backward evaluates F once more at a fresh leaf for
    z* to take ``vjp(v) = J_h^T v``. Dynamo cannot trace a leaf made with
    ``requires_grad_()`` in the forward graph, so this costs one extra evaluation of F
    per backward, under ``torch.compile`` only.
    """

    @staticmethod
    def forward(ctx, fz: Tensor, z_star: Tensor, fn: FlatFn, transform):
        ctx.save_for_backward(z_star)
        ctx.fn = fn
        ctx.transform = transform
        return z_star.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z_star,) = ctx.saved_tensors
        with torch.enable_grad():
            z_req = z_star.detach().requires_grad_()
            fz = ctx.fn(z_req)

            def vjp(v: Tensor) -> Tensor:
                return torch.autograd.grad(fz, z_req, v, retain_graph=True)[0]

            routed = ctx.transform(grad, vjp)
        return routed, None, None, None


def _route(fn: FlatFn, z_star: Tensor, transform) -> Tensor:
    """z* with the gradient J_theta^T transform(dL/dh, vjp) (and J_x^T likewise), see :class:`_RouteGradient`.

    Eager: one evaluation of F at a fresh leaf for z*, whose graph serves both the VJPs with
    J_h and the one with J_theta. Under torch.compile: :class:`_RouteGradientRecomputed`
    (the backward then takes VJPs with ``torch.autograd.grad``, which Dynamo traces only with
    ``torch._dynamo.config.trace_autograd_ops = True``).
    """
    if torch.compiler.is_compiling():
        with torch.enable_grad():
            fz = fn(z_star.detach())
        return _RouteGradientRecomputed.apply(fz, z_star, fn, transform)
    z_req = z_star.detach().requires_grad_()
    with torch.enable_grad():
        fz = fn(z_req)
    return _RouteGradient.apply(fz, z_req, z_star, transform)


class Implicit(BackwardMode):
    """The exact gradient by implicit differentiation (Eq. 4).

    Solves g = J_h^T g + dL/dh at h* with ``solver`` (vector-Jacobian products through
    one stored evaluation of F, so memory is O(1) in the number of solver steps), then
    passes J_theta^T g on. The default solver stops on a *relative* residual, so the
    gradient stays exact whatever the scale of the loss. After backward,
    ``info.backward`` holds the backward solve's :class:`SolverInfo` (its
    ``converged`` says whether the gradient is exact to the tolerance); under
    ``torch.compile`` it stays None (a compiled backward runs no Python code).

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
        >>> unrolled = grad(pg.FixedPoint(max_iter=100, tol=1e-30), pg.Backprop())  # autograd through 100 steps
        >>> torch.allclose(exact, unrolled, rtol=1e-8, atol=1e-12)
        True
    """

    config_keys: ClassVar[tuple[str, ...]] = ("solver",)
    outputs_fixed_point = True

    def __init__(self, solver: Solver | None = None):
        self.solver = solver if solver is not None else Broyden(max_iter=30, tol=1e-6, stop="rel")

    def attach(self, fn, z_star, info):
        solver = self.solver

        def transform(grad: Tensor, vjp) -> Tensor:
            g, binfo = solver.solve(lambda y: vjp(y) + grad, grad)
            if not torch.compiler.is_compiling():  # a compiled backward replays no Python side effects
                info.backward = binfo
            return g

        return _route(fn, z_star, transform)


class NPG(BackwardMode):
    """Neumann-series phantom gradient A_{k,lambda} (Eq. 17).

        dL/dtheta ~ lambda J_theta^T (I + B^T + ... + (B^T)^{k-1}) dL/dh,
        B = lambda J_h + (1 - lambda) I   at h*.

    k vector-Jacobian products in all (k - 1 with J_h^T, one with J_theta^T), memory
    independent of k. The layer outputs h*.
    """

    config_keys: ClassVar[tuple[str, ...]] = ("k", "damping")
    outputs_fixed_point = True

    def __init__(self, k: int = 5, damping: float = 0.5):
        self.k = _check_k(k)
        self.damping = _check_damping("damping", damping)

    def attach(self, fn, z_star, info):
        k, lam = self.k, self.damping

        def transform(grad: Tensor, vjp) -> Tensor:
            term = total = grad
            for _ in range(k - 1):
                term = torch.lerp(term, vjp(term), lam)  # lam * J^T term + (1 - lam) * term, one kernel
                total = total + term
            return lam * total

        return _route(fn, z_star, transform)


class UPG(BackwardMode):
    """Unrolling-based phantom gradient A_{k,lambda} (Eq. 16).

    Starting from the detached h*, runs k damped steps with autograd on,

        h_{t+1} = lambda F(h_t) + (1 - lambda) h_t,

    and the gradient is backpropagation through them (memory O(k)). In training the
    layer outputs h_k, not h*, as the authors' code does: the head sees the state the
    gradient was computed for. In eval mode (with autograd recording) the layer outputs
    h* + (h_k - h_k.detach()): the value h*, the gradient of the k steps. Under
    ``torch.no_grad`` it outputs h* and runs no extra steps.

    Examples:
        >>> import torch, phantomgrad as pg
        >>> from phantomgrad.models.toy import TanhMap
        >>> f = TanhMap(dim=6, in_dim=4, lipschitz=0.5, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        >>> z0 = torch.zeros(3, 6, dtype=torch.float64)
        >>> deq = pg.DEQ(f, solver=pg.Anderson(max_iter=50, tol=1e-12), backward=pg.UPG(k=5, damping=0.5))
        >>> h_k, _ = deq(x, z0)  # training: the state after 5 damped steps from h*, with their gradient
        >>> h_star, _ = deq.eval()(x, z0)  # eval: the value h*, with the same gradient
        >>> torch.allclose(h_k, h_star), h_star.requires_grad
        (True, True)
    """

    config_keys: ClassVar[tuple[str, ...]] = ("k", "damping")

    def __init__(self, k: int = 5, damping: float = 0.5):
        self.k = _check_k(k)
        self.damping = _check_damping("damping", damping)

    def attach(self, fn, z_star, info):
        h = z_star.detach()
        lam = self.damping
        with torch.enable_grad():
            for _ in range(self.k):
                fh = fn(h)
                h = fh if lam == 1.0 else torch.lerp(h, fh, lam)  # lam * F(h) + (1 - lam) * h, one kernel
        return h


class JFB(UPG):
    """The one-step (Jacobian-free) gradient: UPG with k = 1, lambda = 1, i.e. A = I.
    The layer outputs F(h*) in training, and h* + (F(h*) - F(h*).detach()) in eval mode."""

    config_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__(k=1, damping=1.0)

    def __repr__(self) -> str:
        return "JFB()"


class Backprop(BackwardMode):
    """Differentiate through the forward solver's own iterations (unrolled graph).

    The reference exact gradient of the unrolled computation; memory grows with the
    number of solver steps. The layer outputs the solver's returned iterate.
    """

    differentiates_solver = True
    outputs_fixed_point = True

    def attach(self, fn, z_star, info):  # the solver already built the graph
        return z_star


__all__ = ["BackwardMode", "Implicit", "UPG", "NPG", "JFB", "Backprop"]
