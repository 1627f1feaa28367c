"""An implicit graph neural network (IGNN) on MUTAG, with 10-fold cross-validation.

IGNN (Gu et al., NeurIPS 2020) finds node embeddings Z* = relu(A Z* W^T + A U Omega^T) by a
fixed-point solve; W is projected after every step so that the map stays a contraction. It is
trained here with the phantom gradient UPG A_{5,0.5} (the paper's Table 4 setting). MUTAG (188
molecules, 2 classes) ships inside the grakel wheel that ``bash scripts/setup.sh`` installs
(docs/data_text_graphs.md); without it the script says how to install it and exits with code 2.

    python examples/ignn_mutag.py                 # 10 folds x 50 epochs
    python examples/ignn_mutag.py --folds 1       # one fold
    python examples/ignn_mutag.py --tiny          # 1 fold, 1 epoch (what the tests run)
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import phantomgrad as pg
from phantomgrad.data.graphs import collate_graphs, stratified_folds
from phantomgrad.data.tu import load_tu
from phantomgrad.models import IGNN


def evaluate(model, graphs) -> float:
    model.eval()
    with torch.no_grad():
        x, adj, batch, y = collate_graphs(graphs)
        logits, _ = model(x, adj, batch, num_graphs=len(y))
    return (logits.argmax(1) == y).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=10, help="how many of the 10 folds to run")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="1 fold, 1 epoch")
    args = parser.parse_args()
    folds, epochs = (1, 1) if args.tiny else (args.folds, args.epochs)
    try:
        ds = load_tu("MUTAG")
    except FileNotFoundError as err:
        print(f"ignn_mutag: {err}", file=sys.stderr)
        return 2
    print(f"MUTAG: {len(ds)} graphs, {ds.num_features} node features, {ds.num_classes} classes")

    accuracies = []
    for fold, (train_idx, test_idx) in enumerate(stratified_folds(ds.labels, n_folds=10, seed=0)[:folds]):
        torch.manual_seed(fold)
        model = IGNN(
            ds.num_features,
            ds.num_classes,
            hidden=32,
            kappa=0.9,
            dropout=0.5,
            solver=pg.FixedPoint(max_iter=300, tol=3e-6),
            backward=pg.UPG(k=5, damping=0.5),
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(epochs):
            model.train()
            for chunk in train_idx[torch.randperm(len(train_idx))].split(32):
                x, adj, batch, y = collate_graphs([ds[int(i)] for i in chunk])
                logits, info = model(x, adj, batch, num_graphs=len(y))
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                model.after_optimizer_step()  # keep ||W||_inf <= kappa: the map stays well posed
        accuracies.append(evaluate(model, [ds[int(i)] for i in test_idx]))
        print(
            f"fold {fold + 1}: test accuracy {accuracies[-1]:.3f} (last batch: loss {loss.item():.3f}, "
            f"solver steps {info.nstep.float().mean():.0f})"
        )
    mean = torch.tensor(accuracies)
    print(f"mean test accuracy over {folds} fold(s): {mean.mean():.3f} +- {mean.std() if folds > 1 else 0:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
