"""An adaptive phantom gradient: UPG whose k (and damping lambda) follow the measured gradient quality.

The paper fixes k and lambda by hand and names an adaptive choice as future work. Theorem 2
says UPG's A_{k,lambda} approaches the exact (I - J_h)^{-1} as k grows when F is contractive,
at a rate set by the spectral radius of B = lambda J_h + (1 - lambda) I; the cosine between the
phantom and the exact gradient (measured by :func:`phantomgrad.monitor.gradient_quality`)
says how far from it the current k is. :class:`AdaptivePhantom` is UPG with the current
(k, lambda), and :meth:`AdaptivePhantom.observe` moves them:

* cosine < ``low``  -> k <- min(k + k_step, k_max): more unrolled steps bring A_{k,lambda}
  closer to (I - J_h)^{-1} (Theorem 2 and Fig. 1 of the paper);
* cosine > ``high`` -> k <- max(k - k_step, k_min): a good gradient with fewer steps is cheaper;
* forward residual > ``residual_growth`` x its running mean (an exponential moving average
  of the residuals observed before): F is losing its contraction. With ``adapt_damping``,
  lambda <- max(lambda * damping_factor, damping_min): a smaller lambda keeps the unrolled
  map h -> lambda F(h) + (1 - lambda) h stable where F is not (the paper's reason for
  lambda < 1); once lambda is at its floor, or without ``adapt_damping``, k is raised;
* otherwise nothing changes (the band [low, high] is the hysteresis that keeps k still).

Lambda is not moved on a low cosine: when F is contractive, a smaller lambda slows the
convergence of A_{k,lambda} (the cosine falls), so it would not help.

The gradient of the layer is exactly UPG's at the current (k, lambda). The
:class:`~phantomgrad.train.monitor_callback.GradientMonitor` calls ``observe`` every time it
measures; ``state_dict``/``load_state_dict`` carry (k, lambda, history) across checkpoints.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from ._checks import boolean, finite_float
from .backward import UPG, _check_k
from .solvers import _check_damping

log = logging.getLogger(__name__)


class AdaptivePhantom(UPG):
    """UPG A_{k,lambda} with k and lambda adapted from observed gradient quality.

    Args:
        k: the starting number of unrolled steps (within [k_min, k_max]).
        damping: the starting lambda in (0, 1].
        k_min, k_max: bounds on k.
        low, high: cosine thresholds, 0 < low < high <= 1: below ``low`` k rises, above
            ``high`` it falls.
        k_step: how much k moves per observation.
        adapt_damping: lower lambda (rather than raise k) when the residual grows.
        damping_min, damping_factor: lambda's floor, and the factor it is multiplied by.
        residual_growth: a forward residual above this multiple of its running mean counts
            as growing (``math.inf`` turns this off).
        residual_ema: weight of the past in the running mean of residuals.
    """

    config_keys: ClassVar[tuple[str, ...]] = (
        "k",
        "damping",
        "k_min",
        "k_max",
        "low",
        "high",
        "k_step",
        "adapt_damping",
        "damping_min",
        "damping_factor",
        "residual_growth",
        "residual_ema",
    )

    def __init__(
        self,
        k: int = 5,
        damping: float = 0.5,
        k_min: int = 1,
        k_max: int = 10,
        low: float = 0.9,
        high: float = 0.98,
        k_step: int = 1,
        adapt_damping: bool = True,
        damping_min: float = 0.3,
        damping_factor: float = 0.8,
        residual_growth: float = 2.0,
        residual_ema: float = 0.8,
    ):
        super().__init__(k=k, damping=damping)
        k_min, k_max, k_step = _check_k(k_min, "k_min"), _check_k(k_max, "k_max"), _check_k(k_step, "k_step")
        adapt_damping = boolean("adapt_damping", adapt_damping)
        low, high = finite_float("low", low), finite_float("high", high)
        if not k_min <= k <= k_max:
            raise ValueError(f"need k_min <= k <= k_max, got k_min={k_min}, k={k}, k_max={k_max}")
        if not 0 < low < high <= 1:
            raise ValueError(f"need 0 < low < high <= 1 for the cosine thresholds, got low={low!r}, high={high!r}")
        _check_damping("damping_min", damping_min)
        if damping_min > damping:
            raise ValueError(f"damping_min={damping_min} is above the starting damping={damping}; lower damping_min")
        if not 0 < damping_factor < 1:
            raise ValueError(f"damping_factor must be in (0, 1), got {damping_factor!r}")
        if not residual_growth > 1:
            raise ValueError(f"residual_growth must be > 1 (or math.inf to ignore residuals), got {residual_growth!r}")
        if not 0 <= residual_ema < 1:
            raise ValueError(f"residual_ema must be in [0, 1), got {residual_ema!r}")
        self.k_min, self.k_max, self.k_step = k_min, k_max, k_step
        self.low, self.high = float(low), float(high)
        self.adapt_damping = adapt_damping
        self.damping_min, self.damping_factor = float(damping_min), float(damping_factor)
        self.residual_growth, self.residual_ema = float(residual_growth), float(residual_ema)
        self.residual_mean: float | None = None
        self.history: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return (
            f"AdaptivePhantom(k={self.k}, damping={self.damping}, k_min={self.k_min}, k_max={self.k_max}, "
            f"low={self.low}, high={self.high})"
        )

    # ---- adaptation -------------------------------------------------------------------
    def _raise_k(self, why: str) -> str:
        if self.k < self.k_max:
            self.k = min(self.k + self.k_step, self.k_max)
            return f"k up ({why})"
        return f"at bounds ({why})"

    def _stabilise(self, why: str) -> str:
        if self.adapt_damping and self.damping > self.damping_min:
            self.damping = max(self.damping * self.damping_factor, self.damping_min)
            return f"damping down ({why})"
        return self._raise_k(why)

    def observe(self, cosine: float | None = None, residual: float | None = None) -> str:
        """Take one measurement and move (k, lambda); returns what was done ('keep', 'k up (...)', ...).

        ``cosine``: between the phantom and the exact gradient (e.g. ``GradientQuality.cosine_deq``).
        ``residual``: the forward solve's mean relative residual on the same batch.
        Non-finite values are ignored.
        """
        k_before, damping_before = self.k, self.damping
        cos = cosine if cosine is not None and math.isfinite(cosine) else None
        res = residual if residual is not None and math.isfinite(residual) else None
        grew = res is not None and self.residual_mean is not None and res > self.residual_growth * self.residual_mean
        if grew:
            action = self._stabilise(f"residual {res:.3g} > {self.residual_growth} x {self.residual_mean:.3g}")
        elif cos is not None and cos < self.low:
            action = self._raise_k(f"cosine {cos:.3f} < {self.low}")
        elif cos is not None and cos > self.high and self.k > self.k_min:
            self.k = max(self.k - self.k_step, self.k_min)
            action = f"k down (cosine {cos:.3f} > {self.high})"
        else:
            action = "keep"
        if res is not None:
            self.residual_mean = (
                res
                if self.residual_mean is None
                else self.residual_ema * self.residual_mean + (1 - self.residual_ema) * res
            )
        self.history.append({"cosine": cos, "residual": res, "k": self.k, "damping": self.damping, "action": action})
        if (self.k, self.damping) != (k_before, damping_before):
            log.info("AdaptivePhantom: %s -> k=%d, damping=%.3g", action, self.k, self.damping)
        return action

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The adapted state: current k and damping, the residual's running mean, the history."""
        return {
            "k": self.k,
            "damping": self.damping,
            "residual_mean": self.residual_mean,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"k", "damping"} - set(state)
        if missing:
            raise ValueError(f"AdaptivePhantom state is missing {sorted(missing)}; pass what state_dict() returned")
        k, damping = _check_k(int(state["k"])), _check_damping("damping", float(state["damping"]))
        if not self.k_min <= k <= self.k_max:
            raise ValueError(
                f"saved k={k} is outside this mode's bounds [{self.k_min}, {self.k_max}]; "
                "build the mode with the bounds the run was trained with"
            )
        self.k, self.damping = k, damping
        self.residual_mean = state.get("residual_mean")
        self.history = [dict(h) for h in state.get("history", [])]


__all__ = ["AdaptivePhantom"]
