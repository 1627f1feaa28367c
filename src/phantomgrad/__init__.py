"""phantomgrad: train implicit (deep equilibrium) models fast with phantom gradients.

    import phantomgrad as pg
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=30, tol=1e-4), backward=pg.UPG(k=5, damping=0.5))
    z, info = deq(x, z0)

Method: Geng, Zhang, Bai, Wang, Lin, "On Training Implicit Models", NeurIPS 2021.
"""

import importlib.metadata

from .adaptive import AdaptivePhantom
from .backward import JFB, NPG, UPG, Backprop, BackwardMode, Implicit
from .cache import FixedPointCache
from .deq import DEQ, DEQInfo
from .gdeq import GDEQ
from .modes import BACKWARD_MODES, make_backward
from .monitor import GradientQuality, gradient_quality
from .regularize import jacobian_penalty, spectral_radius
from .shine import SHINE
from .solvers import GMRES, Anderson, Broyden, FixedPoint, Reversible, Solver, SolverInfo, Unrolled, make_solver
from .swap import deq_layers, pretraining, swap

try:
    __version__ = importlib.metadata.version("phantomgrad")  # the installed distribution's (pyproject.toml)
except importlib.metadata.PackageNotFoundError:  # a source tree on the path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEQ",
    "DEQInfo",
    "Solver",
    "SolverInfo",
    "FixedPoint",
    "Anderson",
    "Broyden",
    "Unrolled",
    "make_solver",
    "BackwardMode",
    "Implicit",
    "UPG",
    "NPG",
    "JFB",
    "Backprop",
    "AdaptivePhantom",
    "BACKWARD_MODES",
    "make_backward",
    "gradient_quality",
    "GradientQuality",
    "jacobian_penalty",
    "spectral_radius",
    "Reversible",
    "GMRES",
    "SHINE",
    "GDEQ",
    "swap",
    "pretraining",
    "deq_layers",
    "FixedPointCache",
]
