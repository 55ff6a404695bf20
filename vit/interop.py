"""Weights to and from timm, Hugging Face, torchvision and the paper's JAX `.npz` files.

Each foreign format is a pure dict-to-dict conversion into our layout (which uses timm's
names); `infer_config` reads the architecture off the tensor shapes and
`load_state_dict_checked` names whatever does not fit. Our `patch_embed` is a linear map
over HWC-flattened patches, the peers' is a P x P convolution: the same numbers, reordered.

The weights only work on images prepared as their source prepared them, so each peer's own
description of that (timm's `pretrained_cfg`, Hugging Face's `preprocessor_config.json`, a
torchvision weights enum's `transforms()`) converts too: into ViTConfig fields (mean, std,
image size; the model normalises uint8 pixels itself) and a `Preprocessing` (resize, crop).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vit.checkpoint import load_state_dict_checked
from vit.config import DEFAULT_EVAL, HEADS_BY_WIDTH, Preprocessing, ViTConfig, to_2tuple
from vit.model import ViT

StateDict = dict[str, torch.Tensor]
Declared = tuple[dict[str, Any], Preprocessing]  # ViTConfig fields, and the resize and crop

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Our name <-> the peer's name; `{i}` is a block index, `{w}` is weight or bias.
# Hugging Face: the layout of the files on the Hub and of `save_pretrained` (all versions).
HF_NAMES = [
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.{w}", "vit.embeddings.patch_embeddings.projection.{w}"),
    ("blocks.{i}.norm1.{w}", "vit.encoder.layer.{i}.layernorm_before.{w}"),
    ("blocks.{i}.attn.proj.{w}", "vit.encoder.layer.{i}.attention.output.dense.{w}"),
    ("blocks.{i}.norm2.{w}", "vit.encoder.layer.{i}.layernorm_after.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "vit.encoder.layer.{i}.intermediate.dense.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "vit.encoder.layer.{i}.output.dense.{w}"),
    ("norm.{w}", "vit.layernorm.{w}"),
    ("pre_logits.0.{w}", "vit.pooler.dense.{w}"),  # ViTModel's pooler: the paper's pre-logits
    ("head.{w}", "classifier.{w}"),
]
HF_QKV_NAMES = [  # read only: fused by fuse_qkv, split again by vit_to_hf
    (
        f"blocks.{{i}}.attn.{ours}.{{w}}",
        f"vit.encoder.layer.{{i}}.attention.attention.{theirs}.{{w}}",
    )
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"))
]
# transformers >= 5 renames the modules in memory (`model.state_dict()`), not in files.
HF_MEMORY_TO_FILE_NAMES = [
    ("vit.layers.{i}.attention.q_proj.{w}", "vit.encoder.layer.{i}.attention.attention.query.{w}"),
    ("vit.layers.{i}.attention.k_proj.{w}", "vit.encoder.layer.{i}.attention.attention.key.{w}"),
    ("vit.layers.{i}.attention.v_proj.{w}", "vit.encoder.layer.{i}.attention.attention.value.{w}"),
    ("vit.layers.{i}.attention.o_proj.{w}", "vit.encoder.layer.{i}.attention.output.dense.{w}"),
    ("vit.layers.{i}.layernorm_before.{w}", "vit.encoder.layer.{i}.layernorm_before.{w}"),
    ("vit.layers.{i}.layernorm_after.{w}", "vit.encoder.layer.{i}.layernorm_after.{w}"),
    ("vit.layers.{i}.mlp.fc1.{w}", "vit.encoder.layer.{i}.intermediate.dense.{w}"),
    ("vit.layers.{i}.mlp.fc2.{w}", "vit.encoder.layer.{i}.output.dense.{w}"),
]
TORCHVISION_NAMES = [
    ("cls_token", "class_token"),
    ("pos_embed", "encoder.pos_embedding"),
    ("patch_embed.{w}", "conv_proj.{w}"),
    ("blocks.{i}.norm1.{w}", "encoder.layers.encoder_layer_{i}.ln_1.{w}"),
    ("blocks.{i}.attn.qkv.{w}", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_{w}"),
    ("blocks.{i}.attn.proj.{w}", "encoder.layers.encoder_layer_{i}.self_attention.out_proj.{w}"),
    ("blocks.{i}.norm2.{w}", "encoder.layers.encoder_layer_{i}.ln_2.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "encoder.layers.encoder_layer_{i}.mlp.0.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "encoder.layers.encoder_layer_{i}.mlp.3.{w}"),
    ("norm.{w}", "encoder.ln.{w}"),
    ("pre_logits.0.{w}", "heads.pre_logits.{w}"),
    ("head.{w}", "heads.head.{w}"),
]
TIMM_NAMES = [("patch_embed.{w}", "patch_embed.proj.{w}")]  # all other names are shared


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>\w+)")
    return re.compile(regex + "$")


def rename(state: StateDict, table: list[tuple[str, str]], reverse: bool = False) -> StateDict:
    """Rename keys by a template table; keys no template matches pass through unchanged."""
    pairs = [(b, a) if reverse else (a, b) for a, b in table]
    compiled = [(_pattern(src), dst) for src, dst in pairs]
    out = {}
    for key, value in state.items():
        for pattern, dst in compiled:
            if m := pattern.match(key):
                key = dst.format(**m.groupdict())
                break
        out[key] = value
    return out


def conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Conv patch embedding (D, C, P, P) -> our E (D, P*P*C), HWC order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def linear_to_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Our E (D, P*P*C) -> conv patch embedding (D, C, P, P)."""
    patch = math.isqrt(weight.shape[1] // in_chans)
    return weight.reshape(weight.shape[0], patch, patch, in_chans).permute(0, 3, 1, 2)


def infer_config(state: StateDict, **overrides: Any) -> ViTConfig:
    """The ViTConfig that a state dict in our layout was made with, read off its shapes.

    Heads come from the standard width table unless `num_heads` is given; a learned
    position-embedding grid is assumed square unless `image_size` is given.
    """
    dim, patch_dim = state["patch_embed.weight"].shape
    in_chans = overrides.get("in_chans", 3)
    patch = math.isqrt(patch_dim // in_chans)
    class_token = "cls_token" in state
    fc_norm = "fc_norm.weight" in state
    reg_tokens = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = int(class_token) + int("dist_token" in state) + reg_tokens
    found: dict[str, Any] = dict(
        patch_size=patch,
        in_chans=in_chans,
        dim=dim,
        depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        class_token=class_token,
        fc_norm=fc_norm,
        pool="map"
        if "attn_pool.latent" in state
        else "gap"
        if fc_norm or not class_token
        else "cls",
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        posemb="learn" if "pos_embed" in state else "sincos2d",
        # the options of later ViTs that their tensors show (QuickGELU and the pooling do
        # not: timm's config names them, vit.timm_config reads them)
        reg_tokens=reg_tokens,
        dist_token="dist_token" in state,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None,  # timm's default init
        norm_pre="norm_pre.weight" in state,
        patch_bias="patch_embed.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        final_norm="norm.weight" in state or fc_norm,
        patch_norm="patch_norm.weight" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        sub_norm="blocks.0.attn.norm.weight" in state,
    )
    if "pre_logits.0.weight" in state:
        found["representation_size"] = state["pre_logits.0.weight"].shape[0]
    if "pos_embed" in state:
        # position embeddings for every prefix token, or (no_embed_class) for none of them
        n = state["pos_embed"].shape[1]
        if "image_size" in overrides:  # the grid is known: embeddings for its cells alone?
            h, w = to_2tuple(overrides["image_size"])
            guess = prefix > 0 and n == (h // patch) * (w // patch)
        else:
            guess = prefix > 0 and math.isqrt(n - prefix) ** 2 != n - prefix
        no_embed_class = overrides.get("no_embed_class", guess)
        found["no_embed_class"] = no_embed_class
        embedded = 0 if no_embed_class else prefix
        if "image_size" not in overrides:
            found["image_size"] = math.isqrt(n - embedded) * patch
    if "num_heads" not in overrides:
        if dim not in HEADS_BY_WIDTH:
            raise ValueError(f"width {dim} is not a standard ViT width; pass num_heads=")
        found["num_heads"] = HEADS_BY_WIDTH[dim]
    return ViTConfig(**{**found, **overrides})


def build_from_state(state: StateDict, **overrides: Any) -> ViT:
    """A ViT whose config is inferred from `state` (our layout), with the weights loaded."""
    model = ViT(infer_config(state, **overrides))
    load_state_dict_checked(model, state)
    return model.eval()


# timm ------------------------------------------------------------------------------------


def timm_to_vit(state: StateDict) -> StateDict:
    out = rename(state, TIMM_NAMES, reverse=True)
    out["patch_embed.weight"] = conv_to_linear(out["patch_embed.weight"])
    # timm's SwiGLU (AIMv2) keeps the gate's and the value's projections apart: stacked,
    # they are one packed projection, SiLU(gate) * value (ViTConfig's swiglu_packed)
    for key in [k for k in out if ".mlp.fc1_g." in k]:
        out[key.replace(".fc1_g.", ".fc1.")] = torch.cat(
            [out.pop(key), out.pop(key.replace("_g.", "_x."))]
        )
    out.update({k.replace("patch_embed.norm.", "patch_norm."): out.pop(k)
                for k in [k for k in out if k.startswith("patch_embed.norm.")]})  # fmt: skip
    return out


def vit_to_timm(state: StateDict, in_chans: int = 3) -> StateDict:
    if "pre_logits.0.weight" in state:
        raise ValueError("timm's VisionTransformer has no pre-logits (representation) layer")
    out = rename(state, TIMM_NAMES)
    out["patch_embed.proj.weight"] = linear_to_conv(out["patch_embed.proj.weight"], in_chans)
    return out


def from_timm(state: StateDict, **overrides: Any) -> ViT:
    """timm `VisionTransformer` weights (e.g. `vit_small_patch16_384`) -> our ViT."""
    conv = state["patch_embed.proj.weight"]
    found = dict(in_chans=conv.shape[1], patch_size=conv.shape[2])
    return build_from_state(timm_to_vit(state), **{**found, **overrides})


def to_timm(model: ViT) -> StateDict:
    return vit_to_timm(model.state_dict(), model.config.in_chans)


def timm_preprocessing(cfg: dict[str, Any]) -> Declared:
    """timm's `pretrained_cfg` (a Hub config.json's, a model's, or `resolve_data_config`'s,
    which has the same keys). Interpolation and crop default as in `resolve_data_config`;
    mean and std must be given: timm's models differ (0.5, ImageNet's, CLIP's). A model
    created at another `img_size` keeps its default `input_size` (`save_for_hf` writes the
    current one)."""
    missing = [key for key in ("mean", "std") if not cfg.get(key)]
    if missing:
        raise ValueError(f"no {' or '.join(missing)}")
    fields: dict[str, Any] = {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    if cfg.get("input_size"):
        fields["image_size"] = tuple(cfg["input_size"][1:])
    preprocessing = Preprocessing(
        interpolation=cfg.get("interpolation") or "bicubic",
        crop_fraction=cfg.get("crop_pct") or 0.875,
        crop_mode=cfg.get("crop_mode") or "center",
    )
    return fields, preprocessing


def timm_pretrained_cfg(config: ViTConfig, preprocessing: Preprocessing | None) -> dict[str, Any]:
    """Our normalisation, size and (when known) resize and crop, as timm's `pretrained_cfg`."""
    cfg: dict[str, Any] = {
        "input_size": [config.in_chans, *config.image_size],
        "mean": list(config.mean),
        "std": list(config.std),
        "num_classes": config.num_classes,
    }
    p = preprocessing or DEFAULT_EVAL  # timm's own defaults are bicubic
    cfg.update(interpolation=p.interpolation, crop_pct=p.crop_fraction, crop_mode=p.crop_mode)
    return cfg


# timm architectures whose registered defaults hold the LayerNorm eps of a config (the
# arguments below override everything else): timm's VisionTransformer takes no eps argument.
TIMM_BASE_ARCHITECTURE = {  # (eps, dist_token, mlp): a registered architecture that has them
    (1e-6, False, "mlp"): "vit_base_patch16_224",
    (1e-5, False, "mlp"): "vit_base_patch16_clip_224",  # timm's CLIP towers: eps 1e-5
    (1e-6, True, "mlp"): "deit_base_distilled_patch16_224",
    (1e-6, False, "swiglu_packed"): "vit_giant_patch14_dinov2",  # its MLP: SwiGLUPacked
}


def timm_model_config(config: ViTConfig) -> dict[str, Any]:
    """What timm's config.json says about the architecture (`architecture`, `model_args`),
    so that `timm.create_model("local-dir:DIR", pretrained=True)` builds this model."""
    c = config
    arch = TIMM_BASE_ARCHITECTURE.get((c.norm_eps, c.dist_token, c.mlp))
    refused = {
        f"LayerNorm eps {c.norm_eps} with dist_token {c.dist_token} and mlp {c.mlp}": arch is None,
        "sincos2d position embeddings (timm's are learned)": c.posemb != "learn",
        "a pre-logits layer": c.representation_size is not None,
        "RMSNorm, a patch-embedding norm or no projection biases (AIMv2's layout)": (
            c.norm != "layernorm" or c.patch_norm or not c.proj_bias
        ),
        "a patch embedding bias that is not the opposite of norm_pre (timm ties them)": (
            c.patch_bias == c.norm_pre
        ),
        "a distillation token without position embeddings for the prefix (timm's distilled "
        "DeiT has them)": c.dist_token and c.no_embed_class,
        "a MAP head whose MLP is a SwiGLU or has sub-LN (timm's attention pool has a plain "
        "one)": c.pool == "map" and (c.mlp != "mlp" or c.sub_norm),
    }
    if any(refused.values()):
        raise ValueError(
            "timm's VisionTransformer cannot hold this model: "
            + "; ".join(what for what, found in refused.items() if found)
        )
    args = dict(
        img_size=list(c.image_size),
        patch_size=c.patch_size,
        in_chans=c.in_chans,
        num_classes=c.num_classes,
        embed_dim=c.dim,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio,
        qkv_bias=c.qkv_bias,
        qk_norm=c.qk_norm,
        init_values=c.layer_scale,
        class_token=c.class_token,
        no_embed_class=c.no_embed_class,
        reg_tokens=c.reg_tokens,
        pre_norm=c.norm_pre,
        fc_norm=c.fc_norm,
        final_norm=c.final_norm,
        scale_attn_norm=c.sub_norm,
        scale_mlp_norm=c.sub_norm,
        global_pool={"cls": "token", "gap": "avg", "map": "map"}[c.pool],
        act_layer="silu" if c.mlp == "swiglu_packed" else c.act,  # timm's names
    )
    if c.dist_token:  # timm's distilled DeiT has its layout fixed
        args = {k: v for k, v in args.items() if k not in ("class_token", "reg_tokens")}
    return {"architecture": arch, "num_classes": c.num_classes, "model_args": args}


# Hugging Face (transformers ViTForImageClassification) ------------------------------------


def hf_to_vit(state: StateDict) -> StateDict:
    """HF weights, as stored in files or as a transformers 5 model's `state_dict()`."""
    if not any(k.startswith("vit.") for k in state):  # a bare ViTModel
        state = {f"vit.{k}": v for k, v in state.items()}
    state = rename(state, HF_MEMORY_TO_FILE_NAMES)
    out = rename(state, HF_NAMES + HF_QKV_NAMES, reverse=True)
    out["patch_embed.weight"] = conv_to_linear(out["patch_embed.weight"])
    return fuse_qkv(out)


def fuse_qkv(state: StateDict) -> StateDict:
    """Separate query, key and value projections (`blocks.i.attn.q.*`, `.k.*`, `.v.*`, as
    the Hugging Face layouts keep them) fused into our `qkv`, in that order."""
    qkv = re.compile(r"blocks\.(\d+)\.attn\.([qkv])\.(\w+)$")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in [k for k in state if qkv.match(k)]:
        i, which, w = qkv.match(key).groups()
        parts.setdefault((i, w), {})[which] = state.pop(key)
    for (i, w), p in parts.items():
        state[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([p["q"], p["k"], p["v"]])
    return state


def vit_to_hf(state: StateDict, in_chans: int = 3) -> StateDict:
    """Our layout -> HF's file layout, which every transformers version loads."""
    out = rename(state, HF_NAMES)
    key = "vit.embeddings.patch_embeddings.projection.weight"
    out[key] = linear_to_conv(out[key], in_chans)
    qkv = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(\w+)$")
    for key in [k for k in out if qkv.match(k)]:
        i, w = qkv.match(key).groups()
        for which, t in zip(("query", "key", "value"), out.pop(key).chunk(3), strict=True):
            out[f"vit.encoder.layer.{i}.attention.attention.{which}.{w}"] = t
    return out


def from_hf(state: StateDict, **overrides: Any) -> ViT:
    """transformers `ViTForImageClassification` (or `ViTModel`) weights -> our ViT.

    HF's defaults differ from the paper's: LayerNorm eps 1e-12 (pass `norm_eps` if the
    model's config says otherwise).
    """
    ours = hf_to_vit(state)
    conv_key = "vit.embeddings.patch_embeddings.projection.weight"
    conv = state.get(conv_key, state.get(conv_key.removeprefix("vit.")))
    # HF resizes its position embeddings bicubic without antialiasing (interpolate_pos_encoding)
    found = dict(
        in_chans=conv.shape[1], patch_size=conv.shape[2], norm_eps=1e-12, posemb_interpolation="hf"
    )
    return build_from_state(ours, **{**found, **overrides})


def to_hf(model: ViT) -> StateDict:
    return vit_to_hf(model.state_dict(), model.config.in_chans)


PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _hf_hw(size: Any, key: str) -> tuple[int, int]:
    if isinstance(size, int):  # older processors: a square
        return size, size
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return size["height"], size["width"]
    raise ValueError(f"{key} {size!r}: expected an int, {{height, width}} or {{shortest_edge}}")


def _hf_channels(value: float | list[float]) -> list[float]:
    return [value] * 3 if isinstance(value, int | float) else list(value)


def hf_preprocessing(cfg: dict[str, Any]) -> Declared:
    """A Hugging Face `preprocessor_config.json`: resize to `size` (both sides, or the shorter
    one to `shortest_edge`), center-crop to `crop_size` (`do_center_crop`) or by `crop_pct`,
    scale by `rescale_factor`, normalise by `image_mean` and `image_std`."""
    required = ["size", "resample"] + ["crop_size"] * bool(cfg.get("do_center_crop"))
    required += ["image_mean", "image_std"] * bool(cfg.get("do_normalize", True))
    missing = [key for key in required if cfg.get(key) is None]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    size = cfg["size"]
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        mode, resized = "center", (size["shortest_edge"],) * 2
    else:
        mode, resized = "squash", _hf_hw(size, "size")
    if cfg.get("do_center_crop"):
        image = _hf_hw(cfg["crop_size"], "crop_size")
        fraction = image[0] / resized[0]
        if image[1] / resized[1] != fraction:
            raise ValueError(f"crop_size {cfg['crop_size']} is not one fraction of size {size}")
    elif mode == "center" and not cfg.get("crop_pct"):
        raise ValueError(f"size {size} without a crop: the images' shapes vary")
    else:
        image, fraction = resized, cfg.get("crop_pct") or 1.0
    if cfg["resample"] not in PIL_FILTERS:
        raise ValueError(f"resample {cfg['resample']!r} is not one of PIL's {PIL_FILTERS}")
    # HF: (pixel * factor - mean) / std = (pixel / 255 - mean / unit) / (std / unit), ours
    factor = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
    unit = round(255 * factor, 9)
    mean, std = [0.0] * 3, [1.0] * 3
    if cfg.get("do_normalize", True):
        mean, std = _hf_channels(cfg["image_mean"]), _hf_channels(cfg["image_std"])
    fields = {
        "mean": tuple(m / unit for m in mean),
        "std": tuple(s / unit for s in std),
        "image_size": image,
    }
    return fields, Preprocessing(PIL_FILTERS[cfg["resample"]], fraction, mode)


def hf_processor_config(config: ViTConfig, preprocessing: Preprocessing | None) -> dict[str, Any]:
    """A processor config that prepares images as vitray evaluates them (`preprocessing`,
    else vitray's default, DEFAULT_EVAL): a center crop as BitImageProcessor makes it
    (shorter side resized, then cropped), a squash as DeiTImageProcessor (both sides
    resized, then cropped) or, without a crop, ViTImageProcessor."""
    filters = {name: number for number, name in PIL_FILTERS.items()}
    p = preprocessing or DEFAULT_EVAL
    h, w = config.image_size
    resize: dict[str, Any] = {"size": {"height": h, "width": w}}
    kind = "ViTImageProcessor"
    if p.crop_mode == "center":
        kind = "BitImageProcessor"
        resize = {"size": {"shortest_edge": round(min(h, w) / p.crop_fraction)}}
    elif p.crop_fraction != 1:
        kind = "DeiTImageProcessor"
        resize = {
            "size": {"height": round(h / p.crop_fraction), "width": round(w / p.crop_fraction)}
        }
    if kind != "ViTImageProcessor":
        resize.update(do_center_crop=True, crop_size={"height": h, "width": w})
    return {
        "image_processor_type": kind,
        "do_resize": True,
        **resize,
        "resample": filters[p.interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(config.mean),
        "image_std": list(config.std),
    }


# torchvision (vit_b_16 and friends) --------------------------------------------------------


def torchvision_to_vit(state: StateDict) -> StateDict:
    out = rename(state, TORCHVISION_NAMES, reverse=True)
    out["patch_embed.weight"] = conv_to_linear(out["patch_embed.weight"])
    return out


def from_torchvision(state: StateDict, **overrides: Any) -> ViT:
    """torchvision `VisionTransformer` weights -> our ViT (ImageNet mean/std, as torchvision)."""
    conv = state["conv_proj.weight"]
    found = dict(
        in_chans=conv.shape[1], patch_size=conv.shape[2], mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    return build_from_state(torchvision_to_vit(state), **{**found, **overrides})


def torchvision_preprocessing(transforms: Any) -> Declared:
    """A torchvision weights enum's `transforms()` (`ImageClassification`): resize the shorter
    side to `resize_size`, center-crop to `crop_size`, normalise by `mean` and `std`."""
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    fields = {"mean": tuple(transforms.mean), "std": tuple(transforms.std), "image_size": crop}
    return fields, Preprocessing(transforms.interpolation.value, crop / resize, "center")


# JAX .npz (google-research/vision_transformer and big_vision) -------------------------------


def _jax_block_names(arrays: dict[str, np.ndarray]) -> tuple[str, str, str, str]:
    """(attention, first norm, second norm, MLP) module names: vit_jax and big_vision differ."""
    if any("MultiHeadDotProductAttention_0" in k for k in arrays):
        return "MultiHeadDotProductAttention_0", "LayerNorm_0", "LayerNorm_1", "MlpBlock_0"
    return "MultiHeadDotProductAttention_1", "LayerNorm_0", "LayerNorm_2", "MlpBlock_3"


def _unstack_scanned(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scanned encoder stores one `encoderblock` with a leading depth axis."""
    prefix = "Transformer/encoderblock/"
    out = {k: v for k, v in arrays.items() if not k.startswith(prefix)}
    for k, v in arrays.items():
        if k.startswith(prefix):
            for i, layer in enumerate(v):
                out[f"Transformer/encoderblock_{i}/{k[len(prefix) :]}"] = layer
    return out


def jax_to_vit(arrays: dict[str, np.ndarray]) -> StateDict:
    a = _unstack_scanned(arrays)
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in a.items()}
    attn, ln1, ln2, mlp = _jax_block_names(a)
    kernel = t["embedding/kernel"]  # (P, P, C, D): HWIO, already our HWC patch order
    out = {
        "patch_embed.weight": kernel.reshape(-1, kernel.shape[-1]).T,
        "patch_embed.bias": t["embedding/bias"],
        "norm.weight": t["Transformer/encoder_norm/scale"],
        "norm.bias": t["Transformer/encoder_norm/bias"],
    }
    if "cls" in t:
        out["cls_token"] = t["cls"]
    for key in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
        if key in t:
            out["pos_embed"] = t[key]
    if "head/kernel" in t:
        out["head.weight"], out["head.bias"] = t["head/kernel"].T, t["head/bias"]
    if "pre_logits/kernel" in t:
        out["pre_logits.0.weight"] = t["pre_logits/kernel"].T
        out["pre_logits.0.bias"] = t["pre_logits/bias"]
    depth = len({k.split("/")[1] for k in t if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ours, theirs in (("norm1", ln1), ("norm2", ln2)):
            out[b + ours + ".weight"] = t[f"{p}{theirs}/scale"]
            out[b + ours + ".bias"] = t[f"{p}{theirs}/bias"]
        q, k, v = (t[f"{p}{attn}/{n}/kernel"] for n in ("query", "key", "value"))  # (D, H, Dh)
        out[b + "attn.qkv.weight"] = torch.cat([x.flatten(1).T for x in (q, k, v)])
        if f"{p}{attn}/query/bias" in t:
            bias = [t[f"{p}{attn}/{n}/bias"].flatten() for n in ("query", "key", "value")]
            out[b + "attn.qkv.bias"] = torch.cat(bias)
        out_kernel = t[f"{p}{attn}/out/kernel"]  # (H, Dh, D)
        out[b + "attn.proj.weight"] = out_kernel.flatten(0, 1).T
        out[b + "attn.proj.bias"] = t[f"{p}{attn}/out/bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{b}mlp.{fc}.weight"] = t[f"{p}{mlp}/Dense_{j}/kernel"].T
            out[f"{b}mlp.{fc}.bias"] = t[f"{p}{mlp}/Dense_{j}/bias"]
    return {k: v.contiguous() for k, v in out.items()}


def vit_to_jax(state: StateDict, config: ViTConfig) -> dict[str, np.ndarray]:
    """Our layout -> vit_jax `.npz` names and shapes (the layout timm's npz loader reads)."""
    s = {k: v.detach().float().cpu() for k, v in state.items()}
    p, c, d = config.patch_size, config.in_chans, config.dim
    heads, dh = config.num_heads, config.dim // config.num_heads
    out = {
        "embedding/kernel": s["patch_embed.weight"].T.reshape(p, p, c, d),
        "embedding/bias": s["patch_embed.bias"],
        "Transformer/encoder_norm/scale": s["norm.weight"],
        "Transformer/encoder_norm/bias": s["norm.bias"],
    }
    if "cls_token" in s:
        out["cls"] = s["cls_token"]
    if "pos_embed" in s:
        out["Transformer/posembed_input/pos_embedding"] = s["pos_embed"]
    if "head.weight" in s:
        out["head/kernel"], out["head/bias"] = s["head.weight"].T, s["head.bias"]
    if "pre_logits.0.weight" in s:
        out["pre_logits/kernel"] = s["pre_logits.0.weight"].T
        out["pre_logits/bias"] = s["pre_logits.0.bias"]
    attn, ln1, ln2, mlp = (
        "MultiHeadDotProductAttention_1",
        "LayerNorm_0",
        "LayerNorm_2",
        "MlpBlock_3",
    )
    for i in range(config.depth):
        p_, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ours, theirs in (("norm1", ln1), ("norm2", ln2)):
            out[f"{p_}{theirs}/scale"] = s[b + ours + ".weight"]
            out[f"{p_}{theirs}/bias"] = s[b + ours + ".bias"]
        for n, w in zip(("query", "key", "value"), s[b + "attn.qkv.weight"].chunk(3), strict=True):
            out[f"{p_}{attn}/{n}/kernel"] = w.T.reshape(d, heads, dh)
        if b + "attn.qkv.bias" in s:
            for n, bias in zip(
                ("query", "key", "value"), s[b + "attn.qkv.bias"].chunk(3), strict=True
            ):
                out[f"{p_}{attn}/{n}/bias"] = bias.reshape(heads, dh)
        out[f"{p_}{attn}/out/kernel"] = s[b + "attn.proj.weight"].T.reshape(heads, dh, d)
        out[f"{p_}{attn}/out/bias"] = s[b + "attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{p_}{mlp}/Dense_{j}/kernel"] = s[f"{b}mlp.{fc}.weight"].T
            out[f"{p_}{mlp}/Dense_{j}/bias"] = s[f"{b}mlp.{fc}.bias"]
    return {k: v.contiguous().numpy() for k, v in out.items()}


def from_jax_npz(path: str | Path, **overrides: Any) -> ViT:
    """A vit_jax / big_vision `.npz` -> our ViT; heads are read off the query kernel."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = dict(npz)
    arrays = _unstack_scanned(arrays)
    attn = _jax_block_names(arrays)[0]
    kernel = arrays["embedding/kernel"]
    found = dict(
        patch_size=kernel.shape[0],
        in_chans=kernel.shape[2],
        num_heads=arrays[f"Transformer/encoderblock_0/{attn}/query/kernel"].shape[1],
    )
    return build_from_state(jax_to_vit(arrays), **{**found, **overrides})


def to_jax_npz(model: ViT, path: str | Path) -> Path:
    path = Path(path)
    np.savez(path, **vit_to_jax(model.state_dict(), model.config))
    return path
