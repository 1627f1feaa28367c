"""``phantomgrad bench``: time and memory of every backward mode (the paper's Table 2),
optionally side by side with TorchDEQ.

What one run measures, for a model (the synthetic layer of Fig. 1, MDEQ-tiny at
CIFAR size, or a DEQ transformer language model on random tokens) and one forward
solver shared by every mode:

* per backward mode (Implicit with a Broyden and with a fixed-point backward solve,
  UPG, NPG, JFB, Backprop): the forward, the backward and the whole training step
  (stem -> DEQ -> head -> cross-entropy -> backward -> SGD step), and inside them the
  DEQ layer's own forward and backward (timed with autograd hooks on the layer's
  output and on the injection, so the head's and stem's share is left out);
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

``--sweep-k`` and ``--sweep-K`` time UPG/NPG against k and Implicit/Backprop against
the solver steps K (the paper's Table 2 as measurements) and plot them.

TorchDEQ (``--compare torchdeq``) is optional and not a dependency; install it with
``pip install --no-deps torchdeq==0.1.0`` (without its dependencies, so torch stays
at the project's version). It gets the same F (the same module object, so the same
weights), stem, head, batch, forward solver and settings; its ``grad=k, tau=lambda``
is UPG, ``grad=1, tau=1`` is JFB and ``ift=True`` is Implicit. It has no NPG and no
backprop-through-the-solver mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import phantomgrad as pg

from .cosine import SyntheticLayer

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("implicit-broyden", "implicit-fixed_point", "upg", "npg", "jfb", "backprop")
MODELS: tuple[str, ...] = ("mdeq-tiny", "synthetic", "deq-transformer-small", "deq-transformer")
SOLVER_NAMES: tuple[str, ...] = ("fixed_point", "anderson", "broyden")
TORCHDEQ_INSTALL = "pip install --no-deps torchdeq==0.1.0"
_TD_SOLVER = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}

State = Any  # a Tensor or a tuple of Tensors


# ----------------------------------------------------------------------------- configuration

@dataclass
class BenchConfig:
    """Everything one ``phantomgrad bench`` run depends on (plain data, stored in the JSON)."""

    model: str = "mdeq-tiny"
    batch: int = 32
    image_size: int = 32          # mdeq-tiny: H = W
    dim: int = 64                 # synthetic: state size
    in_dim: int = 32              # synthetic: input size
    seq_len: int = 64             # deq-transformer*: tokens per sequence
    vocab: int = 64               # deq-transformer*: token ids (random; the cost does not depend on the text)
    solver: str = "broyden"       # the forward solver of every mode
    solver_iter: int = 30         # its max_iter (K)
    solver_tol: float = 1e-4
    stop: str = "rel"
    broyden_memory: int | None = None  # None: as many slots as steps, TorchDEQ's default
    anderson_m: int = 5
    modes: tuple[str, ...] = MODES
    k: int = 5
    damping: float = 0.5
    backward_iter: int = 30       # Implicit's backward solver steps
    backward_tol: float = 1e-6
    repeats: int = 5
    warmup: int = 1
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    compare: str | None = None    # None or "torchdeq"
    memory: bool = True
    cosine: bool = True
    solvers: bool = True          # the forward-solver overhead table
    ref_iter: int = 100           # the reference gradient: solver steps in both directions
    ref_tol: float = 1e-7
    sweep_k: tuple[int, ...] = ()
    sweep_K: tuple[int, ...] = ()
    sweep_repeats: int = 3
    quiet_factor: float = 1.25    # a step counts as quiet when the F probe next to it is <= this x the fastest; 0: use all
    profile: str | None = None    # write torch.profiler tables of one step per variant to this directory

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        self.sweep_k = tuple(self.sweep_k)
        self.sweep_K = tuple(self.sweep_K)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {list(MODELS)}")
        if self.solver not in SOLVER_NAMES:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {list(SOLVER_NAMES)}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"unknown or no backward modes {unknown or list(self.modes)}; choose from {list(MODES)}")
        for name in ("batch", "image_size", "dim", "in_dim", "seq_len", "vocab", "solver_iter", "k", "backward_iter", "repeats", "threads", "ref_iter", "sweep_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")
        if any(k < 1 for k in self.sweep_k) or any(k < 1 for k in self.sweep_K):
            raise ValueError("--sweep-k and --sweep-K values must be >= 1")
        if self.compare not in (None, "torchdeq"):
            raise ValueError(f"--compare only knows 'torchdeq', got {self.compare!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} but torch.cuda.is_available() is False on this machine")


@dataclass(frozen=True)
class Variant:
    """One measured setting: a library, a backward mode and its step counts."""

    lib: str          # "phantomgrad" or "torchdeq"
    mode: str
    k: int
    damping: float
    backward_iter: int
    solver_iter: int

    @property
    def label(self) -> str:
        if self.mode in ("upg", "npg"):
            return f"{self.mode.upper()} A_{{{self.k},{self.damping:g}}}"
        if self.mode.startswith("implicit"):
            return f"Implicit ({self.mode.split('-', 1)[1]}, {self.backward_iter})"
        if self.mode == "backprop":
            return f"Backprop ({self.solver_iter})"
        return "JFB"


def _variant(cfg: BenchConfig, mode: str, lib: str = "phantomgrad", **over: int) -> Variant:
    v = Variant(lib, mode, cfg.k, cfg.damping, cfg.backward_iter, cfg.solver_iter)
    return replace(v, **over)


def torchdeq_has(mode: str) -> bool:
    """Whether TorchDEQ has an equivalent of this backward mode."""
    return mode not in ("npg", "backprop")


# ----------------------------------------------------------------------------- models

class SyntheticModel(nn.Module):
    """x -> Linear (the injection u) -> DEQ of h = tanh(W h + U u + b), ||W||_2 = 0.9 -> Linear -> logits."""

    def __init__(self, dim: int, in_dim: int, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.stem = nn.Linear(in_dim, in_dim)
        self.deq = pg.DEQ(SyntheticLayer(dim, in_dim, 0.9, generator, dtype=torch.float32))
        self.head = nn.Linear(dim, num_classes)

    @property
    def block(self) -> nn.Module:
        return self.deq.f


@dataclass
class Problem:
    """A model cut into the parts the bench drives itself: stem -> DEQ -> head."""

    name: str
    model: nn.Module        # has .stem, .block (the map F), .head and .deq (a pg.DEQ over .block)
    x: Tensor
    y: Tensor
    start: Callable[[Tensor], tuple[Any, State]]   # x -> (injection u, zero state z0)
    head: Callable[[State], Tensor]

    @property
    def block(self) -> nn.Module:
        return self.model.block

    def f(self, z: State, u: Any) -> State:
        return self.model.block(z, u)


def build_problem(cfg: BenchConfig) -> Problem:
    """The model (seeded, so every process builds the same weights), a batch and random labels."""
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    classes = 10
    if cfg.model == "synthetic":
        model = SyntheticModel(cfg.dim, cfg.in_dim, classes, gen)
        x = torch.randn(cfg.batch, cfg.in_dim, generator=gen)

        def start(x: Tensor) -> tuple[Any, State]:
            return model.stem(x), x.new_zeros(x.shape[0], cfg.dim)

        head = model.head
    elif cfg.model.startswith("deq-transformer"):
        from ..models.transformer import DEQTransformer, TransformerConfig

        model = DEQTransformer(TransformerConfig.named(cfg.model, vocab_size=cfg.vocab))
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len + 1), generator=gen)
        x = tokens[:, :-1]  # position t predicts token t + 1

        def start(x: Tensor) -> tuple[Any, State]:
            u = model.injection(x)
            z0 = u.new_zeros(x.shape[0], x.shape[1], model.config.d_model)
            model.block.reset_dropout(z0)
            model.drop_out.reset(z0)
            return u, z0

        def head(z: Tensor) -> Tensor:
            return model.head(z).reshape(-1, cfg.vocab)  # (B L, V) against the (B L,) next tokens

        y = tokens[:, 1:].reshape(-1)
    else:
        from ..models.mdeq import MDEQ, MDEQConfig

        mcfg = MDEQConfig.named(cfg.model, in_channels=3, image_size=cfg.image_size, num_classes=classes)
        model = MDEQ(mcfg)
        x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
        sizes = mcfg.branch_sizes()

        def start(x: Tensor) -> tuple[Any, State]:
            u = model.stem(x)
            z0 = tuple(x.new_zeros(x.shape[0], c, h, w) for c, (h, w) in zip(mcfg.channels, sizes))
            model.block.reset_dropout(z0)
            return u, z0

        head = model.head
    if not cfg.model.startswith("deq-transformer"):
        y = torch.randint(0, classes, (cfg.batch,), generator=gen)
    model.to(device=device, dtype=dtype).train()
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)  # token ids stay integers
    return Problem(cfg.model, model, x, y.to(device), start, head)


# ----------------------------------------------------------------------------- solvers and modes

def make_forward_solver(cfg: BenchConfig, name: str | None = None, max_iter: int | None = None, tol: float | None = None) -> pg.Solver:
    name = name or cfg.solver
    max_iter = max_iter or cfg.solver_iter
    tol = cfg.solver_tol if tol is None else tol
    if name == "broyden":
        return pg.Broyden(max_iter=max_iter, tol=tol, stop=cfg.stop, memory=cfg.broyden_memory or max_iter)
    if name == "anderson":
        return pg.Anderson(max_iter=max_iter, tol=tol, stop=cfg.stop, m=cfg.anderson_m)
    return pg.FixedPoint(max_iter=max_iter, tol=tol, stop=cfg.stop)


def make_backward_mode(cfg: BenchConfig, v: Variant) -> pg.BackwardMode:
    if v.mode == "implicit-broyden":
        memory = cfg.broyden_memory or v.backward_iter
        return pg.Implicit(pg.Broyden(max_iter=v.backward_iter, tol=cfg.backward_tol, stop="rel", memory=memory))
    if v.mode == "implicit-fixed_point":
        return pg.Implicit(pg.FixedPoint(max_iter=v.backward_iter, tol=cfg.backward_tol, stop="rel"))
    if v.mode == "upg":
        return pg.UPG(k=v.k, damping=v.damping)
    if v.mode == "npg":
        return pg.NPG(k=v.k, damping=v.damping)
    if v.mode == "jfb":
        return pg.JFB()
    return pg.Backprop()


def _import_torchdeq():
    try:
        import torchdeq  # noqa: F401
        from torchdeq import get_deq
    except ImportError:
        raise ValueError(
            f"--compare torchdeq needs the optional package torchdeq; install it without its dependencies "
            f"(so torch stays at this project's version) with: {TORCHDEQ_INSTALL}"
        ) from None
    return get_deq


def make_torchdeq(cfg: BenchConfig, v: Variant, solver: str | None = None) -> tuple[nn.Module, dict]:
    """TorchDEQ's DEQ layer with the same forward solver and settings, and the solver kwargs to pass per call.

    Settings matched (torchdeq 0.1.0, read from its source): ``f_solver``/``f_max_iter``/
    ``f_tol``/``f_stop_mode`` = ours; Anderson's history ``m`` = ours (TorchDEQ defaults to
    6); Broyden's ``LBFGS_thres`` = our Broyden memory; Implicit: ``ift=True`` with
    ``b_solver``, ``b_max_iter``, ``b_tol`` and ``b_stop_mode='rel'`` = ours (its backward
    Broyden keeps every step, as ours does here); UPG: ``grad=k, tau=damping``; JFB:
    ``grad=1, tau=1``. The 'sliced' core (its default) with one state.
    """
    get_deq = _import_torchdeq()
    solver = solver or cfg.solver
    kw: dict[str, Any] = dict(
        core="sliced", f_solver=_TD_SOLVER[solver], f_max_iter=v.solver_iter,
        f_tol=cfg.solver_tol, f_stop_mode=cfg.stop,
    )
    if v.mode.startswith("implicit"):
        kw.update(ift=True, b_solver=_TD_SOLVER[v.mode.split("-", 1)[1]], b_max_iter=v.backward_iter,
                  b_tol=cfg.backward_tol, b_stop_mode="rel")
    elif v.mode == "upg":
        kw.update(grad=v.k, tau=v.damping)
    elif v.mode == "jfb":
        kw.update(grad=1, tau=1.0)
    else:
        raise ValueError(f"TorchDEQ has no equivalent of backward mode {v.mode!r}")
    solver_kwargs: dict[str, Any] = {}
    if solver == "anderson":
        solver_kwargs["m"] = cfg.anderson_m
    elif solver == "broyden":
        solver_kwargs["LBFGS_thres"] = cfg.broyden_memory or v.solver_iter
    return get_deq(**kw), solver_kwargs


# ----------------------------------------------------------------------------- clocks, counters

def _parts(z: Any) -> list[Tensor]:
    if isinstance(z, Tensor):
        return [z]
    if isinstance(z, (tuple, list)):
        return [p for q in z for p in _parts(q)]
    return []


class _Clock:
    """Wall clock that synchronises CUDA before reading."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class _BackwardWindow:
    """Times the DEQ layer's backward: from the moment the gradient of its output is
    complete (the last output part's hook) to the moment the injection's gradient is
    complete (the last input part's hook). The CPU autograd engine runs in the calling
    thread, so these hooks fire in order."""

    def __init__(self, clock: _Clock):
        self.clock = clock
        self.start = self.end = math.nan

    def arm(self, outputs: Any, inputs: Any) -> None:
        self.start = self.end = math.nan
        for t in _parts(outputs):
            if t.requires_grad:
                t.register_hook(self._on_output)
        for t in _parts(inputs):
            if t.requires_grad:
                t.register_hook(self._on_input)

    def _on_output(self, grad: Tensor) -> None:
        now = self.clock()
        self.start = now if math.isnan(self.start) else max(self.start, now)

    def _on_input(self, grad: Tensor) -> None:
        now = self.clock()
        self.end = now if math.isnan(self.end) else max(self.end, now)

    @property
    def elapsed(self) -> float:
        return self.end - self.start


class _CountVJP(torch.autograd.Function):
    """Identity on F's output that counts the backward passes through it."""

    @staticmethod
    def forward(ctx, counter: "FCounter", *tensors: Tensor):
        ctx.counter = counter
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        ctx.counter.vjp += 1
        return (None, *grads)


class _ForwardWrapper:
    """Wraps the ``forward`` of one module instance while installed: ``install()`` puts
    ``self._wrap(original_forward)`` on the instance, ``remove()`` restores the class's."""

    module: nn.Module

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def install(self):
        self.module.forward = self._wrap(self.module.forward)
        return self

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class FCounter(_ForwardWrapper):
    """Counts evaluations of F (a module) by phase, and backward passes through them.

    ``install()`` wraps the module instance's ``forward``; ``remove()`` restores it. Used
    in a counting pass of its own, never while timing (the wrapper copies F's output).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.phase = "forward"
        self.calls: dict[str, int] = {}
        self.vjp = 0

    def reset(self) -> None:
        self.calls, self.vjp, self.phase = {}, 0, "forward"

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.calls[self.phase] = self.calls.get(self.phase, 0) + 1
            parts = list(out) if isinstance(out, (tuple, list)) else [out]
            if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
                parts = list(_CountVJP.apply(self, *parts))
                return type(out)(parts) if isinstance(out, (tuple, list)) else parts[0]
            return out

        return counted


class FTimer(_ForwardWrapper):
    """Accumulates the wall time spent inside F (a module) while installed, so a solve's
    overhead is measured against the F evaluations of the same run (immune to drift
    between separate measurements). Synchronises CUDA around each call."""

    def __init__(self, module: nn.Module, clock: "_Clock"):
        self.module, self.clock = module, clock
        self.seconds, self.calls = 0.0, 0

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = self.clock()
            out = original(*args, **kwargs)
            self.seconds += self.clock() - t0
            self.calls += 1
            return out

        return timed


def _rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _rss_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- the runner

class Runner:
    """Drives training steps of one problem under many variants (same weights, same batch)."""

    def __init__(self, cfg: BenchConfig, problem: Problem):
        self.cfg, self.p = cfg, problem
        self.device = torch.device(cfg.device)
        self.clock = _Clock(self.device)
        self.window = _BackwardWindow(self.clock)
        self.params = [q for q in problem.model.parameters() if q.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.snapshot = {k: v.detach().clone() for k, v in problem.model.state_dict().items()}
        self._td: dict[tuple[Variant, str], tuple[nn.Module, dict]] = {}
        self.counter: FCounter | None = None

    # -- the DEQ call of each library
    def _deq(self, v: Variant, u: Any, z0: State) -> tuple[State, Any]:
        if v.lib == "phantomgrad":
            deq = self.p.model.deq
            deq.solver = make_forward_solver(self.cfg, max_iter=v.solver_iter)
            deq.backward_mode = make_backward_mode(self.cfg, v)
            return deq(u, z0)
        tdeq, skw = self.torchdeq(v)
        tdeq.train(self.p.model.training)
        f = self.p.block
        if isinstance(z0, Tensor):
            out, info = tdeq(lambda z: f(z, u), z0, solver_kwargs=dict(skw))
            return out[-1], info
        out, info = tdeq(lambda *zs: f(tuple(zs), u), list(z0), solver_kwargs=dict(skw))
        return tuple(out[-1]), info

    def torchdeq(self, v: Variant, solver: str | None = None) -> tuple[nn.Module, dict]:
        key = (v, solver or self.cfg.solver)
        if key not in self._td:
            self._td[key] = make_torchdeq(self.cfg, v, solver)
        return self._td[key]

    def restore(self) -> None:
        self.p.model.load_state_dict(self.snapshot)

    def _phase(self, name: str) -> None:
        if self.counter is not None:
            self.counter.phase = name

    def step(self, v: Variant, optimizer_step: bool = True) -> dict[str, float]:
        """One training step; returns its timings in seconds."""
        clock = self.clock
        self.opt.zero_grad(set_to_none=True)
        self._phase("forward")
        cpu0 = time.process_time()
        t0 = clock()
        u, z0 = self.p.start(self.p.x)
        t1 = clock()
        z, info = self._deq(v, u, z0)
        self.last_info = info
        t2 = clock()
        loss = F.cross_entropy(self.p.head(z), self.p.y)
        self.window.arm(z, u)
        t3 = clock()
        self._phase("backward")
        loss.backward()
        t4 = clock()
        if optimizer_step:
            self.opt.step()
        t5 = clock()
        cpu = time.process_time() - cpu0
        self._phase("forward")
        return {
            "forward": t3 - t0, "deq_forward": t2 - t1, "backward": t4 - t3,
            "deq_backward": self.window.elapsed, "step": t5 - t0, "cpu": cpu, "loss": float(loss.detach()),
        }

    # -- the floor: F and its VJPs at a solved state
    def prepare_floor(self) -> None:
        with torch.no_grad():
            u, z0 = self.p.start(self.p.x)
            self.u_fixed = tuple(t.detach() if isinstance(t, Tensor) else t for t in u) if isinstance(u, tuple) else u.detach()
            self.p.model.deq.eval()
            self.p.model.deq.solver = make_forward_solver(self.cfg)
            self.z_fixed, _ = self.p.model.deq(self.u_fixed, z0)
            self.p.model.deq.train()

    def time_f(self) -> float:
        with torch.no_grad():
            t0 = self.clock()
            self.p.f(self.z_fixed, self.u_fixed)
            return self.clock() - t0

    def time_vjp(self, full: bool) -> float:
        z = tuple(t.clone().requires_grad_() for t in _parts(self.z_fixed))
        z_in = z if isinstance(self.z_fixed, tuple) else z[0]
        u = self.u_fixed
        u_req = [t.clone().requires_grad_() for t in _parts(u)]
        if isinstance(u, tuple):
            it = iter(u_req)
            u_in = tuple(next(it) if isinstance(t, Tensor) else t for t in u)
        else:
            u_in = u_req[0]
        with torch.enable_grad():
            out = _parts(self.p.f(z_in, u_in))
        v = [torch.randn_like(o) for o in out]
        inputs = list(z) + (self.params_f() + u_req if full else [])
        t0 = self.clock()
        torch.autograd.grad(out, inputs, v, allow_unused=True)
        return self.clock() - t0

    def params_f(self) -> list[Tensor]:
        return [q for q in self.p.block.parameters() if q.requires_grad]

    # -- one untimed step: F counts, the gradient of F's parameters, the backward solve's steps
    def probe(self, v: Variant) -> tuple[dict[str, Any], Tensor]:
        """Runs one training step (no optimizer step) with F wrapped by an :class:`FCounter`.

        Returns the counts (``f_forward``, ``f_backward_calls``, ``vjp_backward``, and
        ``backward_nstep`` from ``info.backward`` for phantomgrad's Implicit) and the
        gradient of F's parameters (float64, for the cosine).
        """
        counter = FCounter(self.p.block).install()
        self.counter = counter
        try:
            self.step(v, optimizer_step=False)
            grad = self._grad_f()
        finally:
            counter.remove()
            self.counter = None
            self.opt.zero_grad(set_to_none=True)
            self.restore()
        info = self.last_info
        back = getattr(info, "backward", None) if v.lib == "phantomgrad" else None
        counts = {
            "f_forward": counter.calls.get("forward", 0), "f_backward_calls": counter.calls.get("backward", 0),
            "vjp_backward": counter.vjp, "backward_nstep": int(back.nstep.max()) if back is not None else None,
        }
        return counts, grad

    def count(self, v: Variant) -> dict[str, Any]:
        """Evaluations of F in one training step (see :meth:`probe`)."""
        return self.probe(v)[0]

    def _grad_f(self) -> Tensor:
        return torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten() for q in self.params_f()]).double()

    def reference_grad(self) -> tuple[Tensor, dict]:
        """Implicit gradient with tight solves in both directions (``ref_iter`` steps, ``ref_tol``)."""
        cfg = self.cfg
        deq = self.p.model.deq
        deq.solver = make_forward_solver(cfg, max_iter=cfg.ref_iter, tol=cfg.ref_tol)
        deq.backward_mode = pg.Implicit(pg.Broyden(max_iter=cfg.ref_iter, tol=cfg.ref_tol, stop="rel", memory=cfg.ref_iter))
        self.opt.zero_grad(set_to_none=True)
        u, z0 = self.p.start(self.p.x)
        z, info = deq(u, z0)
        F.cross_entropy(self.p.head(z), self.p.y).backward()
        g = self._grad_f()
        self.opt.zero_grad(set_to_none=True)
        b = info.backward
        return g, {
            "forward_rel_residual": float(info.rel_residual.max()),
            "backward_rel_residual": float(b.rel_residual.max()) if b is not None else math.nan,
            "forward_nstep": int(info.nstep.max()), "backward_nstep": int(b.nstep.max()) if b is not None else 0,
            # an "exact" gradient needs both solves converged; 1e-3 is loose enough for float32
            "converged": bool(float(info.rel_residual.max()) <= 1e-3 and b is not None and float(b.rel_residual.max()) <= 1e-3),
        }


# ----------------------------------------------------------------------------- statistics

def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _spread(xs: Sequence[float]) -> float:
    """Interquartile range over median (0 for fewer than 2 samples)."""
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    med = statistics.median(xs)
    return (q3 - q1) / med if med else math.nan


def _paired_ratio(num: Sequence[float], den: Sequence[float], mask: Sequence[bool] | None = None) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios num[r] / den[r] (over the rounds in
    ``mask`` when some are, else over all; rounds with a NaN or a zero denominator are left out)."""
    valid = [bool(b) and not (math.isnan(a) or math.isnan(b)) for a, b in zip(num, den)]
    ratios = [a / b for a, b, v in zip(num, den, valid) if v]
    if mask is not None:
        ratios = _pick(ratios, [q for q, v in zip(mask, valid) if v])
    if not ratios:
        return math.nan, math.nan, math.nan
    return statistics.median(ratios), min(ratios), max(ratios)


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares slope, intercept and R^2."""
    n = len(xs)
    if n < 2:
        return math.nan, math.nan, math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else math.nan
    icpt = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    return slope, icpt, 1 - ss_res / ss_tot if ss_tot else 1.0


# ----------------------------------------------------------------------------- memory

def measure_memory(cfg: BenchConfig, v: Variant, runner: Runner | None = None) -> dict[str, float]:
    """Peak memory of a training step under variant v, in MiB.

    CUDA: in-process, ``max_memory_allocated`` over the step minus what was allocated
    before it. CPU: a fresh Python process builds the same problem, resets the kernel's
    RSS high-water mark, runs one step and reports the new high-water mark minus the
    RSS before the steps (``step_mib``) and the high-water mark itself (``peak_rss_mib``).
    """
    if cfg.device.startswith("cuda"):
        assert runner is not None
        runner.step(v)
        runner.restore()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner.step(v)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        runner.restore()
        return {"step_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20}
    spec = json.dumps({"config": asdict(cfg), "variant": asdict(v)})
    proc = subprocess.run(
        [sys.executable, "-m", "phantomgrad.experiments.bench", "--memory-worker", spec],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        log.warning("memory worker for %s failed: %s", v.label, proc.stderr.strip()[-2000:])
        return {"step_mib": math.nan, "peak_rss_mib": math.nan}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    cfg = BenchConfig(**spec["config"])
    v = Variant(**spec["variant"])
    torch.set_num_threads(cfg.threads)
    runner = Runner(cfg, build_problem(cfg))
    if v.lib == "torchdeq":
        runner.torchdeq(v)  # import and build outside the measured window
    _rss_reset()
    before = _rss_kib("VmRSS")
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.step(v)
    hwm = _rss_kib("VmHWM")
    if hwm is None or before is None:  # no /proc: fall back to ru_maxrss (not resettable)
        hwm, before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base_max
    print(json.dumps({"step_mib": max(0, hwm - before) / 1024, "peak_rss_mib": hwm / 1024}))
    return 0


# ----------------------------------------------------------------------------- the measurements

@dataclass
class BenchResult:
    config: BenchConfig
    machine: dict[str, Any] = field(default_factory=dict)
    floors: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    solvers: list[dict[str, Any]] = field(default_factory=list)
    sweep_k: list[dict[str, Any]] = field(default_factory=list)
    sweep_K: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def machine_info(cfg: BenchConfig) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": cfg.device,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if cfg.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    try:
        import torchdeq

        info["torchdeq"] = getattr(torchdeq, "__version__", "installed")
    except ImportError:
        pass
    return info


def _time_rounds(runner: Runner, variants: list[Variant], repeats: int, warmup: int, floors: bool) -> dict:
    """Round-robin timing: each round runs every variant once. With ``floors``, the floor
    probes (one F, one VJP wrt the state, one full VJP) are timed right after each
    variant's step, so a variant's backward can be divided by the floor of the same
    moment (``floor_*`` samples of that variant)."""
    samples: dict[Variant, dict[str, list[float]]] = {v: {} for v in variants}
    for r in range(warmup + repeats):
        for v in variants:
            t = runner.step(v)
            runner.restore()
            if floors:
                t.update(floor_f=runner.time_f(), floor_vjp_state=runner.time_vjp(full=False), floor_vjp_full=runner.time_vjp(full=True))
            if r >= warmup:
                for key, val in t.items():
                    samples[v].setdefault(key, []).append(val)
        log.info("round %d/%d done", r + 1, warmup + repeats)
    return samples


def _quiet_mask(samples: dict[Variant, dict[str, list[float]]], factor: float) -> dict[Variant, list[bool]]:
    """Per variant and round: was the machine quiet? The F probe timed right after the step
    must be within ``factor`` of the fastest F probe of the whole run (on a shared machine
    another process's burst slows F and everything else several-fold)."""
    fs = [x for s in samples.values() for x in s.get("floor_f", [])]
    if not fs or factor <= 0:
        return {v: [True] * len(s.get("step", [])) for v, s in samples.items()}
    fastest = min(fs)
    return {v: [x <= factor * fastest for x in s["floor_f"]] for v, s in samples.items()}


def _pick(xs: Sequence[float], mask: Sequence[bool]) -> list[float]:
    """The quiet samples, or all of them when none was quiet."""
    quiet = [x for x, q in zip(xs, mask) if q]
    return quiet if quiet else list(xs)


def _row(v: Variant, s: dict[str, list[float]], mask: Sequence[bool] | None = None) -> dict[str, Any]:
    mask = list(mask) if mask is not None else [True] * len(s.get("step", []))
    row: dict[str, Any] = {"lib": v.lib, "mode": v.mode, "label": v.label, **{k: getattr(v, k) for k in ("k", "damping", "backward_iter", "solver_iter")}}
    for key in ("forward", "deq_forward", "backward", "deq_backward", "step", "cpu"):
        xs = _pick(s.get(key, []), mask)
        row[f"{key}_ms"] = 1e3 * _median(xs)
        row[f"{key}_spread"] = _spread(xs)
        row[f"{key}_ms_all_rounds"] = 1e3 * _median(s.get(key, []))
    row["quiet_rounds"] = sum(mask)
    row["rounds"] = len(mask)
    row["quiet_mask"] = mask
    row["samples_ms"] = {key: [1e3 * x for x in xs] for key, xs in s.items() if key != "loss" and not key.startswith("floor")}
    row["floor_samples_ms"] = {key: [1e3 * x for x in xs] for key, xs in s.items() if key.startswith("floor")}
    return row


def _floor_of(row: dict[str, Any], f_ms: float, vjp_state_ms: float, vjp_full_ms: float) -> float:
    """The VJPs of F a backward cannot avoid, in ms: k full VJPs for UPG; k - 1 state-only
    plus one full for NPG; the backward solve's VJPs state-only plus one full for
    Implicit; one full for JFB; the solver's steps full for Backprop."""
    vz, vf = vjp_state_ms, vjp_full_ms
    n = row.get("vjp_backward")
    if row["mode"] == "upg":
        return row["k"] * vf
    if row["mode"] == "npg":
        return (row["k"] - 1) * vz + vf
    if row["mode"] == "jfb":
        return vf
    if row["mode"].startswith("implicit") and n:
        return (n - 1) * vz + vf
    if row["mode"] == "backprop" and n:
        return n * vf
    return math.nan


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Every measurement of one ``phantomgrad bench`` run (see the module docstring)."""
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    if cfg.compare == "torchdeq":
        _import_torchdeq()
    result = BenchResult(cfg, machine_info(cfg))
    problem = build_problem(cfg)
    runner = Runner(cfg, problem)
    runner.prepare_floor()

    variants: list[Variant] = []
    for mode in cfg.modes:
        variants.append(_variant(cfg, mode))
        if cfg.compare == "torchdeq" and torchdeq_has(mode):
            variants.append(_variant(cfg, mode, lib="torchdeq"))

    # 1. one untimed probe step each: F counts and the gradient for the cosine
    probes = {v: runner.probe(v) for v in variants}
    counts = {v: c for v, (c, _) in probes.items()}

    if cfg.profile is not None:
        profile_variants(cfg, runner, variants, Path(cfg.profile))

    # 2. timing, round-robin
    log.info("timing %d variants x %d rounds", len(variants), cfg.warmup + cfg.repeats)
    samples = _time_rounds(runner, variants, cfg.repeats, cfg.warmup, floors=True)
    quiet = _quiet_mask(samples, cfg.quiet_factor)
    for key in ("f", "vjp_state", "vjp_full"):
        allq = [x for v in variants for x in _pick(samples[v][f"floor_{key}"], quiet[v])]
        result.floors[f"{key}_ms"] = 1e3 * _median(allq)
    rows = {}
    for v in variants:
        row = _row(v, samples[v], quiet[v])
        row.update(counts[v])
        sv = samples[v]
        fl = {k: _pick(sv[f"floor_{k}"], quiet[v]) for k in ("f", "vjp_state", "vjp_full")}
        row["floor_ms"] = _floor_of(row, 1e3 * _median(fl["f"]), 1e3 * _median(fl["vjp_state"]), 1e3 * _median(fl["vjp_full"]))
        per_round = [1e3 * b / _floor_of(row, 1e3 * f, 1e3 * vz, 1e3 * vf)
                     for b, f, vz, vf in zip(_pick(sv["deq_backward"], quiet[v]), fl["f"], fl["vjp_state"], fl["vjp_full"])]
        row["deq_backward_over_floor"] = _median(per_round)  # paired per round, then the median
        rows[v] = row
    for v in variants:  # ratios per round against the partner variant
        if v.lib == "torchdeq":
            pgv = replace(v, lib="phantomgrad")
            both = [a and b for a, b in zip(quiet[v], quiet[pgv])]
            for key in ("step", "forward", "backward", "deq_forward", "deq_backward"):
                med, lo, hi = _paired_ratio(samples[v][key], samples[pgv][key], both)
                rows[pgv][f"torchdeq_over_phantomgrad_{key}"] = med
                if key == "step":
                    rows[pgv]["torchdeq_over_phantomgrad_step_range"] = [lo, hi]

    # 3. cosine to a tightly solved Implicit gradient
    if cfg.cosine:
        ref, result.reference = runner.reference_grad()
        runner.restore()
        cos = torch.nn.functional.cosine_similarity
        for v in variants:
            rows[v]["cosine"] = float(cos(probes[v][1], ref, dim=0))
            if v.lib == "torchdeq":
                rows[v]["cosine_vs_phantomgrad"] = float(cos(probes[v][1], probes[replace(v, lib="phantomgrad")][1], dim=0))

    # 4. peak memory
    if cfg.memory:
        for v in variants:
            rows[v].update(measure_memory(cfg, v, runner))
    result.rows = [rows[v] for v in variants]

    # 5. forward solvers alone
    if cfg.solvers:
        result.solvers = solver_table(cfg, runner)

    # 6. sweeps
    if cfg.sweep_k:
        result.sweep_k = sweep(cfg, runner, [_variant(cfg, m, k=k) for k in cfg.sweep_k for m in ("upg", "npg")])
    if cfg.sweep_K:
        sv = []
        for K in cfg.sweep_K:
            sv += [_variant(cfg, "implicit-broyden", backward_iter=K), _variant(cfg, "implicit-fixed_point", backward_iter=K),
                   _variant(cfg, "backprop", solver_iter=K)]
        result.sweep_K = sweep(cfg, runner, sv)
    result.targets = evaluate_targets(result)
    result.seconds = time.perf_counter() - start
    return result


def profile_variants(cfg: BenchConfig, runner: Runner, variants: list[Variant], out_dir: Path) -> None:
    """One training step per variant (after a warm-up step) under torch.profiler; the
    operators sorted by self CPU time go to ``out_dir/profile_<lib>_<mode>.txt``, and the
    forward solvers alone (no grad) to ``profile_solvers.txt``."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    for v in variants:
        runner.step(v)
        runner.restore()
        with profile(activities=acts) as prof:
            runner.step(v)
        runner.restore()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (out_dir / f"profile_{v.lib}_{v.mode}.txt").write_text(f"{v.lib} {v.label}: one training step\n\n{table}\n")
    p = runner.p
    with torch.no_grad():
        u, z0 = p.start(p.x)
    lines = []
    for solver in SOLVER_NAMES:
        for lib in ["phantomgrad"] + (["torchdeq"] if cfg.compare == "torchdeq" else []):
            with profile(activities=acts) as prof, torch.no_grad():
                if lib == "phantomgrad":
                    p.model.deq.eval()
                    p.model.deq.solver = make_forward_solver(cfg, name=solver)
                    p.model.deq(u, z0)
                    p.model.deq.train()
                else:
                    tdeq, skw = runner.torchdeq(_variant(cfg, "jfb"), solver)
                    tdeq.eval()
                    if isinstance(z0, Tensor):
                        tdeq(lambda z: p.f(z, u), z0, solver_kwargs=dict(skw))
                    else:
                        tdeq(lambda *zs: p.f(tuple(zs), u), list(z0), solver_kwargs=dict(skw))
                    tdeq.train()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
            lines.append(f"{lib} {solver} ({cfg.solver_iter} steps, no grad)\n\n{table}\n")
    (out_dir / "profile_solvers.txt").write_text("\n".join(lines))
    log.info("wrote profiles to %s", out_dir)


def sweep(cfg: BenchConfig, runner: Runner, variants: list[Variant]) -> list[dict[str, Any]]:
    """Time (and measure the memory of) many variants of phantomgrad, round-robin."""
    counts = {v: runner.count(v) for v in variants}
    samples = _time_rounds(runner, variants, cfg.sweep_repeats, cfg.warmup, floors=True)
    quiet = _quiet_mask(samples, cfg.quiet_factor)
    rows = []
    for v in variants:
        row = _row(v, samples[v], quiet[v])
        row.update(counts[v])
        if cfg.memory:
            row.update(measure_memory(cfg, v, runner))
        rows.append(row)
    return rows


def solver_table(cfg: BenchConfig, runner: Runner) -> list[dict[str, Any]]:
    """Each forward solver alone under no_grad (K steps), against the time its own F
    evaluations took in the same run (:class:`FTimer`): overhead = solve - inside F,
    medians over rounds, the overhead in % is the median of the per-round ratios."""
    p = runner.p
    with torch.no_grad():
        u, z0 = p.start(p.x)
    libs = ["phantomgrad"] + (["torchdeq"] if cfg.compare == "torchdeq" else [])
    probe = _variant(cfg, "jfb")  # TorchDEQ needs some backward mode to build; eval mode never uses it
    deq = p.model.deq

    def solve(lib: str, solver: str) -> None:
        with torch.no_grad():
            if lib == "phantomgrad":
                deq.eval()
                deq.solver = make_forward_solver(cfg, name=solver)
                deq(u, z0)
                deq.train()
            else:
                tdeq, skw = runner.torchdeq(probe, solver)
                tdeq.eval()
                if isinstance(z0, Tensor):
                    tdeq(lambda z: p.f(z, u), z0, solver_kwargs=dict(skw))
                else:
                    tdeq(lambda *zs: p.f(tuple(zs), u), list(z0), solver_kwargs=dict(skw))
                tdeq.train()

    counts: dict[tuple[str, str], int] = {}
    for solver in SOLVER_NAMES:
        for lib in libs:
            counter = FCounter(p.block).install()
            try:
                solve(lib, solver)
            finally:
                counter.remove()
            counts[(lib, solver)] = counter.calls.get("forward", 0)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in counts}
    inside: dict[tuple[str, str], list[float]] = {key: [] for key in counts}
    for r in range(cfg.warmup + cfg.repeats):
        for key in counts:
            timer = FTimer(p.block, runner.clock).install()
            try:
                t0 = runner.clock()
                solve(key[0], key[1])
                dt = runner.clock() - t0
            finally:
                timer.remove()
            if r >= cfg.warmup:
                samples[key].append(dt)
                inside[key].append(timer.seconds)
    rows = []
    for (lib, solver), xs in samples.items():
        ins = inside[(lib, solver)]
        over = [a - b for a, b in zip(xs, ins)]
        rel = [o / b for o, b in zip(over, ins)]
        rows.append({
            "solver": solver, "lib": lib, "ms": 1e3 * _median(xs), "spread": _spread(xs), "f_evals": counts[(lib, solver)],
            "f_evals_ms": 1e3 * _median(ins), "overhead_ms": 1e3 * _median(over), "overhead_pct": 100 * _median(rel),
            "samples_ms": [1e3 * x for x in xs], "inside_f_ms": [1e3 * x for x in ins],
        })
    return rows


# ----------------------------------------------------------------------------- targets

def _find(rows: list[dict], mode: str, lib: str = "phantomgrad") -> dict | None:
    return next((r for r in rows if r["mode"] == mode and r["lib"] == lib), None)


def evaluate_targets(res: BenchResult) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float, kind: str, note: str = "") -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        met = value <= limit if kind == "<=" else value >= limit
        out.append({"target": name, "value": value, "limit": limit, "kind": kind, "met": bool(met), "note": note})

    rows = res.rows
    for mode, limit in (("upg", 1.2), ("npg", 1.2), ("implicit-fixed_point", 1.1), ("implicit-broyden", 1.5)):
        r = _find(rows, mode)
        if r:
            add(f"{mode} DEQ backward / its VJPs of F", r["deq_backward_over_floor"], limit, "<=", f"floor {r['floor_ms']:.1f} ms")
    solvers = {(s["lib"], s["solver"]): s for s in res.solvers}
    if ("phantomgrad", "fixed_point") in solvers:
        s = solvers[("phantomgrad", "fixed_point")]
        add("FixedPoint time / its F evaluations", 1 + s["overhead_pct"] / 100, 1.1, "<=")
    for name in ("anderson", "broyden"):
        a, b = solvers.get(("phantomgrad", name)), solvers.get(("torchdeq", name))
        if a and b and b["overhead_ms"] > 0:
            add(f"{name} overhead beyond F: phantomgrad / TorchDEQ", a["overhead_ms"] / b["overhead_ms"], 0.5, "<=")
    upg, imp = _find(rows, "upg"), _find(rows, "implicit-broyden")
    if upg and imp and upg["k"] == 5 and upg["damping"] == 0.5:
        both = [a and b for a, b in zip(imp["quiet_mask"], upg["quiet_mask"])]
        med, _, _ = _paired_ratio(imp["samples_ms"]["step"], upg["samples_ms"]["step"], both)
        add(f"step: Implicit (broyden, {imp['backward_iter']}) / UPG A_{{5,0.5}}", med, 1.5, ">=")
    for r in rows:
        if r["lib"] == "phantomgrad" and "torchdeq_over_phantomgrad_step" in r:
            add(f"step: TorchDEQ / phantomgrad, {r['label']}", r["torchdeq_over_phantomgrad_step"], 1.25, ">=")
    npg, impf = _find(rows, "npg"), _find(rows, "implicit-fixed_point")
    if npg and impf and "step_mib" in npg and impf.get("step_mib"):
        add("peak memory: NPG / Implicit (fixed_point)", npg["step_mib"] / impf["step_mib"], 1.1, "<=")
    upgs = [r for r in res.sweep_k if r["mode"] == "upg" and not math.isnan(r.get("step_mib", math.nan))]
    if len(upgs) >= 3:
        slope, _, r2 = _linear_fit([r["k"] for r in upgs], [r["step_mib"] for r in upgs])
        add("UPG memory linear in k: R^2 of a line", r2, 0.98, ">=", f"slope {slope:.1f} MiB per step")
    return out


# ----------------------------------------------------------------------------- output

def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_tables(res: BenchResult) -> str:
    cfg = res.config
    lines = [
        f"model {cfg.model}, batch {cfg.batch}, forward solver {cfg.solver} ({cfg.solver_iter} steps, tol {cfg.solver_tol:g}, "
        f"stop {cfg.stop}), {cfg.threads} threads, {cfg.device}, {cfg.dtype}; medians of {cfg.repeats} rounds after "
        f"{cfg.warmup} warm-up; spread = IQR / median; quiet rounds only (F probe next to the step <= {cfg.quiet_factor:g}x the fastest) "
        f"when there are any: see the q column",
        "",
        f"floor: F {_f(res.floors.get('f_ms'), 2)} ms, VJP (state) {_f(res.floors.get('vjp_state_ms'), 2)} ms, "
        f"VJP (state, params, injection) {_f(res.floors.get('vjp_full_ms'), 2)} ms",
        "",
        "| mode | lib | forward ms | DEQ fwd ms | backward ms | DEQ bwd ms | bwd / floor | step ms (spread) | q | F fwd | VJPs bwd | F in bwd | step MiB | cos to exact | TorchDEQ / pg step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.rows:
        ratio = r.get("torchdeq_over_phantomgrad_step")
        cos = r.get("cosine")
        star = "" if res.reference.get("converged", True) else "*"
        lines.append(
            f"| {r['label']} | {r['lib']} | {_f(r['forward_ms'])} | {_f(r['deq_forward_ms'])} | {_f(r['backward_ms'])} | "
            f"{_f(r['deq_backward_ms'])} | {_f(r.get('deq_backward_over_floor'), 2)} | {_f(r['step_ms'])} ({100 * r['step_spread']:.0f}%) | "
            f"{r['quiet_rounds']}/{r['rounds']} | "
            f"{r.get('f_forward', '-')} | {r.get('vjp_backward', '-')} | {r.get('f_backward_calls', '-')} | {_f(r.get('step_mib'))} | "
            f"{_f(cos, 4)}{star if cos is not None else ''} | {_f(ratio, 2) + 'x' if ratio else '-'} |"
        )
    if res.reference:
        ref = res.reference
        lines += ["", f"exact reference: Implicit, {ref['forward_nstep']} forward / {ref['backward_nstep']} backward Broyden steps, "
                      f"relative residuals {ref['forward_rel_residual']:.2g} / {ref['backward_rel_residual']:.2g}"]
        if not ref.get("converged", True):
            lines.append("(*) the reference did not converge (no reachable fixed point, e.g. an untrained non-contractive map): "
                         "the cosines compare two inexact gradients and mean little")
    if res.solvers:
        lines += ["", "| forward solver (no grad) | lib | ms (spread) | F evals | inside F ms | overhead ms | overhead |", "|---|---|---|---|---|---|---|"]
        for s in res.solvers:
            lines.append(f"| {s['solver']} | {s['lib']} | {_f(s['ms'])} ({100 * s['spread']:.0f}%) | {s['f_evals']} | {_f(s['f_evals_ms'])} | "
                         f"{_f(s['overhead_ms'])} | {s['overhead_pct']:+.0f}% |")
    for title, rows in (("sweep over k", res.sweep_k), ("sweep over solver steps K", res.sweep_K)):
        if rows:
            lines += ["", f"{title}:", "", "| mode | k | K fwd | K bwd | DEQ bwd ms | backward ms | step ms (spread) | q | VJPs bwd | step MiB |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['label']} | {r['k']} | {r['solver_iter']} | {r['backward_iter']} | {_f(r['deq_backward_ms'])} | "
                             f"{_f(r['backward_ms'])} | {_f(r['step_ms'])} ({100 * r['step_spread']:.0f}%) | {r['quiet_rounds']}/{r['rounds']} | "
                             f"{r.get('vjp_backward', '-')} | {_f(r.get('step_mib'))} |")
    if res.targets:
        lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
        for t in res.targets:
            lines.append(f"| {t['target']} {('(' + t['note'] + ')') if t['note'] else ''} | {t['value']:.3f} | {t['kind']} {t['limit']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def plot(res: BenchResult, path: Path) -> Path | None:
    """Time and memory against k (UPG, NPG) and against K (Implicit, Backprop)."""
    if not (res.sweep_k or res.sweep_K):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (rows, xkey, xlabel, modes) in enumerate((
        (res.sweep_k, "k", "k (phantom steps)", ("upg", "npg")),
        (res.sweep_K, None, "K (solver steps: backward for Implicit, forward for Backprop)", ("implicit-broyden", "implicit-fixed_point", "backprop")),
    )):
        for mode in modes:
            sel = [r for r in rows if r["mode"] == mode]
            if not sel:
                continue
            xs = [r[xkey] if xkey else (r["solver_iter"] if mode == "backprop" else r["backward_iter"]) for r in sel]
            label = sel[0]["label"].split(" ")[0] + ("" if mode in ("upg", "npg") else f" ({mode.split('-')[-1]})")
            axes[0, col].plot(xs, [r["deq_backward_ms"] for r in sel], marker="o", label=label)
            if "step_mib" in sel[0]:
                axes[1, col].plot(xs, [r["step_mib"] for r in sel], marker="o", label=label)
        axes[0, col].set_ylabel("DEQ backward (ms, median)")
        axes[1, col].set_ylabel("peak memory of a step (MiB)")
        for ax in axes[:, col]:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    cfg = res.config
    fig.suptitle(f"{cfg.model}, batch {cfg.batch}, {cfg.solver} forward ({cfg.solver_iter}), {cfg.threads} threads, {cfg.device}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(res: BenchResult) -> dict[str, Any]:
    out = asdict(res)
    out["config"] = asdict(res.config)
    return out


def from_json(data: dict[str, Any]) -> BenchResult:
    """A :class:`BenchResult` back from :func:`to_json`'s output (to re-render its tables and plot)."""
    known = {f.name for f in fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in data["config"].items() if k in known})
    res = BenchResult(cfg)
    for f in fields(BenchResult):
        if f.name != "config" and f.name in data:
            setattr(res, f.name, data[f.name])
    return res


# ----------------------------------------------------------------------------- command line

def _ints(text: str) -> tuple[int, ...]:
    """'1..10' or '5,10,20' -> a tuple of ints."""
    text = text.strip()
    if not text:
        return ()
    if ".." in text:
        a, b = text.split("..", 1)
        return tuple(range(int(a), int(b) + 1))
    return tuple(int(t) for t in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--model", choices=MODELS, default=d.model, help="model (default %(default)s)")
    parser.add_argument("--batch", type=int, default=d.batch, help="batch size (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="mdeq-tiny image size (default %(default)s)")
    parser.add_argument("--dim", type=int, default=d.dim, help="synthetic state size (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="deq-transformer tokens per sequence (default %(default)s)")
    parser.add_argument("--solver", choices=SOLVER_NAMES, default=d.solver, help="forward solver of every mode (default %(default)s)")
    parser.add_argument("--solver-iter", type=int, default=d.solver_iter, help="forward solver steps K (default %(default)s)")
    parser.add_argument("--solver-tol", type=float, default=d.solver_tol, help="forward tolerance (default %(default)s)")
    parser.add_argument("--modes", default=",".join(d.modes), help="comma-separated backward modes (default all: %(default)s)")
    parser.add_argument("--k", type=int, default=d.k, help="UPG/NPG steps (default %(default)s)")
    parser.add_argument("--damping", type=float, default=d.damping, help="UPG/NPG lambda (default %(default)s)")
    parser.add_argument("--backward-iter", type=int, default=d.backward_iter, help="Implicit's backward solver steps (default %(default)s)")
    parser.add_argument("--backward-tol", type=float, default=d.backward_tol, help="Implicit's relative backward tolerance (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds first (default %(default)s)")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads (default %(default)s)")
    parser.add_argument("--device", default=d.device, help="cpu or cuda (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--compare", choices=("torchdeq",), default=None, help=f"also time TorchDEQ (install: {TORCHDEQ_INSTALL})")
    parser.add_argument("--sweep-k", type=_ints, default=(), help="UPG/NPG k values, e.g. 1..10 (default none)")
    parser.add_argument("--sweep-K", type=_ints, default=(), help="solver steps for Implicit/Backprop, e.g. 5,10,20,30,40 (default none)")
    parser.add_argument("--sweep-repeats", type=int, default=d.sweep_repeats, help="timed rounds in sweeps (default %(default)s)")
    parser.add_argument("--quiet-factor", type=float, default=d.quiet_factor,
                        help="medians over steps whose adjacent F probe is <= this x the fastest F of the run (default %(default)s; 0: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory subprocesses")
    parser.add_argument("--no-cosine", action="store_true", help="skip the gradient cosine")
    parser.add_argument("--no-solvers", action="store_true", help="skip the forward-solver table")
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler tables (one step per mode) to this directory")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for bench.md and bench.png")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument("--render", type=Path, default=None, help="measure nothing: print the tables (and plot) of an earlier --json")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model, batch=args.batch, image_size=args.image_size, dim=args.dim, seq_len=args.seq_len, solver=args.solver,
        solver_iter=args.solver_iter, solver_tol=args.solver_tol,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), k=args.k, damping=args.damping,
        backward_iter=args.backward_iter, backward_tol=args.backward_tol, repeats=args.repeats, warmup=args.warmup,
        threads=args.threads, device=args.device, dtype=args.dtype, seed=args.seed, compare=args.compare,
        memory=not args.no_memory, cosine=not args.no_cosine, solvers=not args.no_solvers,
        sweep_k=args.sweep_k, sweep_K=args.sweep_K, sweep_repeats=args.sweep_repeats, quiet_factor=args.quiet_factor, profile=str(args.profile) if args.profile else None,
    )


def run(args: argparse.Namespace) -> int:
    if args.render is not None:  # no measuring: tables and plot from an earlier --json
        result = from_json(json.loads(args.render.read_text()))
        print(format_tables(result))
        png = plot(result, args.out / "bench.png")
        if png:
            print(f"wrote {png}")
        return 0
    cfg = config_from_args(args)
    result = run_bench(cfg)
    table = format_tables(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / "bench.md"
    md.write_text(f"`phantomgrad bench {' '.join(sys.argv[2:]) if len(sys.argv) > 2 else ''}`\n\n"
                  f"machine: {result.machine}\n\n{table}\n")
    written = [md]
    png = plot(result, args.out / "bench.png")
    if png:
        written.append(png)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(result), indent=1))
        written.append(args.json)
    print(f"wrote {', '.join(map(str, written))} in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":  # the memory worker: python -m phantomgrad.experiments.bench --memory-worker SPEC
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        raise SystemExit(_memory_worker(sys.argv[2]))
    raise SystemExit("use `phantomgrad bench`; this entry point only runs memory workers")
