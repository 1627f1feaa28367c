"""SHINE: the backward pass from the forward Broyden solve's inverse-Jacobian estimate.

Ramzi, Mannel, Bai, Starck, Ciuciu, Moreau, "SHINE: SHaring the INverse Estimate from the
forward pass for bi-level optimization and implicit models", ICLR 2022.

The exact gradient (the paper's Eq. 4 in backward.py) needs u = (I - J_h^T)^{-1} dL/dh at h*.
Broyden's method on g(z) = F(z) - z ends with a low-rank estimate H ~ (J_h - I)^{-1}, so

    u ~ -H^T dL/dh,        dL/dtheta ~ J_theta^T u,

one product with H (2 x memory vector operations) and one vector-Jacobian product of F, with no
backward solve. The estimate is exact only in the directions the forward steps explored, so

* ``refine`` (the paper's refinement) runs a few steps of a Broyden backward solve of
  u = J_h^T u + dL/dh started from the SHINE vector instead of from dL/dh; with enough steps it
  is the implicit gradient;
* ``fallback`` (the paper's fallback) makes the gradient with another mode when the estimate
  cannot be trusted: here, when some sample of the forward solve did not converge, or was
  re-solved by the layer's fallback solver (the estimate then belongs to another point than the
  returned one). The decision is per batch, on the host.
* ``max_gain`` guards each sample against a broken estimate (rounding-level Broyden steps can
  make it huge): where -H^T dL/dh is not finite or longer than ``max_gain`` ||dL/dh||, that
  sample takes JFB's direction dL/dh instead (A = I; the exact u has
  ||u|| <= ||dL/dh|| / (1 - Lip(F)), so the default 1e3 only trips for Lip(F) > 0.999).

The layer outputs h* (also when the fallback makes the gradient: its gradient is passed on
straight through, so the value never depends on the mode). The outer-problem-aware variant of
the paper (extra Broyden updates along the outer gradient during the forward) is not included:
it needs the outer gradient inside the forward solve.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._checks import nonneg_int, positive_float
from .backward import JFB, BackwardMode, Implicit, _route
from .solvers import Broyden, Solver

FALLBACKS: dict[str, type[BackwardMode] | None] = {"jfb": JFB, "implicit": Implicit, "none": None}


class BroydenEstimateMode(BackwardMode):
    """Base of the modes that reuse the forward Broyden solve's inverse-Jacobian estimate H ~ (J_h - I)^{-1}
    (:class:`SHINE`, :class:`~phantomgrad.gdeq.GDEQ`): the layer solves with ``keep_inverse=True``, the
    mode refuses another forward solver, and it is first order only (H has no derivative of its own)."""

    outputs_fixed_point: ClassVar[bool] = True
    needs_inverse_jacobian: ClassVar[bool] = True  # the layer solves with keep_inverse=True

    @property
    def second_order_refusal(self) -> str:
        """The one-line refusal of ``create_graph=True``, naming the alternatives."""
        return (
            f"pg.{type(self).__name__} gives first-order gradients only (create_graph=True is not supported: "
            "Broyden's estimate has no derivative): use pg.Implicit for the exact second-order gradient, or pg.UPG "
            "(its own graph, any order)"
        )

    def check_solver(self, solver: Solver) -> None:
        """Refuse a forward solver that keeps no inverse-Jacobian estimate (called by the layer)."""
        if not isinstance(solver, Broyden):
            raise ValueError(
                f"backward={type(self).__name__}() needs solver=pg.Broyden(...): it reuses Broyden's "
                f"inverse-Jacobian estimate, and {type(solver).__name__} keeps none"
            )

    def estimate(self, info: Any) -> Any:
        """The forward solve's estimate H (:class:`~phantomgrad.solvers.BroydenInverse`) from its info."""
        estimate = getattr(info, "inverse_jacobian", None)
        if estimate is None:
            raise ValueError(
                f"{type(self).__name__} found no inverse-Jacobian estimate in the forward info: use "
                "solver=pg.Broyden(...) and solve with keep_inverse=True"
            )
        return estimate


class SHINE(BroydenEstimateMode):
    """The SHINE gradient (see the module docstring); needs ``solver=pg.Broyden(...)``.

    Args:
        refine: steps of a Broyden backward solve started from the SHINE vector (0: none).
        refine_tol: relative tolerance at which the refinement stops early.
        fallback: the mode that makes the gradient when the forward solve did not converge for
            every sample: ``"jfb"``, ``"implicit"``, ``"none"`` (always SHINE) or a BackwardMode.
        max_gain: per-sample guard on ||-H^T dL/dh|| / ||dL/dh|| (``None``: no guard).

    After backward with ``refine > 0``, ``info.backward`` holds the refinement's SolverInfo.

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
        >>> exact = grad(pg.Broyden(max_iter=50, tol=1e-10), pg.Implicit(pg.Broyden(max_iter=50, tol=1e-12)))
        >>> shine = grad(pg.Broyden(max_iter=50, tol=1e-10), pg.SHINE())  # one VJP, no backward solve
        >>> refined = grad(pg.Broyden(max_iter=50, tol=1e-10), pg.SHINE(refine=20, refine_tol=1e-12))
        >>> cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
        >>> cos(shine, exact) > 0.9, torch.allclose(refined, exact, rtol=1e-6, atol=1e-10)
        (True, True)
    """

    config_keys: ClassVar[tuple[str, ...]] = ("refine", "refine_tol", "fallback", "max_gain")

    def __init__(
        self,
        refine: int = 0,
        refine_tol: float = 1e-6,
        fallback: str | BackwardMode | None = "jfb",
        max_gain: float | None = 1e3,
    ):
        refine = nonneg_int("refine (Broyden steps after the SHINE estimate)", refine)
        refine_tol = positive_float("refine_tol", refine_tol)
        if isinstance(fallback, str):
            if fallback not in FALLBACKS:
                raise ValueError(
                    f"unknown SHINE fallback {fallback!r}; choose one of {sorted(FALLBACKS)} or pass a mode"
                )
            cls = FALLBACKS[fallback]
            fallback = cls() if cls is not None else None
        elif fallback is not None and (not isinstance(fallback, BackwardMode) or fallback.differentiates_solver):
            raise ValueError(f"fallback must be 'jfb', 'implicit', 'none' or a mode such as pg.JFB(), got {fallback!r}")
        self.refine = refine
        self.refine_tol = float(refine_tol)
        self.fallback = fallback
        self.max_gain = None if max_gain is None else positive_float("max_gain", max_gain)
        self._refiner = Broyden(max_iter=refine, tol=refine_tol, stop="rel") if refine else None

    def __repr__(self) -> str:
        return (
            f"SHINE(refine={self.refine!r}, refine_tol={self.refine_tol!r}, fallback={self.fallback!r}, "
            f"max_gain={self.max_gain!r})"
        )

    def attach(self, fn, z_star: Tensor, info: Any) -> Tensor:
        estimate = self.estimate(info)
        if self.fallback is None:
            return self._attach_shine(fn, z_star, info, estimate)
        use_fallback = (~info.converged | info.fallback).any()
        if torch.compiler.is_compiling():
            # No host read inside a compiled graph: both gradients are built and the batch's choice is a
            # where on the device (its gradient flows to the chosen branch only); costs the fallback's VJP.
            shine = self._attach_shine(fn, z_star, info, estimate)
            return torch.where(use_fallback, self._attach_fallback(fn, z_star, info), shine)
        if bool(use_fallback):  # host sync, per batch
            return self._attach_fallback(fn, z_star, info)
        return self._attach_shine(fn, z_star, info, estimate)

    def _attach_fallback(self, fn, z_star: Tensor, info: Any) -> Tensor:
        """The value h*, the fallback mode's gradient."""
        assert self.fallback is not None  # called only with a fallback
        out = self.fallback.attach(fn, z_star, info)
        return z_star.detach() + (out - out.detach())

    def _attach_shine(self, fn, z_star: Tensor, info: Any, estimate: Any) -> Tensor:
        """The value h*, the gradient J_theta^T u with u = -H^T dL/dh (refined by ``refine`` Broyden steps)."""
        refiner, max_gain = self._refiner, self.max_gain

        def transform(grad: Tensor, vjp) -> Tensor:
            u = -estimate.rmatvec(grad)  # (I - J^T)^{-1} grad ~ -H^T grad
            if max_gain is not None:  # no host sync: a mask
                gain = torch.linalg.vector_norm(u, dim=1) / torch.linalg.vector_norm(grad, dim=1)
                u = torch.where((gain <= max_gain)[:, None], u, grad)  # NaN compares False: JFB's direction
            if refiner is not None:
                u, info.backward = refiner.solve(lambda v: vjp(v) + grad, u)
            return u

        return _route(fn, z_star, transform, self.second_order_refusal)


__all__ = ["SHINE", "BroydenEstimateMode", "FALLBACKS"]
