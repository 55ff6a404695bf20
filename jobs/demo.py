"""`vitray demo`: a short model sanity run on scikit-learn's real digits, in plain PyTorch.

Trains the micro/4 ViT at 16 px, saves a checkpoint, reloads it at 32 px (position
embeddings interpolated) and evaluates both. The Ray/MLflow pipeline replaces this.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vit import ViT, ViTConfig, load_checkpoint, save_checkpoint


def digits_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (B, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.repeat(1, 3, 1, 1) - 0.5) / 0.5
    return x, torch.tensor(digits.target)


def accuracy(model: ViT, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    x, y = digits_images(16)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1500], perm[1500:]
    model = ViT(ViTConfig.from_preset("micro/4", image_size=16, num_classes=10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        for batch in train[torch.randperm(len(train))].split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} "
            f"test top-1 {accuracy(model, x[test], y[test]):.3f} ({time.time() - start:.0f} s)"
        )
    out = Path(args.out)
    save_checkpoint(model, out, class_names=[str(i) for i in range(10)])
    big = load_checkpoint(out, image_size=32)
    x32, _ = digits_images(32)
    print(
        f"checkpoint {out}: 16 px test top-1 {accuracy(model, x[test], y[test]):.3f}; "
        f"reloaded at 32 px (posemb 4x4 -> 8x8, no training) "
        f"{accuracy(big, x32[test], y[test]):.3f}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default="runs/demo/checkpoint", help="checkpoint directory")
