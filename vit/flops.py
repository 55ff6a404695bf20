"""Analytic forward FLOPs of a ViT (2 FLOPs per multiply-add, the convention of the papers)."""

from __future__ import annotations

from vit.config import Size, ViTConfig, to_2tuple


def forward_flops(config: ViTConfig, image_size: Size | None = None) -> int:
    """Matmul FLOPs of one image's forward pass; norms and softmax are < 1% and left out."""
    h, w = to_2tuple(image_size or config.image_size)
    n_patches = (h // config.patch_size) * (w // config.patch_size)
    n = n_patches + config.num_prefix_tokens
    d, m = config.dim, config.mlp_dim
    per_block = n * (4 * d * d + 2 * d * m) + 2 * n * n * d  # qkv+proj, MLP, QK^T and AV
    macs = n_patches * config.patch_dim * d + config.depth * per_block
    head_in = config.representation_size or d
    if config.representation_size:
        macs += d * config.representation_size
    macs += head_in * config.num_classes
    return 2 * macs
