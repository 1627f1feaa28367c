"""The configuration of one ``phantomgrad bench`` run (plain data, stored in the JSON)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modes import UNSET, check_mode, forward_solver, forward_solver_names, make_solver, mode_names

MODELS: tuple[str, ...] = ("mdeq-tiny", "synthetic", "deq-transformer-small", "deq-transformer", "conv-cell")
MODES: tuple[str, ...] = mode_names()  # every registered backward mode (see .modes)

_POSITIVE = (
    "batch",
    "image_size",
    "dim",
    "in_dim",
    "seq_len",
    "vocab",
    "solver_iter",
    "k",
    "backward_iter",
    "repeats",
    "threads",
    "ref_iter",
    "sweep_repeats",
)


@dataclass
class BenchConfig:
    """Everything one ``phantomgrad bench`` run depends on."""

    model: str = "mdeq-tiny"
    batch: int = 32
    image_size: int = 32  # mdeq-tiny, conv-cell: H = W
    dim: int = 64  # synthetic: state size
    in_dim: int = 32  # synthetic: input size
    seq_len: int = 64  # deq-transformer*: tokens per sequence
    vocab: int = 64  # deq-transformer*: token ids (random; the cost does not depend on the text)
    solver: str = "broyden"  # the forward solver of every mode
    solver_iter: int = 30  # its max_iter (K)
    solver_tol: float = 1e-4
    stop: str = "rel"
    broyden_memory: int | None = None  # None: as many slots as steps, TorchDEQ's default
    anderson_m: int = 5
    reversible_beta: float = 0.5  # the reversible solver's relaxation (the backprop@reversible row)
    check_every: int | str | None = UNSET  # every phantomgrad solve's host-check interval; "default": not passed
    modes: tuple[str, ...] = MODES
    k: int = 5
    damping: float = 0.5
    backward_iter: int = 30  # Implicit's backward solver steps
    backward_tol: float = 1e-6
    sync_free: bool = False  # add a check_every=None row per phantomgrad mode
    compiled: bool = False  # add a row per phantomgrad mode whose step runs under torch.compile
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # e.g. "reduce-overhead" (CUDA graphs on CUDA)
    fused: bool = False  # add a row per phantomgrad mode whose solvers run fused bookkeeping (fused=True)
    warm_starts: bool = False  # add a reuse-start and a learned-start row per phantomgrad mode
    warm_iter: int | None = None  # those rows' solver steps (the steps a run took with them); None: solver_iter
    repeats: int = 5
    warmup: int = 1
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    compare: str | None = None  # None or "torchdeq"
    memory: bool = True
    cosine: bool = True
    solvers: bool = True  # the forward-solver overhead table
    ref_iter: int = 100  # the reference gradient: solver steps in both directions
    ref_tol: float = 1e-7
    sweep_k: tuple[int, ...] = ()
    sweep_K: tuple[int, ...] = ()  # noqa: N815 (K: the solver steps, as in the paper)
    sweep_repeats: int = 3
    quiet_factor: float = 1.25  # a step is quiet when the F probe next to it is <= this x the fastest; 0: all
    profile: str | None = None  # write torch.profiler tables of one step per variant to this directory

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        self.sweep_k = tuple(self.sweep_k)
        self.sweep_K = tuple(self.sweep_K)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {list(MODELS)}")
        if self.solver not in forward_solver_names():
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {list(forward_solver_names())}")
        if not self.modes:
            raise ValueError(f"no backward modes given; choose from {list(MODES)}")
        for mode in self.modes:
            check_mode(mode)
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        wi = self.warm_iter
        if wi is not None and (not isinstance(wi, int) or isinstance(wi, bool) or wi < 1):
            raise ValueError(f"warm_iter must be an integer >= 1 or None (solver_iter), got {wi!r}")
        if self.warm_starts and not self.model.startswith("mdeq"):
            raise ValueError(
                f"--warm-starts needs a model with an init head (mdeq-tiny), got {self.model!r}; "
                "drop --warm-starts or choose --model mdeq-tiny"
            )
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")
        ce = self.check_every
        if ce not in (None, UNSET) and (not isinstance(ce, int) or isinstance(ce, bool) or ce < 1):
            raise ValueError(f"check_every must be an integer >= 1, None (never) or {UNSET!r}, got {ce!r}")
        if any(k < 1 for k in self.sweep_k) or any(k < 1 for k in self.sweep_K):
            raise ValueError("--sweep-k and --sweep-K values must be >= 1")
        if self.compare not in (None, "torchdeq"):
            raise ValueError(f"--compare only knows 'torchdeq', got {self.compare!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} but torch.cuda.is_available() is False on this machine")
        forward_solver(self)  # the solver options are valid (check_every exists where asked for)
        if self.sync_free:  # the solver can run without host checks
            make_solver(self, self.solver, self.solver_iter, self.solver_tol, self.stop, None)
        if self.fused:  # the solver has fused bookkeeping
            make_solver(self, self.solver, self.solver_iter, self.solver_tol, self.stop, fused=True)


__all__ = ["BenchConfig", "MODELS", "MODES"]
