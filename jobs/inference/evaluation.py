"""Accuracy of a checkpoint on a split, streamed through the same Ray Data pipeline, on the
cluster's GPU when it has one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, quiet_progress
from vit import ViT, load_checkpoint, model_from_weights, model_weights
from vit.checkpoint import Weights


def predict_split(
    model: ViT,
    data: DataConfig,
    split: str,
    batch_size: int = 256,
    pre_logits: bool = False,
    on_gpu: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Logits (or pre-logits features) and labels of every good row of `split` (eval
    transforms). On a Ray cluster with a free GPU (`on_gpu=None`), scored in bf16 in a task
    that holds one, wherever it runs: the driver's node may have none (KubeRay's head), and its
    CPUs would score while the GPUs sit idle. Else in this process."""
    import ray

    from jobs.cluster.raynode import ensure_ray

    ensure_ray()  # the split streams through Ray Data either way
    if on_gpu is None:  # a free GPU now: one that other jobs hold would keep this waiting
        on_gpu = ray.available_resources().get("GPU", 0) >= 1
    if not on_gpu:
        return score(model, data, split, batch_size, pre_logits)
    if Path(data.dataset).exists():  # the task's working directory is not this one
        data = data.model_copy(update={"dataset": str(Path(data.dataset).resolve())})
    weights = ray.put(model_weights(model))
    task = ray.remote(num_gpus=1, num_cpus=0)(score_in_task)
    return ray.get(task.remote(weights, data, split, batch_size, pre_logits))


def score_in_task(
    weights: Weights, data: DataConfig, split: str, batch_size: int, pre_logits: bool
) -> dict[str, torch.Tensor]:
    model = model_from_weights(weights)
    return score(model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                 data, split, batch_size, pre_logits)  # fmt: skip


def score(
    model: ViT, data: DataConfig, split: str, batch_size: int, pre_logits: bool
) -> dict[str, torch.Tensor]:
    """predict_split on the model's own device (bf16 autocast on a GPU), here."""
    ds = quiet_progress(
        build_dataset(data, split, model.config.patch_size, model.config.num_classes)
    )
    device = next(model.parameters()).device
    logits, labels, skipped = [], [], 0
    model.eval()
    bf16 = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for b in ds.iter_torch_batches(batch_size=batch_size):
            ok = b["ok"]
            skipped += int((~ok).sum())
            if ok.any():
                features = model.forward_features(b["patches"][ok].to(device))
                out = model.forward_head(features, pre_logits=pre_logits)
                logits.append(out.float().cpu())
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
