"""Optimiser and schedule: decoupled weight decay on matrices only, layer-wise lr decay,
warmup then cosine, linear or constant."""

from __future__ import annotations

import math
from typing import Any

import torch

from jobs.config import TrainSection
from vit import ViT


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(
    model: ViT, weight_decay: float, lr: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Decoupled weight decay on matrices only (not norms, biases, tokens, posemb), and
    layer-wise lr decay (BEiT/timm): lr x layer_decay^(depth + 1 - layer)."""
    depth = model.config.depth
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.ndim > 1 and not name.endswith(("pos_embed", "cls_token"))
        layer = layer_id(name, depth) if layer_decay < 1 else depth + 1
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr": lr * layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: ViT, t: TrainSection, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, t.weight_decay, t.lr, t.layer_decay)
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    else:
        # fused on CUDA: one kernel for all parameters, the step `bench model` times
        fused = next(model.parameters()).is_cuda
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=fused or None)

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        if t.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if t.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
