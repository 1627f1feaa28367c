"""An MDEQ trained by PyTorch Lightning (pip install 'phantomgrad[lightning]'): solver metrics, checkpoints, resume.

MDEQ-Tiny (UPG A_{5,0.5}, Anderson forward) with a learned initial state (``init_head=True``: the solve
starts at g(x); ``info.init_loss`` trains g). Loss, accuracy, solver steps, converged fraction, residual and
init loss go to metrics.csv; ``--resume`` continues from the last checkpoint exactly as an uninterrupted run.

    python examples/lightning_mdeq.py --epochs 5                # digits 8x8: 94.6% validation accuracy
    python examples/lightning_mdeq.py --epochs 8 --resume       # three more epochs from the last checkpoint
"""

import argparse
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Sampler, TensorDataset

import phantomgrad as pg
from phantomgrad.models.mdeq import MDEQ, MDEQConfig

try:
    import lightning as L
except ImportError:
    print("this example needs Lightning: install it with pip install 'phantomgrad[lightning]'", file=sys.stderr)
    sys.exit(2)


class EpochShuffle(Sampler):
    """A permutation seeded by the epoch (Lightning calls set_epoch), so a resumed run sees the same batches."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


class LitMDEQ(L.LightningModule):
    def __init__(self, lr: float = 3e-3, max_iter: int = 20, **arch):
        super().__init__()
        self.save_hyperparameters()
        config = MDEQConfig.named("mdeq-tiny", in_channels=1, image_size=8, num_classes=10, init_head=True, **arch)
        self.model = MDEQ(config, solver=pg.Anderson(max_iter=max_iter, tol=1e-3), backward=pg.UPG(k=5, damping=0.5))

    def _step(self, batch, split: str):
        x, y = batch
        logits, info = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if info.init_loss is not None and split == "train":  # trains the init head g alone
            loss = loss + info.init_loss
        metrics = {"loss": loss, "accuracy": (logits.argmax(1) == y).float(), "solver_steps": info.nstep.float()}
        metrics |= {"converged": info.converged.float(), "rel_residual": info.rel_residual, "init_loss": info.init_loss}
        self.log_dict({f"{split}/{k}": v.float().mean() for k, v in metrics.items() if v is not None})
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv=None) -> LitMDEQ:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_mdeq"))
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--tiny", action="store_true", help="seconds: 128 images, a narrow MDEQ, 2 epochs")
    args = parser.parse_args(argv)
    digits = load_digits()  # 8x8 images, bundled with scikit-learn
    x, y = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(digits.target)
    n, arch = (128, dict(channels=(8, 8), head_channels=(4, 8), final_channels=16)) if args.tiny else (1500, {})
    epochs = 2 if args.tiny and args.epochs == 5 else args.epochs
    train, val = TensorDataset(x[:n], y[:n]), TensorDataset(x[1500 : 1500 + n // 4], y[1500 : 1500 + n // 4])
    L.seed_everything(0, verbose=False)
    model = LitMDEQ(max_iter=6 if args.tiny else 20, **arch)
    logger = L.pytorch.loggers.CSVLogger(args.out, name="", version="")  # metrics.csv in --out
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(args.out / "checkpoints", save_last=True)
    trainer = L.Trainer(
        max_epochs=epochs, logger=logger, callbacks=[checkpoints], log_every_n_steps=1, enable_progress_bar=False
    )
    loaders = DataLoader(train, batch_size=32, sampler=EpochShuffle(len(train))), DataLoader(val, batch_size=64)
    trainer.fit(model, *loaders, ckpt_path="last" if args.resume else None)
    print(f"epoch {trainer.current_epoch}:", {k: round(float(v), 3) for k, v in trainer.logged_metrics.items()})
    return model


if __name__ == "__main__":
    main()
