"""`vitray convert`: foreign weights into a vitray checkpoint directory, and back out."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vit import ViT, interop, load_checkpoint, read_checkpoint_meta, save_checkpoint

SOURCES = ("timm", "hf", "torchvision", "jax")
TARGETS = ("timm", "hf", "jax")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from `.safetensors`, or from a torch file loaded with `weights_only=True`."""
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state))


def hf_overrides(path: Path) -> dict:
    """Architecture facts from a Hugging Face model directory's config.json, when present."""
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return {}
    hf = json.loads(cfg_path.read_text())
    found = {
        "num_heads": hf.get("num_attention_heads"),
        "norm_eps": hf.get("layer_norm_eps"),
        "image_size": hf.get("image_size"),
        "qkv_bias": hf.get("qkv_bias"),
    }
    return {k: v for k, v in found.items() if v is not None}


def hf_class_names(path: Path) -> list[str] | None:
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return None
    id2label = json.loads(cfg_path.read_text()).get("id2label")
    return [id2label[str(i)] for i in range(len(id2label))] if id2label else None


def import_weights(fmt: str, src: Path, out: Path, **overrides) -> ViT:
    """Read `src` in format `fmt` and write our checkpoint directory `out`."""
    class_names = None
    if fmt == "jax":
        model = interop.from_jax_npz(src, **overrides)
    elif fmt == "hf":
        model = interop.from_hf(read_state_dict(src), **{**hf_overrides(src), **overrides})
        class_names = hf_class_names(src)
    elif fmt == "timm":
        model = interop.from_timm(read_state_dict(src), **overrides)
    elif fmt == "torchvision":
        model = interop.from_torchvision(read_state_dict(src), **overrides)
    else:
        raise ValueError(f"unknown source format {fmt!r}; choose from {SOURCES}")
    save_checkpoint(model, out, class_names=class_names)
    return model


def hf_config(model: ViT, class_names: list[str] | None) -> dict:
    """A transformers ViTConfig dict, so `ViTForImageClassification.from_pretrained` loads it."""
    c = model.config
    if c.image_size[0] != c.image_size[1] or c.pool != "cls" or c.posemb != "learn":
        raise ValueError("Hugging Face ViT needs a square image, pool='cls' and learned posemb")
    labels = class_names or [f"LABEL_{i}" for i in range(c.num_classes)]
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": c.dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.mlp_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": c.norm_eps,
        "image_size": c.image_size[0],
        "patch_size": c.patch_size,
        "num_channels": c.in_chans,
        "qkv_bias": c.qkv_bias,
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def export_weights(fmt: str, checkpoint: Path, out: Path) -> Path:
    """Write our checkpoint in format `fmt`: a `.npz` file, or a directory for timm and HF."""
    model = load_checkpoint(checkpoint)
    if fmt == "jax":
        out.parent.mkdir(parents=True, exist_ok=True)
        return interop.to_jax_npz(model, out if out.suffix == ".npz" else out.with_suffix(".npz"))
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "timm":
        save_file(
            {k: v.contiguous() for k, v in interop.to_timm(model).items()},
            out / "model.safetensors",
        )
    elif fmt == "hf":
        class_names = read_checkpoint_meta(checkpoint).get("class_names")
        save_file(
            {k: v.contiguous() for k, v in interop.to_hf(model).items()},
            out / "model.safetensors",
            metadata={"format": "pt"},
        )
        (out / "config.json").write_text(json.dumps(hf_config(model, class_names), indent=2))
    else:
        raise ValueError(f"unknown target format {fmt!r}; choose from {TARGETS}")
    return out
