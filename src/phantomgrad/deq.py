"""The DEQ layer: solve for the fixed point, then let the backward mode attach the gradient.

    z*, info = DEQ(f, solver, backward)(x, z0)      with   z* = f(z*, x)

``f(z, x)`` is any module or callable whose output has the structure of ``z``: one
tensor or a tuple of tensors, each with the batch on dimension 0. The layer packs
that structure into flat states (B, D) for the solver and unpacks the result.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence, cast

import torch
from torch import Tensor, nn

from ._checks import boolean, positive_int
from .backward import UPG, BackwardMode
from .init import initial_state, relative_distance
from .solvers import Anderson, Solver, SolverInfo, default_check_every

log = logging.getLogger(__name__)

State = Tensor | tuple[Tensor, ...]


@dataclass
class DEQInfo(SolverInfo):
    """The forward solve's :class:`SolverInfo`, plus ``backward``: the backward solve's
    info for ``pg.Implicit`` (filled in when backward runs, else None); ``fixed_point``: the
    solver's h*, detached, with z's structure (what a :class:`~phantomgrad.FixedPointCache`
    stores; UPG returns h_k in training); ``init_loss``: with ``init=g``, the scalar
    mean_b ||g(x_b) - sg(z*_b)||^2 / ||sg(z*_b)||^2 that trains g and reaches g's parameters only
    (:mod:`phantomgrad.init`), else None."""

    backward: SolverInfo | None = None
    fixed_point: Any = None
    init_loss: Tensor | None = None


class _Packer:
    """Flattens a tensor or a tuple of tensors with a common batch dimension to (B, D)."""

    def __init__(self, z: State):
        self.is_tuple = isinstance(z, (tuple, list))
        parts = tuple(z) if self.is_tuple else (z,)
        if not parts or not all(isinstance(p, Tensor) for p in parts):
            raise TypeError(f"a DEQ state must be a Tensor or a tuple of Tensors, got {_describe(z)}")
        self.batch = parts[0].shape[0]
        self.shapes = [tuple(p.shape) for p in parts]
        if any(s[0] != self.batch for s in self.shapes):
            raise ValueError(f"every part of the state must share the batch size on dim 0, got shapes {self.shapes}")
        self.sizes = [int(torch.Size(s[1:]).numel()) for s in self.shapes]

    def check(self, z: State, what: str) -> None:
        if not self.is_tuple and type(z) is Tensor and z.shape == self.shapes[0]:
            return  # the common case, checked without building lists
        shapes = (
            [tuple(p.shape) for p in z]
            if isinstance(z, (tuple, list))
            else [tuple(z.shape)]
            if isinstance(z, Tensor)
            else None
        )
        if shapes is None or isinstance(z, (tuple, list)) != self.is_tuple or shapes != self.shapes:
            raise ValueError(
                f"{what} has structure {_describe(z)} but z0 has {self._describe_self()}; "
                "f(z, x) must return a state of exactly the structure and shapes of z0"
            )

    def _describe_self(self) -> str:
        return f"tuple of shapes {self.shapes}" if self.is_tuple else f"Tensor of shape {self.shapes[0]}"

    def pack(self, z: State) -> Tensor:
        if not self.is_tuple:
            return cast(Tensor, z).reshape(self.batch, -1)  # check() has matched z's structure to z0's
        return torch.cat([p.reshape(self.batch, -1) for p in z], dim=1)

    def unpack(self, flat: Tensor) -> State:
        if not self.is_tuple:
            return flat.reshape(self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return tuple(p.reshape(s) for p, s in zip(parts, self.shapes))


def _describe(z: Any) -> str:
    if isinstance(z, Tensor):
        return f"Tensor of shape {tuple(z.shape)}"
    if isinstance(z, (tuple, list)):
        return "tuple of [" + ", ".join(_describe(p) for p in z) + "]"
    return type(z).__name__


def _describe_typed(z: Any) -> str:
    """Shapes and dtypes, for the error when F fails: 'Tensor (3, 6) float64', 'tuple of [...]'."""
    if isinstance(z, Tensor):
        return f"Tensor {tuple(z.shape)} {str(z.dtype).removeprefix('torch.')}"
    if isinstance(z, (tuple, list)):
        return f"{type(z).__name__} of [" + ", ".join(_describe_typed(p) for p in z) + "]"
    if isinstance(z, dict):
        return "dict of {" + ", ".join(f"{k!r}: {_describe_typed(v)}" for k, v in z.items()) + "}"
    return type(z).__name__


# Errors of F's first call that are re-raised with what the layer passed (other types pass unchanged,
# and so does running out of memory, a RuntimeError that callers catch by its own type).
_EXPLAINED_ERRORS = (TypeError, ValueError, IndexError, RuntimeError)


def _explain_first_call_error(err: Exception, z: State, x: Any) -> Exception | None:
    """A one-line error naming what f(z, x) received and the calling conventions, or None to re-raise as is."""
    if isinstance(err, torch.OutOfMemoryError):
        return None
    base = next((t for t in _EXPLAINED_ERRORS if isinstance(err, t)), None)
    if base is None:
        return None
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return base(
        f"f(z, x) failed on its first call, with z = {_describe_typed(z)} (shaped like z0) and "
        f"x = {_describe_typed(x)}: {first_line}. The layer is called as deq(x, z0) and calls f(z, x); "
        "check the order of the arguments of both"
    )


def _all_finite(z: Any) -> bool:
    if isinstance(z, Tensor):
        if not torch.is_floating_point(z):
            return True
        if z.layout != torch.strided:  # sparse inputs (e.g. a graph's adjacency): check the stored values
            values = z.values() if z.layout in (torch.sparse_csr, torch.sparse_csc) else z._values()
            return bool(torch.isfinite(values).all())
        return bool(torch.isfinite(z).all())
    if isinstance(z, (tuple, list)):
        return all(_all_finite(p) for p in z)
    if isinstance(z, dict):
        return all(_all_finite(p) for p in z.values())
    return True


# The defaults of pg.DEQ's signature (copied per layer): the Anderson forward and UPG A_{5,0.5} of the paper.
_DEFAULT_SOLVER = Anderson(max_iter=30, tol=1e-4)
_DEFAULT_BACKWARD = UPG(k=5, damping=0.5)


class DEQ(nn.Module):
    """A deep equilibrium layer.

    Args:
        f: the map F; ``f(z, x)`` returns the next state with the structure of ``z``.
            If it is an ``nn.Module`` its parameters are registered here.
        solver: forward solver (default ``Anderson(max_iter=30, tol=1e-4)``).
        backward: backward mode (default ``UPG(k=5, damping=0.5)``).
        warn_not_converged: log a warning (``logging``, logger ``phantomgrad.deq``) when the
            forward solve misses its tolerance by 10x or more: the batch mean of the residual
            the solver stops on (relative for ``stop="rel"``, absolute for ``"abs"``) is
            >= 10 x ``tol``. At most one warning per ``warn_interval`` calls of this layer.
            ``False`` silences it.
        warn_interval: calls of the layer between two warnings (and, with a sync-free solver,
            ``check_every=None``, between two checks: each check reads the residual on the host).
        fallback: a second solver (e.g. ``pg.FixedPoint(damping=0.5)``) that re-solves, from
            z0, the samples whose first solve produced non-finite values; used samples are
            flagged in ``info.fallback`` and logged. Deciding whether it is needed reads one
            flag on the host per call, also with a sync-free solver.
        return_states: trajectory supervision: solver steps t (1 <= t <= ``solver.max_iter``)
            after which the layer also returns the state, each with its own phantom gradient
            (see ``forward``'s ``states``); the default () returns the final state alone.
        init: a learned initial state (SkipDEQ; HyperDEQ's initialiser): ``init(x)``, a module
            or callable, returns a state with z's structure. ``deq(x)`` without z0 starts the
            solve there (detached); ``info.init_loss`` is the auxiliary loss that trains it
            (add it to the loss). See :mod:`phantomgrad.init`.

    The solver's state is kept in at least float32: under ``torch.autocast`` F may compute
    in bfloat16, but its output is cast back, so iterates and residuals stay float32.

    ``forward(x, z0)`` returns ``(z, info)``. Gradients flow to the parameters of f and
    to x, never to z0. What is returned, and how its gradient is made, is the backward
    mode's business:

    * training mode, autograd recording: the mode's output (h* for Implicit, NPG and
      Backprop; h_k for UPG; F(h*) for JFB) with the mode's gradient;
    * eval mode, autograd recording: the value h* with the same gradient (for UPG,
      h* + (h_k - h_k.detach())), so saliency maps and input optimisation work as in
      training: ``eval()`` changes dropout and normalisation, not autograd;
    * under ``torch.no_grad()`` / ``torch.inference_mode()``: h*, and only the forward
      solve runs.

    Host syncs. With a solver that checks convergence on the host (``check_every`` an
    integer; ``"auto"`` on CPU) the layer also checks x and z0 for NaN/Inf (ValueError) and
    reads the residuals for its warnings on every call. With a sync-free solver
    (``check_every=None``; ``"auto"`` on CUDA) it reads nothing on the host: a non-finite
    input is flagged in ``info.nonfinite`` by the solve instead of refused, and the warnings
    read the device once every ``warn_interval`` calls. Under ``torch.compile``
    (``torch.compiler.is_compiling()``) the layer takes the sync-free path by itself, whatever
    the solver's ``check_every``: no input checks, no warnings, and no ``fallback`` solve
    (deciding on it needs a host read; ``info.nonfinite`` flags the samples instead), so
    ``torch.compile(model)`` with default arguments traces the layer without a graph break.

    Examples:
        >>> import torch, phantomgrad as pg
        >>> from phantomgrad.models.toy import TanhMap
        >>> f = TanhMap(dim=6, in_dim=4, lipschitz=0.5, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        >>> z0 = torch.zeros(3, 6, dtype=torch.float64)
        >>> deq = pg.DEQ(f, solver=pg.Anderson(max_iter=30, tol=1e-10), backward=pg.UPG(k=5, damping=0.5))
        >>> z, info = deq(x, z0)
        >>> z.shape, bool(info.converged.all())
        (torch.Size([3, 6]), True)
        >>> torch.allclose(z, f(z, x), atol=1e-8)  # a fixed point (UPG outputs h_k, 5 damped steps from h*)
        True
        >>> z.pow(2).sum().backward()  # the phantom gradient reaches F's parameters (and x)
        >>> f.W.grad.shape
        torch.Size([6, 6])
    """

    #: The advice that ends the not-converged warning, in the caller's syntax: ``phantomgrad train``
    #: sets one that names its own keys (``solver_max_iter=``, ...) instead of Python arguments.
    not_converged_hint: str = (
        "Raise max_iter, try pg.Anderson/pg.Broyden or make f more contractive; "
        "pg.DEQ(..., warn_not_converged=False) silences this"
    )

    def __init__(
        self,
        f: Callable[..., State],
        solver: Solver | None = _DEFAULT_SOLVER,
        backward: BackwardMode | None = _DEFAULT_BACKWARD,
        warn_not_converged: bool = True,
        fallback: Solver | None = None,
        warn_interval: int = 1000,
        return_states: Sequence[int] = (),
        init: Callable[[Any], State] | None = None,
    ):
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be callable as f(z, x), got {type(f).__name__}")
        self.f = f  # registered as a submodule when it is a Module
        # the defaults shown in the signature are copied, so that no two layers share (and mutate) one object
        self.solver = copy.copy(_DEFAULT_SOLVER) if solver is None or solver is _DEFAULT_SOLVER else solver
        self.backward = copy.copy(_DEFAULT_BACKWARD) if backward is None or backward is _DEFAULT_BACKWARD else backward
        if not isinstance(self.solver, Solver):
            raise TypeError(f"solver must be a phantomgrad solver such as pg.Anderson(), got {self.solver!r}")
        if self.solver.linear_only:
            raise ValueError(
                f"solver={type(self.solver).__name__}() solves linear systems only (Implicit's backward: "
                f"pg.Implicit(solver=pg.{type(self.solver).__name__}(...))); the forward needs e.g. pg.Anderson()"
            )
        if not isinstance(self.backward, BackwardMode):
            raise TypeError(f"backward must be a phantomgrad backward mode such as pg.UPG(), got {self.backward!r}")
        self.backward.check_solver(self.solver)
        self.warn_not_converged = warn_not_converged  # checked by the setter
        self.warn_interval = positive_int("warn_interval", warn_interval)
        self.return_states = self._check_states(return_states, "return_states")
        self._calls = 0  # forward calls seen by the health checks (eager only)
        self._quiet_until = 0  # no not-converged warning before this call
        self.fallback = fallback  # checked by the setter
        if init is not None and not callable(init):
            raise TypeError(f"init must be a module or callable returning the initial state, got {init!r}")
        self.init = init  # registered as a submodule when it is a Module

    @property
    def fallback(self) -> Solver | None:
        """The solver that re-solves the samples whose forward solve went non-finite (None: none); set it
        after construction too (the trainer does, from its ``fallback_solver`` key): it is checked either way."""
        return self._fallback

    @fallback.setter
    def fallback(self, solver: Solver | None) -> None:
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"fallback must be a phantomgrad solver such as pg.FixedPoint(damping=0.5), got {solver!r}")
        self._fallback = solver

    @property
    def warn_not_converged(self) -> bool:
        """Whether the layer warns when its forward solve misses the tolerance by 10x (settable, checked)."""
        return self._warn_not_converged

    @warn_not_converged.setter
    def warn_not_converged(self, value: bool) -> None:
        self._warn_not_converged = boolean("warn_not_converged", value)

    @property
    def backward_mode(self) -> BackwardMode:
        """The backward mode, :attr:`backward` (this older name stays an alias, for reading and setting)."""
        return self.backward

    @backward_mode.setter
    def backward_mode(self, mode: BackwardMode) -> None:
        self.backward = mode

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward!r}"

    def forward(
        self, x: Any, z0: State | Callable[[State | None], State] | None = None, states: Sequence[int] | None = None
    ) -> tuple[Any, DEQInfo]:
        """Solve z* = f(z*, x) from ``z0`` and attach the backward mode's gradient.

        Args:
            x: the input injection, passed to ``f`` unchanged as its second argument (a
                tensor, a tuple, a dict, ...). Gradients reach it.
            z0: the starting state: a tensor or a tuple of tensors with the batch on
                dimension 0; ``f(z, x)`` must return this structure and these shapes. No
                gradient reaches it. None: start at ``init(x)`` (the layer needs ``init``).
                A start provider ``z0(default) -> state`` (e.g. ``FixedPointCache.start``)
                is called with ``init(x)`` detached (None without ``init``).
            states: trajectory supervision for this call (default: the layer's
                ``return_states``): solver steps t whose states are returned too.

        Returns:
            ``(z, info)``: ``z`` with the structure of ``z0`` (see the class docstring for
            its value in training, eval and no_grad), ``info`` a :class:`DEQInfo` with
            per-sample residuals, step counts and flags of the forward solve.

            With ``states=(t_1, ..., t_n)`` (or ``return_states``), ``z`` is instead a list
            ``[z_t1, ..., z_tn, z_final]`` of n + 1 states, each with the structure of
            ``z0``: z_t is the solver's state after t evaluations of f (for a sample that had
            stopped by then, its final state; see ``Solver.solve(keep=...)``), and the last
            entry is exactly what the call without ``states`` returns. Each state s carries
            the backward mode's gradient made at s, as if s were the fixed point (the
            fixed-point correction of DEQ optical flow): with UPG, the k damped steps from
            s (the value s_k in training, s + (s_k - s_k.detach()) in eval), with Implicit
            or NPG the value s with (I - J(s))^{-1} or its Neumann series at s. A loss can
            be put on each. Implicit's ``info.backward`` describes the last backward solve run.

        Raises:
            ValueError: z0 or x holds NaN/Inf, or f returns another structure than z0.
            TypeError, ValueError, IndexError, RuntimeError: the first call of f failed;
                the message names what the layer passed to f (chained from f's error).
        """
        steps = self.return_states if states is None else self._check_states(states, "states")
        z0, guess = initial_state(self.init, x, z0)  # guess: init(x), None without init
        packer = _Packer(z0)
        if guess is not None:
            packer.check(guess, "init(x)")
        z0_flat = packer.pack(z0).detach()
        state_dtype = (
            torch.promote_types(z0_flat.dtype, torch.float32) if z0_flat.is_floating_point() else z0_flat.dtype
        )
        z0_flat = z0_flat.to(state_dtype)
        # Under torch.compile the layer reads nothing on the host (no input checks, fallback or warnings),
        # so that a compiled model has no graph break here whatever its solver's check_every.
        compiling = torch.compiler.is_compiling()
        sync_free = compiling or self._sync_free(z0_flat.device)
        if not sync_free:  # host syncs; a sync-free layer leaves non-finite inputs to info.nonfinite instead
            if not _all_finite(z0):
                raise ValueError("z0 contains NaN or Inf; start the solve from a finite state (e.g. zeros)")
            if not _all_finite(x):
                raise ValueError("the input x contains NaN or Inf; check the data and the layers before the DEQ")

        # Under autocast only F runs in low precision; the solver's algebra stays in state_dtype.
        device_type = z0_flat.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type) if autocast_on else None

        def call_f(z: State) -> State:
            if autocast_on:  # the solve runs with autocast off; F alone gets it back
                with torch.autocast(device_type, dtype=autocast_dtype):
                    return self.f(z, x)
            return self.f(z, x)  # no context manager per call: F may take only microseconds

        first_call = [True]

        def fn(flat: Tensor) -> Tensor:
            z = packer.unpack(flat)
            if first_call[0]:  # a failing first call is most often a mix-up of f(z, x) and deq(x, z0)
                try:
                    out = call_f(z)
                except Exception as err:
                    explained = _explain_first_call_error(err, z, x)
                    if explained is None:
                        raise
                    raise explained from err
                first_call[0] = False
            else:
                out = call_f(z)
            packer.check(out, "f(z, x)")
            return packer.pack(out).to(state_dtype)

        wants_grad = torch.is_grad_enabled()  # eval mode too: only no_grad/inference_mode skip backward work
        mode = self.backward
        with (
            contextlib.nullcontext() if wants_grad and mode.differentiates_solver else torch.no_grad(),
            torch.autocast(device_type, enabled=False),
        ):
            z_star, sinfo = self.solver.solve(fn, z0_flat, keep=steps, keep_inverse=mode.needs_inverse_jacobian)
            if self.fallback is not None and not compiling and bool(sinfo.nonfinite.any()):  # host sync (fallback)
                z_star, sinfo = self._fall_back(fn, z0_flat, z_star, sinfo)
        info = DEQInfo(**vars(sinfo))
        info.fixed_point = packer.unpack(z_star.detach())
        if guess is not None:
            info.init_loss = relative_distance(packer.pack(guess), z_star)
        if not compiling:  # host-side health checks stay out of compiled graphs
            self._report(info, sync_free)
        points = [*cast(list[Tensor], info.states), z_star] if steps else [z_star]  # kept: keep=steps asked
        if wants_grad:
            attach = mode.attach if self.training else mode.attach_at_fixed_point
            with torch.autocast(device_type, enabled=False):
                outs = [attach(fn, point, info) for point in points]
        else:
            outs = [point.detach() for point in points]
        if not steps:
            return packer.unpack(outs[0]), info
        return [packer.unpack(out) for out in outs], info

    def _check_states(self, states: Sequence[int], name: str) -> tuple[int, ...]:
        if isinstance(states, (int, Tensor)) or not isinstance(states, Sequence):
            raise TypeError(f"{name} must be a sequence of solver steps such as (4, 8), got {states!r}")
        steps = tuple(positive_int(f"{name} (a solver step)", t) for t in states)
        if steps and self.backward.needs_inverse_jacobian:
            raise ValueError(
                f"{name}: {type(self.backward).__name__}'s inverse-Jacobian estimate belongs to h*, not to "
                "earlier states; use another backward mode (e.g. pg.UPG()) for trajectory supervision"
            )
        if steps and max(steps) > self.solver.max_iter:
            raise ValueError(
                f"{name} asks for the state after step {max(steps)}, but the solver runs at most "
                f"max_iter={self.solver.max_iter} steps; ask for steps <= max_iter"
            )
        return steps

    def _fall_back(self, fn, z0: Tensor, z_star: Tensor, first: SolverInfo) -> tuple[Tensor, SolverInfo]:
        """Re-solve with the fallback solver and take its result where the first went non-finite."""
        assert self.fallback is not None  # called only when a fallback solver is set
        retry, second = self.fallback.solve(fn, z0)
        use = first.nonfinite & ~second.nonfinite
        log.warning(
            "forward solve with %s went non-finite for %d of %d samples; %d recovered with the fallback %s",
            type(self.solver).__name__,
            int(first.nonfinite.sum()),
            first.nonfinite.numel(),
            int(use.sum()),
            self.fallback,
        )
        merged: dict[str, Any] = {}
        for name, a in vars(first).items():
            b = getattr(second, name)
            merged[name] = (
                torch.where(use, b, a) if isinstance(a, Tensor) and name not in ("fallback", "nonfinite") else a
            )
        merged["fallback"] = first.fallback | use
        merged["nonfinite"] = first.nonfinite & ~use
        merged["trace"] = first.trace
        if first.states is not None:  # a recovered sample's kept states are the fallback's final state
            merged["states"] = [torch.where(use[:, None], retry, s) for s in first.states]
        return torch.where(use[:, None], retry, z_star), SolverInfo(**merged)

    def _sync_free(self, device: torch.device) -> bool:
        """Whether the solver never reads the device from the host (``check_every=None``, or
        ``"auto"`` off the CPU): then the layer skips its own per-call host syncs too."""
        check_every = getattr(self.solver, "check_every", 1)
        if check_every == "auto":
            check_every = default_check_every(device)
        return check_every is None

    def _report(self, info: DEQInfo, sync_free: bool) -> None:
        """Log non-finite solves and solves that missed their tolerance by 10x (eager only).

        Host sync: reads two numbers from the device, on every call, or only every
        ``warn_interval`` calls when the solver is sync-free (``check_every=None``).
        """
        call = self._calls
        self._calls += 1
        if sync_free and call % self.warn_interval:
            return
        solver = self.solver
        stop_res = info.rel_residual if getattr(solver, "stop", "rel") == "rel" else info.abs_residual
        n_nonfinite, mean_res = torch.stack((info.nonfinite.sum().double(), stop_res.double().mean())).tolist()  # sync
        if n_nonfinite:
            log.warning(
                "DEQ forward solve produced non-finite values for %d of %d samples; the returned state is the "
                "last finite iterate (see info.nonfinite). Lower the damping, regularise the Jacobian or check f.",
                int(n_nonfinite),
                info.nonfinite.numel(),
            )
        tol = getattr(solver, "tol", None)
        if not (self.warn_not_converged and tol and call >= self._quiet_until and mean_res >= 10 * tol):
            return
        self._quiet_until = call + self.warn_interval
        log.warning(
            "DEQ forward solve missed its tolerance: mean %s residual %.3g >= 10 x tol=%.3g (%d of %d samples "
            "not converged, at most %d steps). %s (next warning in >= %d calls).",
            getattr(solver, "stop", "rel"),
            mean_res,
            tol,
            int((~info.converged).sum()),
            info.converged.numel(),
            int(info.nstep.max()),
            self.not_converged_hint,
            self.warn_interval,
        )
