"""Switch the backward mode in the middle of training.

The backward mode of a ``pg.DEQ`` is a plain attribute, ``deq.backward_mode``: it can be
replaced between two optimiser steps. This script trains a small DEQ classifier with the
cheap phantom gradient UPG A_{5,0.5} first, then fine-tunes it with the exact implicit
gradient, and measures at the switch how close the phantom gradient was (pg.gradient_quality).

    python examples/switch_backward.py            # 300 UPG steps, then 100 Implicit steps
    python examples/switch_backward.py --tiny     # a few seconds (what the tests run)
"""

import argparse
import time

import torch
import torch.nn.functional as F

import phantomgrad as pg


class Cell(torch.nn.Module):
    """F(z, x) = tanh(W z + U x), W scaled down at the start so that F contracts."""

    def __init__(self, dim: int, in_dim: int):
        super().__init__()
        self.W = torch.nn.Linear(dim, dim, bias=False)
        self.U = torch.nn.Linear(in_dim, dim)
        with torch.no_grad():
            self.W.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


class Classifier(torch.nn.Module):
    def __init__(self, in_dim: int, classes: int, dim: int = 64):
        super().__init__()
        self.dim = dim
        solver, backward = pg.Anderson(max_iter=30, tol=1e-4), pg.UPG(k=5, damping=0.5)
        self.deq = pg.DEQ(Cell(dim, in_dim), solver=solver, backward=backward)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        z, info = self.deq(x, torch.zeros(x.shape[0], self.dim))
        return self.head(z), info


def train(model, optimizer, x, y, steps: int, batch: int = 64) -> float:
    """``steps`` optimiser steps on random batches; returns the seconds per step."""
    start = time.perf_counter()
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,))
        loss = F.cross_entropy(model(x[i])[0], y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x)[0].argmax(1) == y).float().mean().item()
    model.train()
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds: 10 + 5 steps")
    args = parser.parse_args()
    phantom_steps, exact_steps = (10, 5) if args.tiny else (300, 100)
    torch.manual_seed(0)
    # the data: 16-dimensional points, 4 classes given by a random linear teacher
    x = torch.randn(4096, 16)
    y = (x @ torch.randn(16, 4)).argmax(1)
    (x, x_test), (y, y_test) = x.split([3072, 1024]), y.split([3072, 1024])
    model = Classifier(16, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    per_step = train(model, optimizer, x, y, phantom_steps)
    print(f"UPG A_(5,0.5): {1e3 * per_step:.1f} ms/step, test accuracy {accuracy(model, x_test, y_test):.3f}")

    # how good was the phantom gradient at this point? (same batch, exact gradient by Implicit)
    i = torch.arange(256)
    optimizer.zero_grad()
    F.cross_entropy(model(x[i])[0], y[i]).backward()  # the phantom gradient, in p.grad
    q = pg.gradient_quality(model, lambda: F.cross_entropy(model(x[i])[0], y[i]))
    print(f"at the switch: cosine to the exact gradient {q.cosine:.4f}, norm ratio {q.norm_ratio:.3f}")
    optimizer.zero_grad()

    model.deq.backward_mode = pg.Implicit(pg.Broyden(max_iter=30, tol=1e-6))  # the switch
    per_step = train(model, optimizer, x, y, exact_steps)
    print(f"Implicit: {1e3 * per_step:.1f} ms/step, test accuracy {accuracy(model, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
