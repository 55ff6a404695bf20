"""What a timm ViT's weights do not say, read from timm's own model of the architecture
named in its config.json: attention heads, pooling, final norm, norm eps, qkv bias, the
activation and the options of later ViTs (layer scale, registers, no_embed_class, norm_pre,
qk_norm, a distillation token). Shapes alone cannot give them (a fused qkv is (3D, D) for
any number of heads: a guess converted vit_base_patch16_gap_224, 16 heads, into a different
function), nor what vitray's ViT does not have (an attention-pool head, SwiGLU, parallel
blocks, ...). A conversion that cannot be exact is refused, naming why.

timm builds the model on the meta device (no memory, no weights) and is imported only here,
when a timm checkpoint names its architecture; `vit/` stays usable with torch alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def timm_architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """ViTConfig fields of the architecture a timm config.json names ({} when it names
    none); ValueError naming what vitray's ViT cannot be."""
    arch = cfg.get("architecture")
    if not arch:
        return {}
    try:
        import timm
    except ImportError as e:
        raise ValueError(
            f"{arch}: its weights do not say its attention heads, pooling or options, and "
            "timm, which knows them, is not installed: pip install timm"
        ) from e
    args = {**cfg.get("model_args", {}), "pretrained": False}
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, **args)
    except Exception as e:  # an unknown name, arguments of another timm version
        raise ValueError(f"timm cannot build {arch} with {cfg.get('model_args', {})}: {e}") from e
    return vit_fields(arch, model)


def vit_fields(arch: str, model: nn.Module) -> dict[str, Any]:
    """The fields of a timm VisionTransformer that vitray's ViT reproduces exactly."""
    from timm.layers import Mlp, PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    missing: list[str] = []
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        missing.append(f"{type(model).__name__} (not the plain VisionTransformer)")
        return refuse(arch, missing)
    if type(model.patch_embed) is not PatchEmbed:  # a CNN stem (the hybrid R50+ViT models)
        return refuse(arch, [f"a {type(model.patch_embed).__name__} patch embedding"])
    block = model.blocks[0]
    checks = {
        "no position embedding": model.pos_embed is None,
        f"global_pool {model.global_pool!r} (vitray pools by token, avg or map)": model.global_pool
        not in ("token", "avg", "map"),
        "a norm in the patch embedding": not isinstance(model.patch_embed.norm, nn.Identity),
        "pooling over the prefix tokens too (pool_include_prefix)": model.pool_include_prefix,
        f"{type(block).__name__} blocks (not timm's Block)": type(block) is not Block,
    }
    missing += [what for what, found in checks.items() if found]
    if type(block) is Block:
        attn, mlp = block.attn, block.mlp
        act = getattr(mlp, "act", None)
        packed = swiglu_packed(mlp)
        checks = {
            f"{type(attn).__name__} attention": type(attn) is not Attention,
            f"{type(mlp).__name__} MLP (not timm's Mlp or SwiGLUPacked)": type(mlp) is not Mlp
            and not packed,
            f"activation {act!r} (vitray has GELU, its tanh form and QuickGELU)": not packed
            and activation_of(act) is None,
        }
        if type(attn) is Attention:
            checks["a norm after attention (scale_attn_norm)"] = not isinstance(
                attn.norm, nn.Identity
            )
        if type(mlp) is Mlp or packed:
            checks["a norm inside the MLP (scale_mlp_norm)"] = not isinstance(mlp.norm, nn.Identity)
        missing += [what for what, found in checks.items() if found]
    if model.global_pool == "map":
        missing += map_head_differences(model.attn_pool)
        if model.attn_pool.num_heads != block.attn.num_heads:
            missing.append("an attention pool with other heads than the blocks'")
    fc_norm = isinstance(model.fc_norm, nn.LayerNorm)
    if fc_norm and isinstance(model.norm, nn.LayerNorm):
        missing.append("a final norm both before and after pooling")
    final_norm = fc_norm or isinstance(model.norm, nn.LayerNorm)
    for name in ("norm", "fc_norm"):
        found = getattr(model, name)
        if not isinstance(found, (nn.LayerNorm, nn.Identity)):
            missing.append(f"a final {type(found).__name__} (vitray's is LayerNorm)")
    if missing:
        return refuse(arch, missing)
    return {
        "num_heads": block.attn.num_heads,
        "qkv_bias": block.attn.qkv.bias is not None,
        "class_token": model.cls_token is not None,
        "pool": {"token": "cls", "avg": "gap", "map": "map"}[model.global_pool],
        "fc_norm": fc_norm,
        "norm_eps": block.norm1.eps,
        "layer_scale": block.ls1.init_values if not isinstance(block.ls1, nn.Identity) else None,
        "reg_tokens": model.num_reg_tokens,
        "no_embed_class": model.no_embed_class,
        "norm_pre": not isinstance(model.norm_pre, nn.Identity),
        "act": "gelu" if swiglu_packed(block.mlp) else activation_of(block.mlp.act),
        "mlp": "swiglu_packed" if swiglu_packed(block.mlp) else "mlp",
        "final_norm": final_norm,
        "patch_bias": model.patch_embed.proj.bias is not None,
        "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
        "dist_token": type(model) is VisionTransformerDistilled,
    }


def swiglu_packed(mlp: nn.Module) -> bool:
    """timm's SwiGLUPacked (DINOv2 giant): a GluMlp gating SiLU(first half) * second half."""
    from timm.layers import GluMlp

    return type(mlp) is GluMlp and not mlp.gate_last and type(mlp.act) is nn.SiLU


def activation_of(act: nn.Module | None) -> str | None:
    """ViTConfig's name for a timm activation module; None for one vitray lacks."""
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return {GELU: "gelu", GELUTanh: "gelu_tanh", QuickGELU: "quick_gelu"}.get(type(act))


def map_head_differences(pool: nn.Module) -> list[str]:
    """What a timm attention pool has that vitray's MAPHead (big_vision's) does not."""
    checks = {
        "an attention pool with several latent queries": pool.latent_len != 1,
        "an attention pool with its own position embedding": pool.pos_embed is not None,
        "an attention pool without a query projection": isinstance(pool.q, nn.Identity),
        "an attention pool with qk_norm": not isinstance(pool.q_norm, nn.Identity),
        "an attention pool without its MLP": pool.mlp is None,
        f"an attention pool that pools its queries by {pool.pool!r}": pool.pool != "token",
    }
    return [what for what, found in checks.items() if found]


def refuse(arch: str, missing: list[str]) -> dict[str, Any]:
    raise ValueError(
        f"{arch} cannot be converted exactly; vitray's ViT does not have: {'; '.join(missing)}"
    )
