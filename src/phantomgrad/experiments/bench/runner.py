"""The runner: training steps of one problem under many variants (same weights, same batch)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import phantomgrad as pg

from .config import BenchConfig
from .instruments import BackwardWindow, Clock, FCounter, parts
from .modes import Variant, backward_mode, forward_solver, make_solver
from .problem import Problem, State
from .torchdeq import call as torchdeq_call
from .torchdeq import make_torchdeq


def _allow_recompiles(limit: int = 64) -> None:
    """Each compiled variant is its own graph; keep dynamo from falling back to eager after 8."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(limit, getattr(dynamo_config, name)))


class Runner:
    """Drives training steps of one problem under many variants (same weights, same batch)."""

    def __init__(self, cfg: BenchConfig, problem: Problem):
        self.cfg, self.p = cfg, problem
        self.device = torch.device(cfg.device)
        self.clock = Clock(self.device)
        self.window = BackwardWindow(self.clock)
        self.params = [q for q in problem.model.parameters() if q.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.snapshot = {k: v.detach().clone() for k, v in problem.model.state_dict().items()}
        self._td: dict[tuple[Variant, str], tuple[nn.Module, dict]] = {}
        self._pg: dict[Variant, tuple[pg.Solver, pg.BackwardMode]] = {}
        self._compiled: dict[Variant, Callable[[Tensor, Tensor], Tensor]] = {}
        self._caches: dict[Variant, pg.FixedPointCache] = {}  # start="reuse": the batch's last fixed point
        self._heads: dict[Variant, tuple[nn.Module, torch.optim.Optimizer]] = {}  # start="learned"
        self.counter: FCounter | None = None
        self.last_info: Any = None

    # -- the DEQ call of each library
    def solver_and_mode(self, v: Variant) -> tuple[pg.Solver, pg.BackwardMode]:
        """Variant v's forward solver and backward mode (built once, reused every step)."""
        if v not in self._pg:
            solver, mode = forward_solver(self.cfg, v), backward_mode(self.cfg, v)
            mode.check_solver(solver)  # e.g. SHINE with another solver than Broyden: refused, never run
            self._pg[v] = (solver, mode)
        return self._pg[v]

    def _deq(self, v: Variant, u: Any, z0: State) -> tuple[State, Any]:
        if v.lib == "phantomgrad":
            deq = self.p.deq
            deq.solver, deq.backward_mode = self.solver_and_mode(v)
            if v.start == "reuse":
                return self._reuse_start(v, deq, u, z0)
            if v.start == "learned":
                deq.init = self._head(v)[0]
                try:
                    return deq(u)  # starts at g(u); info.init_loss trains g
                finally:
                    deq.init = None  # the model's state_dict stays the snapshot's
            return deq(u, z0)
        tdeq, skw = self.torchdeq(v)
        tdeq.train(self.p.model.training)
        return torchdeq_call(tdeq, skw, self.p.f, u, z0)

    def _reuse_start(self, v: Variant, deq: pg.DEQ, u: Any, z0: State) -> tuple[State, Any]:
        """The solve from the batch's fixed point of this variant's previous step (zeros the first
        time): what ``warm_start=reuse`` gives a sample on its next visit, one optimizer step stale.
        The cache's gather and store are part of the timed step."""
        if v not in self._caches:
            self._caches[v] = pg.FixedPointCache(self.cfg.batch)
        cache, indices = self._caches[v], torch.arange(self.cfg.batch)
        z, info = deq(u, cache.fill(indices, z0))
        cache.store(indices, info.fixed_point)  # host copy to the CPU store (a sync on CUDA)
        return z, info

    def _head(self, v: Variant) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The variant's MDEQ init head (built once, seeded) and its optimizer."""
        if v not in self._heads:
            from phantomgrad.models.mdeq import MDEQInitHead

            config = self.p.model.config
            with torch.random.fork_rng(devices=[]):  # seeded weights; the run's own random stream untouched
                torch.manual_seed(self.cfg.seed)
                head = MDEQInitHead(config.channels, config.num_groups).to(self.p.x.device, self.p.x.dtype)
            self._heads[v] = (head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9))
        return self._heads[v]

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
        """One training step (prepare -> DEQ -> head -> cross-entropy -> backward -> SGD); its
        timings in seconds. A compiled variant times its compiled forward and loss as a whole."""
        if v.compiled:
            return self._compiled_step(v, optimizer_step)
        clock, p = self.clock, self.p
        self.opt.zero_grad(set_to_none=True)
        self._phase("forward")
        cpu0 = time.process_time()
        t0 = clock()
        with p.context():
            u, z0 = p.prepare(p.x)
            t1 = clock()
            z, info = self._deq(v, u, z0)
            self.last_info = info
            t2 = clock()
            loss = F.cross_entropy(p.logits(z), p.y)
            if getattr(info, "init_loss", None) is not None:  # start="learned": the head's loss
                loss = loss + info.init_loss
        self.window.arm(z, u)
        t3 = clock()
        self._phase("backward")
        loss.backward()
        t4 = clock()
        if optimizer_step:
            self.opt.step()
            if v.start == "learned":
                self._head(v)[1].step()
        if v.start == "learned":
            self._head(v)[1].zero_grad(set_to_none=True)
        t5 = clock()
        cpu = time.process_time() - cpu0
        self._phase("forward")
        return {
            "forward": t3 - t0,
            "deq_forward": t2 - t1,
            "backward": t4 - t3,
            "deq_backward": self.window.elapsed,
            "step": t5 - t0,
            "cpu": cpu,
            "loss": float(loss.detach()),
        }

    def compiled_forward(self, v: Variant) -> Callable[[Tensor, Tensor], Tensor]:
        """``torch.compile`` of the forward and loss of variant v: a DEQ layer of its own over the
        same F (so no other variant changes what the compiled graph guards on)."""
        if v not in self._compiled:
            _allow_recompiles()
            solver, mode = self.solver_and_mode(v)
            deq = pg.DEQ(self.p.block, solver=solver, backward=mode)
            p = self.p

            def forward_loss(x: Tensor, y: Tensor) -> Tensor:
                with p.context():
                    u, z0 = p.prepare(x)
                    z, _ = deq(u, z0)
                    return F.cross_entropy(p.logits(z), y)

            self._compiled[v] = torch.compile(
                forward_loss, backend=self.cfg.compile_backend, mode=self.cfg.compile_mode
            )
        return self._compiled[v]

    def _compiled_step(self, v: Variant, optimizer_step: bool) -> dict[str, float]:
        clock = self.clock
        fn = self.compiled_forward(v)
        self.opt.zero_grad(set_to_none=True)
        cpu0 = time.process_time()
        t0 = clock()
        loss = fn(self.p.x, self.p.y)
        t3 = clock()
        loss.backward()
        t4 = clock()
        if optimizer_step:
            self.opt.step()
        t5 = clock()
        self.last_info = None
        return {
            "forward": t3 - t0,
            "deq_forward": math.nan,
            "backward": t4 - t3,
            "deq_backward": math.nan,
            "step": t5 - t0,
            "cpu": time.process_time() - cpu0,
            "loss": float(loss.detach()),
        }

    # -- the floor: F and its VJPs at a solved state
    def prepare_floor(self) -> None:
        p = self.p
        deq = p.deq
        with torch.no_grad(), p.context():
            u, z0 = p.prepare(p.x)
            self.u_fixed = (
                tuple(t.detach() if isinstance(t, Tensor) else t for t in u) if isinstance(u, tuple) else u.detach()
            )
            deq.eval()
            deq.solver = forward_solver(self.cfg)
            self.z_fixed, _ = deq(self.u_fixed, z0)
            deq.train()

    def time_f(self) -> float:
        with torch.no_grad():
            t0 = self.clock()
            self.p.f(self.z_fixed, self.u_fixed)
            return self.clock() - t0

    def time_vjp(self, full: bool) -> float:
        z = tuple(t.clone().requires_grad_() for t in parts(self.z_fixed))
        z_in: Any = z if isinstance(self.z_fixed, tuple) else z[0]
        u = self.u_fixed
        u_req = [t.clone().requires_grad_() for t in parts(u)]
        u_in: Any
        if isinstance(u, tuple):
            it = iter(u_req)
            u_in = tuple(next(it) if isinstance(t, Tensor) else t for t in u)
        else:
            u_in = u_req[0]
        with torch.enable_grad():
            out = parts(self.p.f(z_in, u_in))
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
        gradient of F's parameters (float64, for the cosine). A compiled variant is not
        counted (a wrapper on F would change what is compiled): its counts are None.
        """
        counter = None if v.compiled else FCounter(self.p.block).install()
        self.counter = counter
        try:
            self.step(v, optimizer_step=False)
            grad = self._grad_f()
        finally:
            if counter is not None:
                counter.remove()
            self.counter = None
            self.opt.zero_grad(set_to_none=True)
            self.restore()
        if counter is None:
            return {"f_forward": None, "f_backward_calls": None, "vjp_backward": None, "backward_nstep": None}, grad
        back = getattr(self.last_info, "backward", None) if v.lib == "phantomgrad" else None
        counts = {
            "f_forward": counter.calls.get("forward", 0),
            "f_backward_calls": counter.calls.get("backward", 0),
            "vjp_backward": counter.vjp,
            "backward_nstep": int(back.nstep.max()) if back is not None else None,
        }
        return counts, grad

    def count(self, v: Variant) -> dict[str, Any]:
        """Evaluations of F in one training step (see :meth:`probe`)."""
        return self.probe(v)[0]

    def _grad_f(self) -> Tensor:
        grads = [(q.grad if q.grad is not None else torch.zeros_like(q)).flatten() for q in self.params_f()]
        return torch.cat(grads).double()

    def reference_grad(self) -> tuple[Tensor, dict]:
        """Implicit gradient with tight solves in both directions (``ref_iter`` steps, ``ref_tol``)."""
        cfg, p = self.cfg, self.p
        deq = p.deq
        deq.solver = make_solver(cfg, cfg.solver, cfg.ref_iter, cfg.ref_tol, cfg.stop)
        deq.backward_mode = pg.Implicit(
            pg.Broyden(max_iter=cfg.ref_iter, tol=cfg.ref_tol, stop="rel", memory=cfg.ref_iter)
        )
        self.opt.zero_grad(set_to_none=True)
        with p.context():
            u, z0 = p.prepare(p.x)
            z, info = deq(u, z0)
            loss = F.cross_entropy(p.logits(z), p.y)
        loss.backward()
        g = self._grad_f()
        self.opt.zero_grad(set_to_none=True)
        b = info.backward
        fwd_res = float(info.rel_residual.max())
        back_res = float(b.rel_residual.max()) if b is not None else math.nan
        return g, {
            "forward_rel_residual": fwd_res,
            "backward_rel_residual": back_res,
            "forward_nstep": int(info.nstep.max()),
            "backward_nstep": int(b.nstep.max()) if b is not None else 0,
            # an "exact" gradient needs both solves converged; 1e-3 is loose enough for float32
            "converged": bool(fwd_res <= 1e-3 and b is not None and back_res <= 1e-3),
        }


__all__ = ["Runner"]
