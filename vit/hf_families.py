"""The Hugging Face vision towers people fine-tune from today, as `save_pretrained` writes
them: DINOv2 (`Dinov2Model`), DINOv2 with registers, the CLIP and SigLIP image towers
(`CLIPVisionModel`, `SiglipVisionModel`) and distilled DeiT
(`DeiTForImageClassificationWithTeacher`). Each family is a rename table into our layout
(timm's names), the fix-ups its layout needs, and the ViTConfig fields its config.json
gives. A tower without a classifier converts with `num_classes=0`: the model's output is
then the tower's own pooled output (`pooler_output`), so a fine-tune adds the head.

Anything a table does not map stays under its own name and is named by the checked load:
a layout not covered here fails, it never loads partly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vit.checkpoint import load_state_dict_checked
from vit.config import ViTConfig, to_2tuple
from vit.interop import conv_to_linear, fuse_qkv, infer_config, rename
from vit.model import ViT

StateDict = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

# The encoder blocks of each layout, into our names; q, k and v are fused after renaming.
CLIP_BLOCKS = [
    ("blocks.{i}.norm1.{w}", "encoder.layers.{i}.layer_norm1.{w}"),
    ("blocks.{i}.attn.q.{w}", "encoder.layers.{i}.self_attn.q_proj.{w}"),
    ("blocks.{i}.attn.k.{w}", "encoder.layers.{i}.self_attn.k_proj.{w}"),
    ("blocks.{i}.attn.v.{w}", "encoder.layers.{i}.self_attn.v_proj.{w}"),
    ("blocks.{i}.attn.proj.{w}", "encoder.layers.{i}.self_attn.out_proj.{w}"),
    ("blocks.{i}.norm2.{w}", "encoder.layers.{i}.layer_norm2.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "encoder.layers.{i}.mlp.fc1.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "encoder.layers.{i}.mlp.fc2.{w}"),
]
DINOV2_NAMES = [
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("reg_token", "embeddings.register_tokens"),
    ("patch_embed.{w}", "embeddings.patch_embeddings.projection.{w}"),
    ("blocks.{i}.norm1.{w}", "encoder.layer.{i}.norm1.{w}"),
    ("blocks.{i}.attn.q.{w}", "encoder.layer.{i}.attention.attention.query.{w}"),
    ("blocks.{i}.attn.k.{w}", "encoder.layer.{i}.attention.attention.key.{w}"),
    ("blocks.{i}.attn.v.{w}", "encoder.layer.{i}.attention.attention.value.{w}"),
    ("blocks.{i}.attn.proj.{w}", "encoder.layer.{i}.attention.output.dense.{w}"),
    ("blocks.{i}.ls1.gamma", "encoder.layer.{i}.layer_scale1.lambda1"),
    ("blocks.{i}.ls2.gamma", "encoder.layer.{i}.layer_scale2.lambda1"),
    ("blocks.{i}.norm2.{w}", "encoder.layer.{i}.norm2.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "encoder.layer.{i}.mlp.fc1.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "encoder.layer.{i}.mlp.fc2.{w}"),
    # the giant's SwiGLU: gate and value packed in one projection, as timm's SwiGLUPacked
    ("blocks.{i}.mlp.fc1.{w}", "encoder.layer.{i}.mlp.weights_in.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "encoder.layer.{i}.mlp.weights_out.{w}"),
    ("norm.{w}", "layernorm.{w}"),
]
CLIP_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding.weight"),
    ("patch_embed.{w}", "embeddings.patch_embedding.{w}"),
    ("norm_pre.{w}", "pre_layrnorm.{w}"),  # sic: transformers' name
    *CLIP_BLOCKS,
    ("fc_norm.{w}", "post_layernorm.{w}"),  # CLIP normalises the pooled class token only
]
SIGLIP_NAMES = [
    ("pos_embed", "embeddings.position_embedding.weight"),
    ("patch_embed.{w}", "embeddings.patch_embedding.{w}"),
    *CLIP_BLOCKS,
    ("norm.{w}", "post_layernorm.{w}"),
    ("attn_pool.latent", "head.probe"),
    ("attn_pool.qkv.{w}", "head.attention.in_proj_{w}"),
    ("attn_pool.proj.{w}", "head.attention.out_proj.{w}"),
    ("attn_pool.norm.{w}", "head.layernorm.{w}"),
    ("attn_pool.mlp.fc1.{w}", "head.mlp.fc1.{w}"),
    ("attn_pool.mlp.fc2.{w}", "head.mlp.fc2.{w}"),
]
DEIT_NAMES = [
    ("cls_token", "deit.embeddings.cls_token"),
    ("dist_token", "deit.embeddings.distillation_token"),
    ("pos_embed", "deit.embeddings.position_embeddings"),
    ("patch_embed.{w}", "deit.embeddings.patch_embeddings.projection.{w}"),
    ("blocks.{i}.norm1.{w}", "deit.encoder.layer.{i}.layernorm_before.{w}"),
    ("blocks.{i}.attn.q.{w}", "deit.encoder.layer.{i}.attention.attention.query.{w}"),
    ("blocks.{i}.attn.k.{w}", "deit.encoder.layer.{i}.attention.attention.key.{w}"),
    ("blocks.{i}.attn.v.{w}", "deit.encoder.layer.{i}.attention.attention.value.{w}"),
    ("blocks.{i}.attn.proj.{w}", "deit.encoder.layer.{i}.attention.output.dense.{w}"),
    ("blocks.{i}.norm2.{w}", "deit.encoder.layer.{i}.layernorm_after.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "deit.encoder.layer.{i}.intermediate.dense.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "deit.encoder.layer.{i}.output.dense.{w}"),
    ("norm.{w}", "deit.layernorm.{w}"),
    ("head.{w}", "cls_classifier.{w}"),
    ("head_dist.{w}", "distillation_classifier.{w}"),
]

ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def activation(hidden_act: str) -> str:
    """ViTConfig's name for a transformers `hidden_act`; ValueError for one vitray lacks."""
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {hidden_act!r}: vitray has {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[hidden_act]


def dinov2_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Layer scale's init; the giant's SwiGLU MLP (its width comes from the weights)."""
    mlp = "swiglu_packed" if cfg.get("use_swiglu_ffn") else "mlp"
    return {"layer_scale": cfg.get("layerscale_value", 1.0), "mlp": mlp}


def fold_class_posemb(state: StateDict) -> StateDict:
    """DINOv2 with registers: the class token has a position embedding, the registers none.
    A constant added to a constant token is one token: folded in, and the embeddings left
    are the patches' alone (timm's `no_embed_class` layout, which resizes the same way)."""
    state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    state["pos_embed"] = state["pos_embed"][:, 1:]
    return state


def clip_layout(state: StateDict) -> StateDict:
    state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
    state["pos_embed"] = state["pos_embed"][None]
    return state


def siglip_layout(state: StateDict) -> StateDict:
    """Position embeddings to (1, N, D); the pooling head's fused in-projection split into
    the query's and the keys' and values' (as timm converts SigLIP)."""
    state["pos_embed"] = state["pos_embed"][None]
    dim = state["attn_pool.latent"].shape[-1]
    for w in ("weight", "bias"):
        fused = state.pop(f"attn_pool.qkv.{w}")
        state[f"attn_pool.q.{w}"], state[f"attn_pool.kv.{w}"] = fused[:dim], fused[dim:]
    return state


def siglip_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("vision_use_head") is False:
        raise ValueError("a SigLIP tower without its attention-pool head (vision_use_head false)")
    return {}


HF_RESIZE = {"posemb_interpolation": "hf"}


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]  # the transformers classes whose files this reads
    names: list[tuple[str, str]]
    fields: dict[str, Any]  # ViTConfig fields every model of the family has
    more_fields: Callable[[dict[str, Any]], dict[str, Any]] = lambda cfg: {}
    layout: Callable[[StateDict], StateDict] = lambda state: state
    dropped: tuple[str, ...] = ()  # training-only tensors (DINOv2's mask token)
    # the config class's defaults, for a config.json that leaves them out
    defaults: dict[str, Any] = field(
        default_factory=lambda: {"hidden_act": "gelu", "layer_norm_eps": 1e-12}
    )


FAMILIES = {
    "dinov2": Family(
        ("Dinov2Model",),
        DINOV2_NAMES,
        # HF resizes position embeddings bicubic without antialiasing, as here: all but
        # DINOv2 with registers on request (interpolate_pos_encoding), DINOv2 always
        HF_RESIZE,
        dinov2_fields,
        dropped=("embeddings.mask_token",),
        defaults={"hidden_act": "gelu", "layer_norm_eps": 1e-6},
    ),
    "dinov2_with_registers": Family(
        ("Dinov2WithRegistersModel",),
        DINOV2_NAMES,
        {"no_embed_class": True},  # and resized as timm does: bicubic, antialiased
        dinov2_fields,
        fold_class_posemb,
        dropped=("embeddings.mask_token",),
        defaults={"hidden_act": "gelu", "layer_norm_eps": 1e-6},
    ),
    "clip_vision_model": Family(
        ("CLIPVisionModel",),
        CLIP_NAMES,
        {"norm_pre": True, "patch_bias": False, "fc_norm": True, "pool": "cls", **HF_RESIZE},
        layout=clip_layout,
        defaults={"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    ),
    "siglip_vision_model": Family(
        ("SiglipVisionModel",),
        SIGLIP_NAMES,
        {"class_token": False, "pool": "map", **HF_RESIZE},
        siglip_fields,
        siglip_layout,
        defaults={"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    ),
    # Every `deit` model keeps the distillation token (Hugging Face stores non-distilled DeiT
    # as `vit`); only the one with the teacher's head reads it as DeiT and timm do.
    "deit": Family(
        ("DeiTForImageClassificationWithTeacher",), DEIT_NAMES, {"dist_token": True, **HF_RESIZE}
    ),
}


def family_of(cfg: dict[str, Any]) -> Family | None:
    """The family of a transformers config.json; None for the plain ViT (interop.from_hf).
    ValueError for a family's model class this does not read (a classifier on DINOv2, a
    whole CLIP model), naming the one to save instead."""
    family = FAMILIES.get(cfg.get("model_type", ""))
    if family is None:
        return None
    saved = cfg.get("architectures") or []
    if saved and not set(saved) <= set(family.architectures):
        raise ValueError(
            f"{', '.join(saved)} weights: vitray reads the {cfg['model_type']} family as "
            f"{' or '.join(family.architectures)}; save that model instead"
        )
    return family


def from_hf_family(state: StateDict, cfg: dict[str, Any], family: Family, **overrides: Any) -> ViT:
    """Saved weights of `family` and their config.json -> our ViT, checked to load whole."""
    cfg = {**family.defaults, **cfg}
    more = family.more_fields(cfg)  # first: a refusal there says more than a missing key
    state = {k: v for k, v in state.items() if k not in family.dropped}
    state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    ours = fuse_qkv(family.layout(rename(state, family.names, reverse=True)))
    ours["patch_embed.weight"] = conv_to_linear(ours["patch_embed.weight"])
    fields = {
        "in_chans": cfg.get("num_channels", 3),
        "num_heads": cfg["num_attention_heads"],
        "norm_eps": cfg["layer_norm_eps"],
        "act": activation(cfg["hidden_act"]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in ours,
        "num_classes": ours["head.weight"].shape[0] if "head.weight" in ours else 0,
        **family.fields,
        **more,
    }
    if "image_size" in cfg and "patch_size" in cfg:  # the grid its position embeddings have
        p = cfg["patch_size"]
        fields["image_size"] = tuple(side // p * p for side in to_2tuple(cfg["image_size"]))
    config: ViTConfig = infer_config(ours, **{**fields, **overrides})
    size = cfg.get("image_size")
    if size is not None and to_2tuple(size) != config.image_size:  # SigLIP so400m/14 at 384
        size, ours_hw = "x".join(map(str, to_2tuple(size))), "x".join(map(str, config.image_size))
        log.warning(
            "image_size %s is not a multiple of patch %s: Hugging Face resizes to %s and its "
            "convolution leaves the rest out; vitray resizes to %s, so answers may differ "
            "slightly from the source's",
            size, config.patch_size, size, ours_hw,
        )  # fmt: skip
    model = ViT(config)
    load_state_dict_checked(model, ours)
    return model.eval()
