"""MDEQ-Tiny on Fashion-MNIST with the phantom gradient UPG A_{5,0.5}, in a plain PyTorch loop.

The data are the Debian package dataset-fashion-mnist (60,000 training and 10,000 test images,
28x28 grey), installed offline by ``bash scripts/setup.sh`` (see docs/data.md); without it the
script says how to install it and exits with code 2. The model is the paper's MDEQ-Tiny adapted
to 28x28 images (branches of 16 and 32 channels at 14x14 and 7x7, 167K parameters).
``phantomgrad train --config configs/fashion-mnist.yaml`` trains the same model with the trainer
(checkpoints, resume, divergence guard); this script shows the parts it is made of.

    python examples/mdeq_fashion_mnist.py               # 1 epoch on 8,000 images, then the 10,000 test images
    python examples/mdeq_fashion_mnist.py --tiny        # a few steps (what the tests run)
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import phantomgrad as pg
from phantomgrad.data.images import load_image_dataset
from phantomgrad.models import MDEQ, MDEQConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="3 steps of batch 32, 64 test images")
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    n_train, n_test, batch, epochs = (96, 64, 32, 1) if args.tiny else (args.train_images, 10000, 64, args.epochs)
    torch.manual_seed(0)
    try:
        train, spec = load_image_dataset("fashion-mnist", "train", augment=False)
        test, _ = load_image_dataset("fashion-mnist", "test")
    except FileNotFoundError as err:
        print(f"mdeq_fashion_mnist: {err}", file=sys.stderr)
        return 2
    train_loader = DataLoader(Subset(train, range(n_train)), batch_size=batch, shuffle=True)
    test_loader = DataLoader(Subset(test, range(n_test)), batch_size=256)

    config = MDEQConfig.named(
        "mdeq-tiny-28", in_channels=spec.channels, image_size=spec.size, num_classes=spec.num_classes
    )
    model = MDEQ(config, solver=pg.Anderson(max_iter=12, tol=1e-3), backward=pg.UPG(k=5, damping=0.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train_loader))
    print(f"MDEQ-Tiny-28: {sum(p.numel() for p in model.parameters()):,} parameters, {n_train} training images")

    for epoch in range(epochs):
        model.train()
        for step, (images, labels) in enumerate(train_loader):
            logits, info = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 25 == 0:
                print(
                    f"epoch {epoch + 1} step {step}: loss {loss.item():.3f}, "
                    f"forward steps {info.nstep.float().mean():.1f}, residual {info.rel_residual.mean():.1e}"
                )
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images)[0].argmax(1) == labels).sum().item()
        print(f"epoch {epoch + 1}: test accuracy {correct / n_test:.4f} ({n_test} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
