"""``phantomgrad bench``: time and memory of every backward mode (the paper's Table 2),
optionally side by side with TorchDEQ.

What one run measures, for a model (the synthetic layer of Fig. 1, MDEQ-tiny at
CIFAR size, or a DEQ transformer language model on random tokens) and one forward
solver shared by every mode:

* per backward mode (every mode of ``phantomgrad.modes.BACKWARD_MODES``; a mode with a
  backward solve, as Implicit, once per backward solver, Broyden and fixed point; a mode that
  refuses the run's forward solver, as SHINE all but Broyden, with the first solver it accepts,
  named in its row; and ``backprop@reversible``, Backprop through the reversible solver): the
  forward, the backward and the whole training step (stem -> DEQ -> head -> cross-entropy
  -> backward -> SGD step), and inside them the DEQ layer's own forward and backward (timed
  with autograd hooks on the layer's output and on the injection, so the head's and stem's
  share is left out);
* the floor every backward is compared with: one evaluation of F, one
  vector-Jacobian product (VJP) of F with respect to the state only, and one with
  respect to state, parameters and injection ("full");
* evaluations of F in each direction, counted by a wrapper on F: calls during the
  forward, calls during the backward (TorchDEQ re-evaluates F there), and backward
  passes through a stored evaluation of F (one per VJP);
* peak memory of a training step: on CPU a fresh subprocess per mode, reading the
  kernel's resident-set high-water mark (VmHWM, reset before the step); on CUDA
  ``torch.cuda.max_memory_allocated`` in-process;
* the cosine between the gradient of F's parameters and a tightly solved Implicit
  gradient on the same batch and weights;
* the forward solvers alone (no grad): their time against the time of the F
  evaluations they make, for phantomgrad and (``--compare torchdeq``) TorchDEQ.

Timing discipline: every measured variant runs once per round, the rounds repeat
``--repeats`` times after ``--warmup`` rounds, so the machine's drift hits all
variants alike; tables show medians, a spread (interquartile range / median) and
ratios taken per round (pairs that ran seconds apart) then medianed. Weights are
restored after every timed step, so every variant sees the same map F.
``torch.set_num_threads`` is fixed (``--threads``, default 2). On CUDA every clock
read synchronises the device first.

``--check-every`` sets the host-check interval of phantomgrad's solvers (``none``: the host
never looks, every solve runs its ``max_iter`` steps); ``--sync-free`` adds a
``check_every=None`` row per mode and ``--compiled`` a row per mode whose forward and loss run
under ``torch.compile`` (its DEQ layer's own time and F counts are then not separable: "-").

``--sweep-k`` and ``--sweep-K`` time UPG/NPG against k and Implicit/Backprop against
the solver steps K (the paper's Table 2 as measurements) and plot them.

TorchDEQ (``--compare torchdeq``, see :mod:`.torchdeq`) gets the same F (the same module
object, so the same weights), stem, head, batch, forward solver and settings; a mode it has
no equivalent of gets an "n/a" row.

One module per job: :mod:`.config` (the run's settings), :mod:`.modes` (modes and solvers from
the registries), :mod:`.problem` (the models), :mod:`.torchdeq` (the adapter),
:mod:`.instruments` (clock, hooks, counters), :mod:`.runner` (training steps),
:mod:`.measure` (the measurements), :mod:`.stats`, :mod:`.memory` (the memory subprocess),
:mod:`.targets`, :mod:`.output` (tables, plot, JSON) and :mod:`.cli`.
"""

from .cli import add_arguments, config_from_args, run
from .config import MODELS, MODES, BenchConfig
from .measure import BenchResult, run_bench
from .memory import measure_memory
from .modes import Variant, mode_names, solver_names, variant
from .output import format_tables, from_json, plot, to_json
from .problem import Problem, build_problem
from .runner import Runner
from .torchdeq import TORCHDEQ_INSTALL

__all__ = [
    "add_arguments",
    "config_from_args",
    "run",
    "MODELS",
    "MODES",
    "BenchConfig",
    "BenchResult",
    "run_bench",
    "measure_memory",
    "Variant",
    "mode_names",
    "solver_names",
    "variant",
    "format_tables",
    "from_json",
    "plot",
    "to_json",
    "Problem",
    "build_problem",
    "Runner",
    "TORCHDEQ_INSTALL",
]
