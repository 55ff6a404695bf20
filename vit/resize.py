"""Resizing learned embeddings for a new image size or patch size.

Fine-tuning at a higher resolution keeps the patch size, so the sequence grows and the
learned position embeddings are 2-D interpolated on their grid (ViT paper, section 3.2).
The peers differ only in the interpolation flags; `mode`, `align_corners` and `antialias`
reproduce each of them:

    timm          mode="bicubic",  antialias=True,  align_corners=False  (our default)
    HF / DeiT     mode="bicubic",  antialias=False, align_corners=False
    big_vision    mode="bilinear", antialias=False, align_corners=True
    torchvision   mode="bicubic",  antialias=False, align_corners=True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INTERPOLATION_PRESETS: dict[str, dict] = {
    "timm": dict(mode="bicubic", antialias=True, align_corners=False),
    "hf": dict(mode="bicubic", antialias=False, align_corners=False),
    "big_vision": dict(mode="bilinear", antialias=False, align_corners=True),
    "torchvision": dict(mode="bicubic", antialias=False, align_corners=True),
}


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
    align_corners: bool = False,
) -> torch.Tensor:
    """(1, prefix + old_h*old_w, D) -> (1, prefix + new_h*new_w, D).

    Prefix (class) tokens are kept as they are. `old_grid` defaults to a square grid.
    Interpolates in float32 to the target `size` (never a `scale_factor`, whose rounding
    silently gives a grid one row short) and returns the input's dtype. Same grid: the input
    itself, untouched.
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} position embeddings are not a square grid; pass old_grid")
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not hold {n} position embeddings")
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, *old_grid, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    corners = align_corners if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=corners, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


def _resize_matrix(old: int, new: int) -> torch.Tensor:
    """(new*new, old*old): bilinear antialiased resize of a single-channel patch, as a matrix."""
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(new, new), mode="bilinear", antialias=True)
    return resized.reshape(old * old, new * new).T


def resample_patch_embed(weight: torch.Tensor, new_patch: int, in_chans: int = 3) -> torch.Tensor:
    """FlexiViT's PI-resize of the patch embedding E (Beyer et al. 2023, eq. 6).

    `weight` is our linear E, (D, P*P*C) in HWC order. Returns (D, P'*P'*C) with
    w' = pinv(B^T) w, where B resizes a patch: for upsampling, <resize(x), w'> = <x, w> for
    every patch x, so the model's tokens do not change.
    """
    dim, patch_dim = weight.shape
    old = math.isqrt(patch_dim // in_chans)
    if old * old * in_chans != patch_dim:
        raise ValueError(f"weight {tuple(weight.shape)} is not (D, P*P*{in_chans})")
    if new_patch == old:
        return weight
    pinv = torch.linalg.pinv(_resize_matrix(old, new_patch).T)  # (new^2, old^2), float64
    w = weight.double().reshape(dim, old * old, in_chans)
    w = torch.einsum("no,doc->dnc", pinv, w)
    return w.reshape(dim, new_patch * new_patch * in_chans).to(weight.dtype)
