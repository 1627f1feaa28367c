"""Run under torchrun with 2 processes: DDP gradients of a float64 DEQ on each process's half
of a global batch, for every backward mode; rank 0 saves them to the path in argv[1]."""

import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import phantomgrad as pg
from phantomgrad.models.toy import TanhMap
from phantomgrad.train.distributed import init_distributed, shutdown_distributed


class Model(nn.Module):
    def __init__(self, backward):
        super().__init__()
        torch.manual_seed(0)
        f = TanhMap(6, 4, lipschitz=0.6)  # F(z, x) = tanh(W z + U x + b), float64
        self.head = nn.Linear(6, 3, dtype=torch.float64)
        self.deq = pg.DEQ(f, solver=pg.FixedPoint(max_iter=200, tol=1e-12), backward=backward)

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
    info = init_distributed(use_cuda=False)  # the trainer's own set-up and teardown
    rank, world = info.rank, info.world_size
    x, y = global_batch()
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    grads = {}
    for name, make in MODES.items():
        model = DistributedDataParallel(Model(make()))
        loss = nn.functional.cross_entropy(model(x[local]), y[local])
        loss.backward()
        grads[name] = [p.grad.clone() for p in model.module.parameters()]
        del model  # no DDP model may outlive the process group (see shutdown_distributed)
    if rank == 0:
        torch.save(grads, path)
    shutdown_distributed(info)


if __name__ == "__main__":
    main(sys.argv[1])
