"""Which tensors a call of F reads: the one probe that the reversible solver and Implicit's higher orders share."""

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
