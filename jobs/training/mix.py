"""Mixup and CutMix on patch batches, with soft (label-smoothed) targets (timm's recipe).

CutMix cuts a box of whole patches: on a patch grid a box boundary inside a patch would
only blur the patch it cuts, so boxes are snapped to the grid and lambda is the exact
fraction of tokens kept.
"""

from __future__ import annotations

import torch


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(
    patches: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    grid: tuple[int, int],
    mixup_alpha: float,
    cutmix_alpha: float,
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float patches (B, N, D) and labels -> mixed patches and soft targets (B, classes).

    With both alphas set, each batch uses one of the two with equal probability.
    """
    targets = soft_targets(labels, num_classes, smoothing)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()) < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0 or len(labels) < 2:
        return patches, targets
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if use_cutmix:
        gh, gw = grid
        h, w = round(gh * (1 - lam) ** 0.5), round(gw * (1 - lam) ** 0.5)
        top, left = int(torch.randint(0, gh - h + 1, ())), int(torch.randint(0, gw - w + 1, ()))
        box = torch.zeros(gh, gw, dtype=torch.bool, device=patches.device)
        box[top : top + h, left : left + w] = True
        box = box.flatten()  # (N,) tokens taken from the flipped batch
        patches = torch.where(box[None, :, None], patches.flip(0), patches)
        lam = 1 - h * w / (gh * gw)  # exact, and no read of the box back from the GPU
    else:
        patches = lam * patches + (1 - lam) * patches.flip(0)
    return patches, lam * targets + (1 - lam) * targets.flip(0)
