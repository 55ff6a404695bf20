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


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[float]:
    """How many rows have their label among the top k logits, for each k (k is capped at
    the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [float(hits[:, :k].any(dim=1).sum()) for k in ks]


def split_scores(out: dict[str, torch.Tensor], split: str) -> dict[str, float]:
    """top-1/top-5 accuracy and row counts of `predict_split`'s output."""
    n = len(out["labels"])
    top1, top5 = topk_correct(out["logits"], out["labels"], (1, 5)) if n else (0.0, 0.0)
    return {
        f"{split}_top1": top1 / n if n else float("nan"),
        f"{split}_top5": top5 / n if n else float("nan"),
        f"{split}_images": float(n),
        f"{split}_skipped": float(out["skipped"]),
    }


def evaluate_checkpoint(checkpoint_dir: str | Path, data: DataConfig, split: str) -> dict[str, Any]:
    """top-1/top-5 of a checkpoint at the data config's image size (posemb resized if needed)."""
    model = load_checkpoint(checkpoint_dir, image_size=data.size_hw)
    return split_scores(predict_split(model, data, split), split)


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    index = labels * num_classes + logits.argmax(dim=1)
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
