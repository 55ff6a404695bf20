"""`vitray info PRESET|CHECKPOINT`: the config, parameter count and GFLOPs of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vit import ViT, ViTConfig, forward_flops, preset_names, read_checkpoint_meta


def resolve_config(name: str, image_size: int | None, num_classes: int | None) -> ViTConfig:
    """A preset name (`s/16`) or a checkpoint directory, at an optional new size."""
    if Path(name).is_dir():
        config = ViTConfig.from_dict(read_checkpoint_meta(name)["model"])
    else:
        try:
            config = ViTConfig.from_preset(name)
        except ValueError as e:
            raise ValueError(f"{name}: no such checkpoint directory, and {e}") from e
    if image_size:
        config = config.replace(image_size=(image_size, image_size))
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)
    return config


def family(c: ViTConfig) -> str:
    """The ViT family a config's options make, and those options in words."""
    if c.dist_token:
        name = "distilled DeiT"
    elif c.pool == "map":
        name = "SigLIP image tower"
    elif c.norm_pre:
        name = "OpenAI CLIP image tower" if c.act == "quick_gelu" else "CLIP image tower"
    elif c.layer_scale is not None and c.reg_tokens:
        name = "DINOv2 with registers"
    elif c.layer_scale is not None:
        name = "DeiT III / DINOv2"
    else:
        name = "ViT (the paper's)"
    words = {
        f"layer scale (init {c.layer_scale:g})" if c.layer_scale is not None else "": True,
        f"{c.reg_tokens} register tokens": c.reg_tokens > 0,
        "a distillation token and head": c.dist_token,
        "no class token": not c.class_token,
        "position embeddings for the patches only": c.no_embed_class,
        "a norm before the blocks": c.norm_pre,
        f"{c.act} activation": c.act != "gelu",
        "no patch embedding bias": not c.patch_bias,
        "qk norm": c.qk_norm,
        {
            "cls": "class-token pooling",
            "gap": "average pooling",
            "map": "attention pooling (MAP head)",
        }[c.pool]: True,  # fmt: skip
        f"position embeddings resized as {c.posemb_interpolation} does": True,
    }
    return f"{name}: " + ", ".join(w for w, on in words.items() if w and on)


def run(args: argparse.Namespace) -> None:
    config = resolve_config(args.model, args.image_size, args.num_classes)
    params = ViT(config).num_params()
    print(json.dumps(config.to_dict(), indent=2))
    h, w = config.image_size
    print(
        f"grid: {config.grid_size[0]}x{config.grid_size[1]} patches of "
        f"{config.patch_size}x{config.patch_size} ({config.num_patches} + "
        f"{config.num_prefix_tokens} tokens)"
    )
    print(f"family: {family(config)}")
    print(f"parameters: {params / 1e6:.2f} M")
    print(f"forward GFLOPs at {h}x{w}: {forward_flops(config) / 1e9:.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a preset ({', '.join(preset_names())}) or a checkpoint dir")
    parser.add_argument("--image-size", type=int, help="report at this image size instead")
    parser.add_argument("--num-classes", type=int, help="report with this many classes")
