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
    if cfg.get("global_pool") is not None:  # older timm recorded the pooling only here
        args.setdefault("global_pool", cfg["global_pool"])
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, **args)
    except Exception as e:  # an unknown name, arguments of another timm version
        raise ValueError(f"timm cannot build {arch} with {cfg.get('model_args', {})}: {e}") from e
    return vit_fields(arch, model)


def vit_fields(arch: str, model: nn.Module) -> dict[str, Any]:
    """The fields of a timm VisionTransformer that vitray's ViT reproduces exactly."""
    from timm.layers import PatchEmbed
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
        "pooling over the prefix tokens too (pool_include_prefix)": model.pool_include_prefix,
        f"{type(block).__name__} blocks (not timm's Block)": type(block) is not Block,
    }
    missing += [what for what, found in checks.items() if found]
    kinds = {norm_kind(n) for n in norms_of(model)}
    if len(kinds) != 1 or None in kinds:
        names = sorted({type(n).__name__ for n in norms_of(model)})
        missing.append(f"norms of kinds {names} (vitray's are all LayerNorm or all RMSNorm)")
    if type(block) is Block:
        attn, mlp = block.attn, block.mlp
        act = getattr(mlp, "act", None)
        gated = mlp_kind(mlp) == "swiglu_packed"
        checks = {
            f"{type(attn).__name__} attention": type(attn) is not Attention,
            f"{type(mlp).__name__} MLP (not timm's Mlp, SwiGLU or SwiGLUPacked)": mlp_kind(mlp)
            is None,
            f"activation {act!r} (vitray has GELU, its tanh form and QuickGELU)": not gated
            and activation_of(act) is None,
            "biases on attention's output projection but not the MLP's, or the reverse": (
                biased(attn, "proj") != biased(mlp, "fc2")
            ),
        }
        checks["a norm after attention or inside the MLP, not both (sub-LN)"] = (
            sub_norms(block) is None
        )
        missing += [what for what, found in checks.items() if found]
    if model.global_pool == "map":
        missing += map_head_differences(model.attn_pool)
        if model.attn_pool.mlp is not None and mlp_kind(model.attn_pool.mlp) != mlp_kind(block.mlp):
            missing.append(  # vitray's MAP head uses the blocks' MLP
                f"an attention pool whose MLP ({type(model.attn_pool.mlp).__name__}) is not "
                f"the blocks' ({type(block.mlp).__name__})"
            )
        if model.attn_pool.num_heads != block.attn.num_heads:
            missing.append("an attention pool with other heads than the blocks'")
    fc_norm = not isinstance(model.fc_norm, nn.Identity)
    if fc_norm and not isinstance(model.norm, nn.Identity):
        missing.append("a final norm both before and after pooling")
    if missing:
        return refuse(arch, missing)
    return {
        "num_heads": block.attn.num_heads,
        "qkv_bias": block.attn.qkv.bias is not None,
        "class_token": model.cls_token is not None,
        "pool": {"token": "cls", "avg": "gap", "map": "map"}[model.global_pool],
        "fc_norm": fc_norm,
        "norm_eps": block.norm1.eps,
        "norm": norm_kind(block.norm1),
        "layer_scale": block.ls1.init_values if not isinstance(block.ls1, nn.Identity) else None,
        "reg_tokens": model.num_reg_tokens,
        "no_embed_class": model.no_embed_class,
        "norm_pre": not isinstance(model.norm_pre, nn.Identity),
        "act": "gelu" if mlp_kind(block.mlp) == "swiglu_packed" else activation_of(block.mlp.act),
        "mlp": mlp_kind(block.mlp),
        "final_norm": fc_norm or not isinstance(model.norm, nn.Identity),
        "patch_norm": not isinstance(model.patch_embed.norm, nn.Identity),
        "patch_bias": model.patch_embed.proj.bias is not None,
        "proj_bias": block.attn.proj.bias is not None,
        "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
        "sub_norm": sub_norms(block),
        "dist_token": type(model) is VisionTransformerDistilled,
    }


def sub_norms(block: nn.Module) -> bool | None:
    """BEiT-3's sub-LN (a norm after attention and one inside the MLP): True, False, or
    None for one of the two alone."""
    inside = [getattr(block.attn, "norm", None), getattr(block.mlp, "norm", None)]
    found = {n is not None and not isinstance(n, nn.Identity) for n in inside}
    return found.pop() if len(found) == 1 else None


def biased(module: nn.Module, linear: str) -> bool | None:
    """Whether `module.<linear>` has a bias (None: no such layer)."""
    layer = getattr(module, linear, None)
    return None if layer is None else layer.bias is not None


def norms_of(model: nn.Module) -> list[nn.Module]:
    """Every norm a timm ViT uses (those it has), which vitray builds of one kind."""
    block = model.blocks[0]
    attn = getattr(block, "attn", None)
    found = [getattr(block, "norm1", None), getattr(block, "norm2", None), model.norm]
    found += [model.fc_norm, model.norm_pre, model.patch_embed.norm]
    found += [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
    return [n for n in found if n is not None and not isinstance(n, nn.Identity)]


def norm_kind(norm: nn.Module) -> str | None:
    """ViTConfig's name for a timm norm module; None for one vitray lacks."""
    from timm.layers import LayerNorm, RmsNorm

    kinds = {nn.LayerNorm: "layernorm", LayerNorm: "layernorm", RmsNorm: "rmsnorm"}
    return kinds.get(type(norm))


def mlp_kind(mlp: nn.Module) -> str | None:
    """ViTConfig's `mlp` for a timm MLP: the paper's, or a SwiGLU (timm's SwiGLU, whose two
    projections the converter stacks, or SwiGLUPacked); None for one vitray lacks."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is Mlp:
        return "mlp"
    if type(mlp) is GluMlp and not mlp.gate_last and type(mlp.act) is nn.SiLU:
        return "swiglu_packed"
    if type(mlp) is SwiGLU and type(mlp.act) is nn.SiLU:
        return "swiglu_packed"
    return None


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
