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
import contextlib
import copy
import dataclasses
import logging
from typing import Any, Callable, ClassVar

import torch
import torch._functorch.config as aot_config
from torch import Tensor

from ._checks import positive_int
from .higher_order import implicit_output
from .solvers import Broyden, Solver, SolverInfo, _check_damping, default_check_every

log = logging.getLogger(__name__)

FlatFn = Callable[[Tensor], Tensor]


def keep_saved_tensors() -> contextlib.AbstractContextManager[Any]:
    """The context in which phantomgrad calls F with autograd on and takes repeated VJPs through it.

    NPG, Implicit, SHINE, GDEQ, the gradient monitor and ``spectral_radius`` take several VJPs
    through one graph of F (``retain_graph=True``). Through a ``torch.compile``'d F, AOTAutograd
    compiles backward graphs that free ("donate") their saved tensors when
    ``torch._functorch.config.donated_buffer`` is on at the forward's compile, and refuses
    ``retain_graph=True`` while it is on when the backward runs. phantomgrad therefore calls F with
    autograd on (the modes' ``attach``) and runs those backward passes inside
    ``torch._functorch.config.patch(donated_buffer=False)``: a compiled F's training graph, compiled
    on its first call with autograd on, donates nothing, and the repeated VJPs are allowed. The
    setting is scoped to those calls; importing phantomgrad changes no process-wide torch setting.
    One case is left to the user: an F compiled and first called with autograd on outside
    phantomgrad, then backpropagated once without ``retain_graph``, has donated buffers; set
    ``torch._functorch.config.donated_buffer = False`` before that first call. Inside a graph that
    Dynamo is tracing this is a no-op.
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return aot_config.patch(donated_buffer=False)


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
    * ``exact``: the mode's gradient is the implicit gradient of Eq. 4 (to its solves' tolerance),
      to first and second order (Implicit, Backprop); the tests' catalogue groups modes by it.
      Modes that are not exact either differentiate their own graph to any order (UPG, JFB) or
      refuse ``create_graph=True`` with a one-line error (NPG, SHINE, GDEQ).

    A new mode is one subclass plus one line in ``phantomgrad.modes.BACKWARD_MODES``.
    """

    config_keys: ClassVar[tuple[str, ...]] = ()
    differentiates_solver: ClassVar[bool] = False
    outputs_fixed_point: ClassVar[bool] = False
    exact: ClassVar[bool] = False
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
    fz, which it reuses, so F is not evaluated again). The graph of fz is made at a detached
    copy of z*, so the result is a first-order gradient only: under ``create_graph=True`` the
    backward raises ``refuse`` (a one-line error naming the modes that differentiate further).
    """

    @staticmethod
    def forward(ctx, fz: Tensor, z_req: Tensor, z_star: Tensor, transform, refuse: str):
        ctx.fz = fz  # an input, not an output: no reference cycle
        ctx.z_req = z_req
        ctx.transform = transform
        ctx.refuse = refuse
        return z_star.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # True in a backward exactly when create_graph=True
            raise RuntimeError(ctx.refuse)
        fz, z_req = ctx.fz, ctx.z_req

        def vjp(v: Tensor) -> Tensor:
            return torch.autograd.grad(fz, z_req, v, retain_graph=True)[0]

        with torch.enable_grad(), keep_saved_tensors():
            routed = ctx.transform(grad, vjp)
        return routed, None, None, None, None


class _RouteGradientRecomputed(torch.autograd.Function):
    """:class:`_RouteGradient` for compiled graphs: ``fz`` = F(z*) carries a graph to the
    parameters and the input only, and backward evaluates F once more, under ``torch.func.vjp``
    at z*, to take ``vjp(v) = J_h^T v``. Dynamo cannot trace a leaf made with
    ``requires_grad_()`` in the forward graph, so this costs one extra evaluation of F
    per backward, under ``torch.compile`` only. ``torch.func.vjp`` (unlike ``torch.autograd.grad``)
    is traced by Dynamo without ``torch._dynamo.config.trace_autograd_ops``.
    """

    @staticmethod
    def forward(ctx, fz: Tensor, z_star: Tensor, fn: FlatFn, transform, refuse: str):
        ctx.save_for_backward(z_star)
        ctx.fn = fn
        ctx.transform = transform
        ctx.refuse = refuse
        return z_star.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(ctx.refuse)
        (z_star,) = ctx.saved_tensors
        with torch.enable_grad(), keep_saved_tensors():
            vjp_fn = torch.func.vjp(ctx.fn, z_star.detach())[1]  # traced by Dynamo without trace_autograd_ops

            def vjp(v: Tensor) -> Tensor:
                return vjp_fn(v)[0]

            routed = ctx.transform(grad, vjp)
        return routed, None, None, None, None


COMPILED_SECOND_ORDER = (
    "a second-order gradient (create_graph=True) through a compiled DEQ layer is not supported; "
    "differentiate the eager layer, or use pg.UPG or pg.Backprop"
)


def _route(fn: FlatFn, z_star: Tensor, transform, refuse: str) -> Tensor:
    """z* with the gradient J_theta^T transform(dL/dh, vjp) (and J_x^T likewise), see :class:`_RouteGradient`.

    Eager: one evaluation of F at a fresh leaf for z*, whose graph serves both the VJPs with
    J_h and the one with J_theta. Under torch.compile: :class:`_RouteGradientRecomputed`
    (the backward takes its VJPs with ``torch.func.vjp``, which Dynamo traces as it is: the user
    sets no Dynamo option). ``refuse`` is the error a backward with ``create_graph=True`` raises:
    the gradient made here is of first order only.
    """
    if torch.compiler.is_compiling():
        with torch.enable_grad():
            fz = fn(z_star.detach())
        return _RouteGradientRecomputed.apply(fz, z_star, fn, transform, refuse)
    z_req = z_star.detach().requires_grad_()
    with torch.enable_grad(), keep_saved_tensors():
        fz = fn(z_req)
    return _RouteGradient.apply(fz, z_req, z_star, transform, refuse)


def _sync_free(solver: Any, device: torch.device) -> bool:
    """Whether ``solver`` never reads the device from the host (``check_every=None``, or "auto" off the CPU)."""
    check_every = getattr(solver, "check_every", 1)
    if check_every == "auto":
        check_every = default_check_every(device)
    return check_every is None


def neumann_vector(grad: Tensor, vjp: Callable[[Tensor], Tensor], k: int, lam: float) -> Tensor:
    """lam (I + B^T + ... + (B^T)^{k-1}) grad with B^T u = lam J^T u + (1 - lam) u: k - 1 VJPs.

    The vector A_{k,lambda}^T dL/dh that NPG passes on (Eq. 17); at an exact fixed point it is also
    UPG's (backpropagation through k damped steps from h* = F(h*) meets J at h* in every step), and
    with k = 1, lam = 1 it is JFB's dL/dh.
    """
    term = total = grad
    for _ in range(k - 1):
        term = torch.lerp(term, vjp(term), lam)  # lam * J^T term + (1 - lam) * term, one kernel
        total = total + term
    return total if lam == 1.0 else lam * total


IMPLICIT_FALLBACKS = ("upg", "jfb")
_DEFAULT_SOLVER = Broyden(max_iter=30, tol=1e-6, stop="rel")  # copied per instance: never used, never changed


class Implicit(BackwardMode):
    """The exact gradient by implicit differentiation (Eq. 4), exact to every order.

    Solves g = J_h^T g + dL/dh at h* with ``solver`` (vector-Jacobian products through
    one stored evaluation of F, so memory is O(1) in the number of solver steps), then
    passes J_theta^T g on. The default solver stops on a *relative* residual, so the
    gradient stays exact whatever the scale of the loss.

    Higher orders: with ``create_graph=True`` (gradient penalties, losses on input gradients,
    Hessian-vector products) the gradient is itself differentiated exactly, by implicit
    differentiation of the adjoint fixed point g = J^T g + v (see :mod:`phantomgrad.higher_order`;
    it costs one more solve, with Jacobian-vector products, per second-order backward), and so on
    for third and higher derivatives (one more level of adjoint solves per order).

    Args:
        solver: the backward solver (its ``check_every=None`` keeps the backward sync-free).
        fallback: for the samples whose backward solve did not converge, pass on a phantom
            gradient instead: ``"upg"`` (A_{5,0.5}: 0.5 (I + B^T + ... + (B^T)^4) dL/dh, which is
            UPG's gradient at an exact fixed point; four more VJPs), ``"jfb"`` (dL/dh, A = I) or
            ``None`` (keep the unconverged solve). Chosen per sample with masks, no host sync
            under ``check_every=None`` (with a host-checking solver the extra VJPs run only when
            some sample failed: one host read). ``info.backward.fallback`` flags those samples.
        warn_interval: calls of the backward between two warnings that the backward solve
            missed its tolerance (logger ``phantomgrad.backward``): the batch mean of its
            stopping residual is >= 10 x ``tol``. With a sync-free solver the residual is read
            on the host only once every ``warn_interval`` backward calls.

    After backward, ``info.backward`` holds the backward solve's :class:`SolverInfo` (its
    ``converged`` and ``rel_residual`` say per sample whether the gradient is exact to the
    tolerance; with a ``fallback``, its ``fallback`` says which samples fell back); under
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

    config_keys: ClassVar[tuple[str, ...]] = ("solver", "fallback", "warn_interval")
    outputs_fixed_point = True
    exact = True
    #: The advice that ends the backward's not-converged warning, in the caller's syntax (a CLI may set
    #: one that names its own keys instead of Python arguments).
    not_converged_hint: str = (
        "Raise the backward solver's max_iter, pass fallback='upg' or use a phantom gradient such as pg.UPG()"
    )

    def __init__(self, solver: Solver | None = _DEFAULT_SOLVER, fallback: str | None = None, warn_interval: int = 1000):
        if solver is None or solver is _DEFAULT_SOLVER:
            solver = copy.deepcopy(_DEFAULT_SOLVER)
        if not isinstance(solver, Solver):
            raise TypeError(f"solver must be a phantomgrad solver such as pg.Broyden(), got {solver!r}")
        if fallback is not None and fallback not in IMPLICIT_FALLBACKS:
            raise ValueError(f"unknown fallback {fallback!r}; choose one of {list(IMPLICIT_FALLBACKS)} or None")
        self.solver = solver
        self.fallback = fallback
        self.warn_interval = positive_int("warn_interval", warn_interval)
        self._calls = 0  # backward calls seen by the report
        self._quiet_until = 0  # no warning before this call

    def __repr__(self) -> str:
        return f"Implicit(solver={self.solver!r}, fallback={self.fallback!r}, warn_interval={self.warn_interval})"

    def _adjoint(self, info: Any):
        solver, fallback = self.solver, self.fallback

        def adjoint(grad: Tensor, vjp: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None]:
            g, binfo = solver.solve(lambda y: vjp(y) + grad, grad)
            sync_free = _sync_free(solver, grad.device)
            failed = None
            if fallback is not None:
                failed = ~binfo.converged
                if sync_free or bool(failed.any()):  # host sync only where the solver reads the host anyway
                    k, lam = (5, 0.5) if fallback == "upg" else (1, 1.0)
                    g = torch.where(failed[:, None], neumann_vector(grad, vjp, k, lam), g)
                binfo = dataclasses.replace(binfo, fallback=failed)
            if not torch.compiler.is_compiling():  # a compiled backward replays no Python side effects
                info.backward = binfo
                self._report(binfo, sync_free)
            return g, failed

        return adjoint

    def _report(self, binfo: SolverInfo, sync_free: bool) -> None:
        """Warn (rate-limited) when the backward solve missed its tolerance by 10x or more.

        Host sync: reads two numbers per backward call, or only every ``warn_interval`` calls when
        the backward solver is sync-free (``check_every=None``).
        """
        call = self._calls
        self._calls += 1
        tol = getattr(self.solver, "tol", None)
        if not tol or call < self._quiet_until or (sync_free and call % self.warn_interval):
            return
        stop = getattr(self.solver, "stop", "rel")
        res = binfo.rel_residual if stop == "rel" else binfo.abs_residual
        mean_res, failed = torch.stack((res.double().mean(), (~binfo.converged).sum().double())).tolist()  # sync
        if not mean_res >= 10 * tol:  # NaN warns too
            return
        self._quiet_until = call + self.warn_interval
        log.warning(
            "DEQ backward solve (pg.Implicit) missed its tolerance: mean %s residual %.3g >= 10 x tol=%.3g "
            "(%d of %d samples not converged, at most %d steps), so the gradient is not exact. %s (next warning "
            "in >= %d backward calls).",
            stop,
            mean_res,
            tol,
            int(failed),
            binfo.converged.numel(),
            int(binfo.nstep.max()),
            self.not_converged_hint,
            self.warn_interval,
        )

    def attach(self, fn, z_star, info):
        adjoint = self._adjoint(info)
        if torch.compiler.is_compiling():
            return _route(fn, z_star, lambda grad, vjp: adjoint(grad, vjp)[0], COMPILED_SECOND_ORDER)
        return implicit_output(fn, z_star, adjoint, self.solver, keep_saved_tensors)


class NPG(BackwardMode):
    """Neumann-series phantom gradient A_{k,lambda} (Eq. 17).

        dL/dtheta ~ lambda J_theta^T (I + B^T + ... + (B^T)^{k-1}) dL/dh,
        B = lambda J_h + (1 - lambda) I   at h*.

    k vector-Jacobian products in all (k - 1 with J_h^T, one with J_theta^T), memory
    independent of k. The layer outputs h*.

    First order only: NPG prescribes a gradient, not a function whose derivative it is (its value
    h* does not depend on theta the way the series says), so ``create_graph=True`` through it is
    refused with a one-line error; pg.Implicit (exact) and pg.UPG (its own graph) differentiate further.
    """

    config_keys: ClassVar[tuple[str, ...]] = ("k", "damping")
    outputs_fixed_point = True
    SECOND_ORDER: ClassVar[str] = (
        "pg.NPG gives first-order gradients only (create_graph=True is not supported): use pg.Implicit for the "
        "exact second-order gradient, or pg.UPG, whose unrolled graph differentiates to any order"
    )

    def __init__(self, k: int = 5, damping: float = 0.5):
        self.k = _check_k(k)
        self.damping = _check_damping("damping", damping)

    def attach(self, fn, z_star, info):
        k, lam = self.k, self.damping
        return _route(fn, z_star, lambda grad, vjp: neumann_vector(grad, vjp, k, lam), self.SECOND_ORDER)


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
        with torch.enable_grad(), keep_saved_tensors():  # a compiled F's graph is compiled without donated buffers
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
    exact = True

    def attach(self, fn, z_star, info):  # the solver already built the graph
        return z_star


__all__ = ["BackwardMode", "Implicit", "UPG", "NPG", "JFB", "Backprop"]
