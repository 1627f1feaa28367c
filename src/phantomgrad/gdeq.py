"""GDEQ: the one-step (Jacobian-free) gradient preconditioned by the forward Broyden solve's inverse Jacobian.

Nguyen, Mauch, "Efficient Training of Deep Equilibrium Models", 2023 (arXiv:2304.11663); the
same gradient as banax's ``GDEQ`` adjoint (RhizomeResearch/banax), written here for this
package's Broyden estimate.

JFB passes dL/dh on unchanged (A = I in the paper's Eq. 5). GDEQ passes on the Broyden
estimate of the exact adjoint instead: Broyden's method on g(z) = F(z) - z ends with a low-rank
H ~ (J_h - I)^{-1} at h*, so

    u = -H^T dL/dh ~ (I - J_h^T)^{-1} dL/dh,        dL/dtheta ~ J_theta^T u,

one product with H and one vector-Jacobian product of F, with no backward solve. It is the
formula of SHINE's basic form (Ramzi et al., ICLR 2022); :class:`~phantomgrad.shine.SHINE`
adds a fallback when the forward did not converge, a per-sample guard on the gain and an
optional refinement, GDEQ has none of them: it always uses the estimate, as the paper does.

First order only: H is a by-product of the forward iterations, with no derivative of its own,
so ``create_graph=True`` through GDEQ is refused with a one-line error.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from .backward import _route
from .shine import BroydenEstimateMode


class GDEQ(BroydenEstimateMode):
    """JFB preconditioned by the forward Broyden solve's inverse-Jacobian estimate: u = -H^T dL/dh.

    Needs ``solver=pg.Broyden(...)`` (the layer then keeps the estimate). The layer outputs h*.

    Examples:
        >>> import torch, phantomgrad as pg
        >>> from phantomgrad.models.toy import TanhMap
        >>> f = TanhMap(dim=6, in_dim=4, lipschitz=0.5, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        >>> z0 = torch.zeros(3, 6, dtype=torch.float64)
        >>> def grad(backward):  # d/dW of sum(z) through the layer
        ...     f.zero_grad()
        ...     deq = pg.DEQ(f, solver=pg.Broyden(max_iter=50, tol=1e-10), backward=backward)
        ...     deq(x, z0)[0].sum().backward()
        ...     return f.W.grad.flatten().clone()
        >>> cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        >>> exact = grad(pg.Implicit(pg.Broyden(max_iter=50, tol=1e-12)))
        >>> cos(grad(pg.GDEQ()), exact) > cos(grad(pg.JFB()), exact)
        True
    """

    config_keys: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        return "GDEQ()"

    def attach(self, fn, z_star: Tensor, info: Any) -> Tensor:
        estimate = self.estimate(info)
        return _route(fn, z_star, lambda grad, vjp: -estimate.rmatvec(grad), self.second_order_refusal)


__all__ = ["GDEQ"]
