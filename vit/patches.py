"""The one definition of the patch layout, shared by the model and the data pipeline.

Images are channels-last (B, H, W, C); each P x P patch is flattened row in patch, then
column in patch, then channel ("HWC", the order of the paper's JAX code and of its
`embedding/kernel`). Works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def patchify(images: Array, patch: int) -> Array:
    """(B, H, W, C) -> (B, N, P*P*C), patches in raster order."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of patch size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c).swapaxes(2, 3)  # (B, gh, gw, P, P, C)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: Array, patch: int, grid: tuple[int, int]) -> Array:
    """(B, N, P*P*C) -> (B, H, W, C); `grid` is (rows, columns) of patches."""
    b, n, d = patches.shape
    gh, gw = grid
    if n != gh * gw or d % (patch * patch):
        raise ValueError(f"{n} patches of {d} values do not fit grid {grid} with patch {patch}")
    c = d // (patch * patch)
    x = patches.reshape(b, gh, gw, patch, patch, c).swapaxes(2, 3)  # (B, gh, P, gw, P, C)
    return x.reshape(b, gh * patch, gw * patch, c)
