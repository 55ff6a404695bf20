"""`vitray convert`: foreign weights into a vitray checkpoint directory, and back out.

Normalisation travels with the weights: an import reads it from the peer's own files beside
them (timm's config.json `pretrained_cfg`, Hugging Face's preprocessor_config.json) or from a
torchvision weights enum, and fails when a timm or Hugging Face source declares none, since
their models differ (mean/std 0.5, ImageNet's, CLIP's) and a wrong guess silently degrades
every fine-tune. JAX and torchvision files never declare it, but every model of theirs uses
one (0.5; ImageNet's), so those imports use it and log a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vit import ViT, interop, load_checkpoint, read_checkpoint_meta, save_checkpoint
from vit.checkpoint import read_preprocessing
from vit.config import DEFAULT_EVAL, Preprocessing, ViTConfig, to_2tuple
from vit.hf_families import FAMILIES, activation, family_of, from_hf_family
from vit.timm_config import timm_architecture

log = logging.getLogger(__name__)

SOURCES = ("timm", "hf", "torchvision", "jax")
TARGETS = ("timm", "hf", "jax")
# A Hub directory's weights, in the order transformers and timm prefer them.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DECLARED_IN = {"timm": "config.json", "hf": "preprocessor_config.json"}
# transformers model types whose weights are the plain ViT's, under ViT's own names
PLAIN_HF_VITS = {"vit", "vit_mae", "ijepa"}
CONVENTIONS = {  # formats whose files never declare normalisation, but whose models share one
    "jax": "mean and std 0.5 (pixels to [-1, 1]), as vit_jax and big_vision train",
    "torchvision": "ImageNet's mean and std, as every torchvision weight; resize and crop "
    "unknown: name the weights (torchvision:PATH:ViT_B_16_Weights.IMAGENET1K_V1) to import them",
}


def holdings(directory: Path) -> str:
    """What a directory holds, for error messages."""
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from `.safetensors`, or from a torch file loaded with `weights_only=True`."""
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(
            f"{path}: not a weights file torch.load(weights_only=True) reads: {e}"
        ) from e
    return state.get("state_dict", state.get("model", state))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file, or a Hub directory's: its first file of WEIGHT_FILES, where an
    `.index.json` (`save_pretrained(max_shard_size=...)`) lists the shards to read."""
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path}: no weights ({', '.join(WEIGHT_FILES)}); it holds: {holdings(path)}"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if not path.name.endswith(".index.json"):
        return read_weights_file(path)
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    missing = [name for name in shards if not (path.parent / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} lists shards {missing} that {path.parent} lacks; it holds: "
            f"{holdings(path.parent)}"
        )
    return {k: v for name in shards for k, v in read_weights_file(path.parent / name).items()}


def folder_of(src: Path) -> Path:
    """The directory of the weights, where the peer keeps its config files."""
    return src if src.is_dir() else src.parent


def hf_architecture(hf: dict[str, Any], cfg_path: Path, declared: dict[str, Any]) -> dict[str, Any]:
    """Architecture facts from a Hugging Face model's config.json (`hf`, read from
    `cfg_path`); its image size must be the one the processor declares (`declared`), if any."""
    found = {
        "num_heads": hf.get("num_attention_heads"),
        "norm_eps": hf.get("layer_norm_eps"),
        "image_size": hf.get("image_size"),
        "qkv_bias": hf.get("qkv_bias"),
        "act": activation(hf["hidden_act"]) if "hidden_act" in hf else None,
    }
    if hf.get("pooler_act", "tanh") != "tanh":  # ViTModel's pooler, vitray's pre-logits
        raise ValueError(
            f"{cfg_path}: pooler_act {hf['pooler_act']!r}: vitray's pre-logits is tanh"
        )
    size, processed = found["image_size"], declared.get("image_size")
    if size is not None and processed is not None and to_2tuple(size) != to_2tuple(processed):
        raise ValueError(
            f"{cfg_path}: image_size {'x'.join(map(str, to_2tuple(size)))}, but the "
            f"preprocessor config makes {'x'.join(map(str, to_2tuple(processed)))} images"
        )
    return {k: v for k, v in found.items() if v is not None}


def import_hf(src: Path, fields: dict[str, Any]) -> ViT:
    """A transformers ViT, or a tower of a family in vit.hf_families (its config.json
    says which). A family's size is its position embeddings' (DINOv2's 518 px, whatever
    its processor crops to): HF resizes them on the fly, vitray when it loads the model."""
    cfg_path = folder_of(src) / "config.json"
    if not cfg_path.is_file():  # heads, eps and activation are not in the weights
        raise FileNotFoundError(
            f"{src}: Hugging Face weights keep their architecture (heads, norm eps, "
            f"activation) in config.json, which {folder_of(src)} lacks (it holds: "
            f"{holdings(folder_of(src))}); copy the model repository's config.json next to them"
        )
    hf_cfg = json.loads(cfg_path.read_text())
    try:
        family = family_of(hf_cfg)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    model_type = hf_cfg.get("model_type", "vit")
    if family is None and model_type not in PLAIN_HF_VITS:
        raise ValueError(
            f"{cfg_path}: model_type {model_type!r} ({', '.join(hf_cfg.get('architectures', []))})"
            f" is not a ViT vitray reads; it reads {', '.join(sorted(PLAIN_HF_VITS))} and the "
            f"towers {', '.join(sorted(FAMILIES))}"
        )
    if family is None:
        architecture = hf_architecture(hf_cfg, cfg_path, fields)
        return interop.from_hf(read_state_dict(src), **{**architecture, **fields})
    fields = {k: v for k, v in fields.items() if k != "image_size"}
    return from_hf_family(read_state_dict(src), hf_cfg, family, **fields)


def hf_class_names(path: Path) -> list[str] | None:
    cfg_path = folder_of(path) / "config.json"
    if not cfg_path.is_file():
        return None
    id2label = json.loads(cfg_path.read_text()).get("id2label")
    return [id2label[str(i)] for i in range(len(id2label))] if id2label else None


def timm_fields(src: Path) -> dict[str, Any]:
    """What the architecture named in timm's config.json beside `src` is (heads, pooling,
    norms), or a refusal naming what vitray's ViT cannot be ({}: no config.json)."""
    path = folder_of(src) / "config.json"
    if not path.is_file():
        return {}
    return timm_architecture(json.loads(path.read_text()))


def read_declared(fmt: str, src: Path) -> interop.Declared | None:
    """The normalisation, size, resize and crop in the timm or HF file beside `src`; None
    when that file is missing."""
    path = folder_of(src) / DECLARED_IN[fmt]
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    try:
        if fmt == "hf":
            return interop.hf_preprocessing(cfg)
        # older timm Hub files keep pretrained_cfg's keys at the top
        fields, preprocessing = interop.timm_preprocessing(cfg.get("pretrained_cfg", cfg))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    args = cfg.get("model_args", {})
    if args.get("img_size"):  # the weights' grid; a dynamic_img_size model keeps the default
        grid, declared = to_2tuple(args["img_size"]), fields.get("image_size")  # input_size
        if declared and declared != grid and not args.get("dynamic_img_size"):
            raise ValueError(
                f"{path}: pretrained_cfg's input_size {declared} is not model_args' img_size "
                f"{grid}, the size its pos_embed was made for"
            )
        fields["image_size"] = grid
    return fields, preprocessing


def torchvision_weights(src: Path) -> tuple[Path, Any | None]:
    """`PATH:ViT_B_16_Weights.IMAGENET1K_V1` -> the file and that weights enum; a bare PATH
    named as torchvision downloads it (`vit_b_16-c867db91.pth`) finds its own; else None."""
    from torchvision.models import get_model_weights, get_weight, list_models

    path, _, name = str(src).rpartition(":")
    if re.fullmatch(r"\w+_Weights\.\w+", name):
        try:
            return Path(path), get_weight(name)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{name}: not a torchvision weights enum ({e})") from e
    for model in list_models(include="vit_*"):
        for weights in get_model_weights(model):
            if weights.url.rsplit("/", 1)[-1] == src.name:
                return src, weights
    return src, None


def import_weights(fmt: str, src: Path, out: Path, **overrides: Any) -> ViT:
    """Read `src` in format `fmt` and write our checkpoint directory `out`, with the
    normalisation (and resize and crop) its source declares. Keyword overrides are
    ViTConfig fields; given `mean` and `std`, a source need not declare them."""
    if fmt not in SOURCES:
        raise ValueError(f"unknown source format {fmt!r}; choose from {SOURCES}")
    given = {"mean", "std"} <= overrides.keys()
    declared: interop.Declared | None = None
    if fmt == "torchvision":
        src, weights = torchvision_weights(src)
        if weights is not None:
            declared = interop.torchvision_preprocessing(weights.transforms())
    if not src.exists():
        raise FileNotFoundError(f"{fmt} weights {src}: no such file or directory")
    if fmt in DECLARED_IN:
        declared = read_declared(fmt, src)
        if declared is None and not given:
            folder = folder_of(src)
            raise FileNotFoundError(
                f"{src}: {fmt} weights declare their normalisation in {DECLARED_IN[fmt]}, "
                f"which {folder} lacks (it holds: {holdings(folder)}); copy the model "
                f"repository's {DECLARED_IN[fmt]} next to the weights"
            )
    if declared is None and not given:
        log.warning("%s declares no normalisation: using %s", src, CONVENTIONS[fmt])
    fields, preprocessing = declared or ({}, None)
    fields = {**fields, **overrides}
    class_names = None
    if fmt == "jax":
        model = interop.from_jax_npz(src, **fields)
    elif fmt == "hf":
        model = import_hf(src, fields)
        class_names = hf_class_names(src)
    elif fmt == "timm":
        architecture = timm_fields(src)  # first: a refusal needs no weights read
        model = interop.from_timm(read_state_dict(src), **{**architecture, **fields})
    else:
        model = interop.from_torchvision(read_state_dict(src), **fields)
    save_checkpoint(model, out, class_names=class_names, preprocessing=preprocessing)
    return model


# The options of later ViTs that Hugging Face's ViT and the paper's JAX layout do not have.
LATER_VIT_OPTIONS = ("layer_scale", "reg_tokens", "no_embed_class", "norm_pre", "patch_bias",
                     "qk_norm", "dist_token", "fc_norm", "final_norm", "mlp", "norm", "patch_norm",
                     "proj_bias", "sub_norm")  # fmt: skip


def paper_vit_only(config: ViTConfig, target: str) -> None:
    """Refuse, by name, what a target holding the paper's ViT alone cannot carry: written
    anyway, its model would be another function (the option's weights dropped)."""
    paper = ViTConfig()
    differ = [
        f"{name}={getattr(config, name)!r}"
        for name in LATER_VIT_OPTIONS
        if getattr(config, name) != getattr(paper, name)
    ]
    if target == "jax" and config.act != "gelu":  # HF's config names the activation
        differ.append(f"act={config.act!r}")
    if differ:
        raise ValueError(
            f"{target} holds the paper's ViT only; this model has {', '.join(differ)}: "
            "export it to timm (--to timm), whose VisionTransformer has these options"
        )


def npz_can_hold(config: ViTConfig) -> None:
    """Refuse what the paper's .npz cannot say: it holds weights alone, and its readers
    (vitray's, timm's, big_vision's) take the rest from the paper's conventions."""
    differ = {
        "a MAP head": config.pool == "map",
        "average pooling beside a class token (read back as class-token pooling)": (
            config.pool == "gap" and config.class_token
        ),
        f"norm_eps={config.norm_eps:g} (read as 1e-6)": config.norm_eps != 1e-6,
        f"mean {config.mean} and std {config.std} (read as 0.5)": (
            set(config.mean) | set(config.std) != {0.5}
        ),
        f"a non-square image {config.image_size} (read as a square grid)": (
            config.image_size[0] != config.image_size[1]
        ),
    }
    found = [what for what, there in differ.items() if there]
    if found:
        raise ValueError(
            f"jax's .npz holds the paper's ViT only; this model has {'; '.join(found)}: "
            "export it to timm (--to timm), whose files say these"
        )


def hf_config(model: ViT, class_names: list[str] | None) -> dict:
    """A transformers ViTConfig dict, so `ViTForImageClassification.from_pretrained` loads it."""
    c = model.config
    paper_vit_only(c, "hf")
    if c.image_size[0] != c.image_size[1] or c.pool != "cls" or c.posemb != "learn":
        raise ValueError("Hugging Face ViT needs a square image, pool='cls' and learned posemb")
    if c.representation_size:  # ViTForImageClassification classifies the normed token itself
        raise ValueError(
            f"Hugging Face's ViT classifier has no pre-logits layer (representation_size="
            f"{c.representation_size}); export it to jax, or fine-tune without it"
        )
    labels = class_names or [f"LABEL_{i}" for i in range(c.num_classes)]
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": c.dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.mlp_dim,
        "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}.get(c.act, c.act),
        "layer_norm_eps": c.norm_eps,
        "image_size": c.image_size[0],
        "patch_size": c.patch_size,
        "num_channels": c.in_chans,
        "qkv_bias": c.qkv_bias,
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_weights(fmt: str, checkpoint: Path, out: Path) -> Path:
    """Write our checkpoint in format `fmt`: a `.npz` file, or a directory for timm and HF
    with the peer's preprocessing file (timm's `pretrained_cfg`, HF's processor config)."""
    if fmt not in TARGETS:
        raise ValueError(f"unknown target format {fmt!r}; choose from {TARGETS}")
    model = load_checkpoint(checkpoint)
    preprocessing = read_preprocessing(checkpoint)
    if fmt == "jax":
        paper_vit_only(model.config, "jax")
        npz_can_hold(model.config)
        out.parent.mkdir(parents=True, exist_ok=True)
        return interop.to_jax_npz(model, out if out.suffix == ".npz" else out.with_suffix(".npz"))
    # what a target cannot hold is refused before anything is written
    if fmt == "timm":
        pretrained_cfg = interop.timm_pretrained_cfg(model.config, preprocessing)
        files = {
            "config.json": {
                **interop.timm_model_config(model.config),
                "pretrained_cfg": pretrained_cfg,
            }
        }
        weights, metadata = interop.to_timm(model), None
    else:
        class_names = read_checkpoint_meta(checkpoint).get("class_names")
        files = {
            "config.json": hf_config(model, class_names),
            "preprocessor_config.json": interop.hf_processor_config(model.config, preprocessing),
        }
        weights, metadata = interop.to_hf(model), {"format": "pt"}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors", metadata)
    for name, data in files.items():
        write_json(out / name, data)
    if fmt == "hf":
        warn_inexact_crop(files["preprocessor_config.json"], preprocessing)
    return out


def warn_inexact_crop(processor: dict, preprocessing: Preprocessing | None) -> None:
    """HF's processors resize to whole pixels: a crop fraction that does not divide the
    image size is written as the nearest one, which the written config is read back as."""
    wanted = (preprocessing or DEFAULT_EVAL).crop_fraction
    written = interop.hf_preprocessing(processor)[1].crop_fraction
    if abs(written - wanted) > 1e-6:
        log.warning(
            "Hugging Face's processor resizes to whole pixels: its crop keeps %.4f of the "
            "resized image, the source's %s",
            written, wanted,
        )  # fmt: skip
