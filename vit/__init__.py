"""vit: the Vision Transformer in pure PyTorch (no Ray, no MLflow)."""

from vit.checkpoint import (
    load_checkpoint,
    model_from_weights,
    model_weights,
    read_checkpoint_meta,
    read_preprocessing,
    save_checkpoint,
)
from vit.config import Preprocessing, ViTConfig, preset_names
from vit.flops import forward_flops
from vit.model import ViT
from vit.patches import patchify, unpatchify
from vit.resize import resample_patch_embed, resize_pos_embed

__all__ = [
    "Preprocessing",
    "ViT",
    "ViTConfig",
    "forward_flops",
    "load_checkpoint",
    "model_from_weights",
    "model_weights",
    "patchify",
    "preset_names",
    "read_checkpoint_meta",
    "read_preprocessing",
    "resample_patch_embed",
    "resize_pos_embed",
    "save_checkpoint",
    "unpatchify",
]
