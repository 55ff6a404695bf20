"""Accuracy of a checkpoint on a split, streamed through the same Ray Data pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, quiet_progress
from vit import ViT, load_checkpoint


def predict_split(
    model: ViT, data: DataConfig, split: str, batch_size: int = 256, pre_logits: bool = False
) -> dict[str, torch.Tensor]:
    """Logits (or pre-logits features) and labels of every good row of `split` (eval
    transforms), in this process."""
    ds = quiet_progress(
        build_dataset(data, split, model.config.patch_size, model.config.num_classes)
    )
    logits, labels, skipped = [], [], 0
    model.eval()
    with torch.no_grad():
        for b in ds.iter_torch_batches(batch_size=batch_size):
            ok = b["ok"]
            skipped += int((~ok).sum())
            if ok.any():
                features = model.forward_features(b["patches"][ok])
                logits.append(model.forward_head(features, pre_logits=pre_logits))
                labels.append(b["label"][ok])
    return {
        "logits": torch.cat(logits) if logits else torch.empty(0),
        "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        "skipped": torch.tensor(skipped),
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    if not len(labels):
        return float("nan")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def evaluate_checkpoint(checkpoint_dir: str | Path, data: DataConfig, split: str) -> dict[str, Any]:
    """top-1/top-5 of a checkpoint at the data config's image size (posemb resized if needed)."""
    model = load_checkpoint(checkpoint_dir, image_size=data.size_hw)
    out = predict_split(model, data, split)
    return {
        f"{split}_top1": accuracy(out["logits"], out["labels"], 1),
        f"{split}_top5": accuracy(out["logits"], out["labels"], 5),
        f"{split}_images": len(out["labels"]),
        f"{split}_skipped": int(out["skipped"]),
    }


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    index = labels * num_classes + logits.argmax(dim=1)
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
