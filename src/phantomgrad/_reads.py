"""Which tensors a call of F reads, and whether F read one unseen (the reversible solver, Implicit's higher orders)."""

from __future__ import annotations

from torch import Tensor
from torch.overrides import TorchFunctionMode


class ReadRecorder(TorchFunctionMode):
    """Collects, in ``found`` (by id, in first-read order), the tensors requiring grad that the code run under
    it reads but did not make from ``start``: F's parameters and its input x, not the state it iterates on."""

    def __init__(self, start: Tensor):
        super().__init__()
        self.made = {id(start)}
        self.alive = [start]  # keeps every id in ``made`` from being reused while the mode runs
        self.found: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in (*args, *kwargs.values()):
            for t in arg if isinstance(arg, (tuple, list)) else (arg,):
                if isinstance(t, Tensor) and t.requires_grad and id(t) not in self.made:
                    self.found.setdefault(id(t), t)
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.made.add(id(t))
                self.alive.append(t)
        return out


def unseen_leaf(out: Tensor, start: Tensor, reads: list[Tensor]) -> Tensor | None:
    """A leaf needing a gradient that some path of ``out``'s graph reaches without passing through one of
    ``reads`` and that is neither ``start`` nor one of ``reads`` (F read a tensor the probe did not see), or
    None when every path ends at them: then the gradients of F's inputs are exactly those of ``reads``."""
    leaves = {id(start)} | {id(t) for t in reads if t.grad_fn is None}
    stops = {(id(t.grad_fn), t.output_nr) for t in reads if t.grad_fn is not None}
    seen: set[int] = set()
    todo = [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            if id(node.variable) not in leaves:
                return node.variable
            continue
        todo.extend(nxt for nxt, nr in node.next_functions if nxt is not None and (id(nxt), nr) not in stops)
    return None
