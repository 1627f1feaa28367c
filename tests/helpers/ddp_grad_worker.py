"""Run under torchrun with 2 processes: DDP gradients of a float64 DEQ on each process's half
of a global batch, for every backward mode; rank 0 saves them to the path in argv[1]."""

import gc
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import phantomgrad as pg


class Model(nn.Module):
    def __init__(self, backward):
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(6, 6, dtype=torch.float64)
        self.W = nn.Parameter(0.6 * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Linear(4, 6, dtype=torch.float64)
        self.head = nn.Linear(6, 3, dtype=torch.float64)
        self.deq = pg.DEQ(self.f, solver=pg.FixedPoint(max_iter=200, tol=1e-12), backward=backward)

    def f(self, z, x):
        return torch.tanh(z @ self.W.T + self.U(x))

    def forward(self, x):
        z, _ = self.deq(x, torch.zeros(x.shape[0], 6, dtype=x.dtype))
        return self.head(z)


MODES = {
    "implicit": lambda: pg.Implicit(pg.Broyden(max_iter=100, tol=1e-12)),
    "upg": lambda: pg.UPG(5, 0.5),
    "npg": lambda: pg.NPG(5, 0.5),
    "jfb": pg.JFB,
    "backprop": pg.Backprop,
}


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def main(path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = global_batch()
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    grads = {}
    for name, make in MODES.items():
        model = DistributedDataParallel(Model(make()))
        loss = nn.functional.cross_entropy(model(x[local]), y[local])
        loss.backward()
        grads[name] = [p.grad.clone() for p in model.module.parameters()]
        del model
    # Free the DDP reducers now (the models sit in reference cycles) rather than while the
    # interpreter shuts down, when gloo's threads can no longer take the GIL and abort.
    gc.collect()
    if rank == 0:
        torch.save(grads, path)
    # Every rank waits here so that none tears gloo down while a peer still talks to it
    # (without it a rank could abort with "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
