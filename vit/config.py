"""ViTConfig, the table of paper variants (big_vision's `decode_variant`, as data), and the
Preprocessing that imported weights declare."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# Widths, depths, heads and MLP sizes: ViT paper Table 1 (B, L, H); Ti and S from
# DeiT / "How to train your ViT" (Steiner et al. 2021). `micro` is ours: the CPU demo model
# (its digits results: docs/design.md#model-presets-and-the-digits-recipe).
VARIANTS: dict[str, dict[str, Any]] = {
    "micro": dict(dim=64, depth=4, num_heads=4, mlp_ratio=2.0, image_size=16),
    "ti": dict(dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "s": dict(dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "m": dict(dim=512, depth=12, num_heads=8, mlp_ratio=4.0),
    "b": dict(dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "l": dict(dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "h": dict(dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
    "g": dict(dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
}
HEADS_BY_WIDTH = {v["dim"]: v["num_heads"] for v in VARIANTS.values()}

Size = int | tuple[int, int]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # PIL's filters
CROP_MODES = ("center", "squash")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
POSEMB_INTERPOLATIONS = ("timm", "hf", "big_vision", "torchvision")  # vit.resize's presets


def to_2tuple(size: Size) -> tuple[int, int]:
    """`224` -> (224, 224); `(h, w)` and `[h, w]` -> (h, w)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


@dataclass
class ViTConfig:
    image_size: Size = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # 'cls' (paper) | 'gap' (global average pooling of the patch tokens) | 'map' (attention
    # pooling by a learned query: big_vision's MAPHead, SigLIP)
    pool: str = "cls"
    posemb: str = "learn"  # 'learn' (paper) | 'sincos2d' (fixed, as in later big_vision work)
    class_token: bool = True
    fc_norm: bool = False  # timm's 'avg' models pool first and normalise after
    representation_size: int | None = None  # the paper's pre-logits layer (Linear + tanh)
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # paper/big_vision: pixels scaled to [-1, 1]
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # Options of the later ViTs timm's VisionTransformer covers, off by default: the paper's
    # ViT stays as it is. Each is explained in vit/model.py where it is used.
    layer_scale: float | None = None  # LayerScale's initial gamma (DeiT III, DINOv2)
    reg_tokens: int = 0  # register tokens (DINOv2 with registers)
    no_embed_class: bool = False  # position embeddings for the patches only (DeiT III, DINOv2)
    norm_pre: bool = False  # a LayerNorm before the blocks (CLIP)
    act: str = "gelu"  # 'gelu' (exact) | 'gelu_tanh' (SigLIP) | 'quick_gelu' (OpenAI CLIP)
    patch_bias: bool = True  # False: a patch embedding without bias (CLIP)
    qk_norm: bool = False  # a LayerNorm on each head's queries and keys
    dist_token: bool = False  # DeiT's distillation token and its own head (distilled DeiT)
    final_norm: bool = True  # False: no norm after the blocks (RADIO, InternViT)
    norm: str = "layernorm"  # every norm's kind: 'layernorm' (paper) | 'rmsnorm' (AIMv2)
    patch_norm: bool = False  # a norm on the patch embeddings (AIMv2)
    proj_bias: bool = True  # False: attention's output projection and the MLP without bias
    sub_norm: bool = False  # a norm inside each branch, before its output projection (BEiT-3)
    # 'mlp' (paper) | 'swiglu_packed' (SiLU(a) * b with a and b from one fc1: DINOv2 giant;
    # AIMv2's two projections are stacked into it)
    mlp: str = "mlp"
    # how the weights' own source resizes the position embeddings at another size (the
    # presets of vit.resize): a model run at a new size answers as its source would
    posemb_interpolation: str = "timm"

    def __post_init__(self) -> None:
        self.image_size = to_2tuple(self.image_size)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_size {h}x{w} is not a multiple of patch_size {self.patch_size}"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.pool not in ("cls", "gap", "map"):
            raise ValueError(f"pool must be 'cls', 'gap' or 'map', got {self.pool!r}")
        if self.posemb not in ("learn", "sincos2d"):
            raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per input channel)")
        if self.posemb_interpolation not in POSEMB_INTERPOLATIONS:
            raise ValueError(
                f"posemb_interpolation must be one of {POSEMB_INTERPOLATIONS}, "
                f"got {self.posemb_interpolation!r}"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("mlp", "swiglu_packed"):
            raise ValueError(f"mlp must be 'mlp' or 'swiglu_packed', got {self.mlp!r}")
        if self.mlp == "swiglu_packed" and self.mlp_dim % 2:
            raise ValueError(f"swiglu_packed needs an even MLP width, got {self.mlp_dim}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {self.reg_tokens}")
        if self.dist_token and (self.pool != "cls" or self.reg_tokens):
            raise ValueError("dist_token needs pool='cls' and no register tokens (DeiT's layout)")

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, registers, in that order."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def posemb_prefix_tokens(self) -> int:
        """Prefix tokens that have a position embedding: none under `no_embed_class`."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        return cls(**known_fields(cls, d, "ViTConfig"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ViTConfig:
        """`"s/16"` -> ViT-S with 16x16 patches; keyword overrides win (image_size=384, ...)."""
        variant, _, patch = name.lower().partition("/")
        if variant not in VARIANTS or not patch.isdigit():
            raise ValueError(f"unknown preset {name!r}; expected one of {preset_names()}")
        return cls(**{**VARIANTS[variant], "patch_size": int(patch), **overrides})


@dataclass(frozen=True)
class Preprocessing:
    """How the weights' source resized and cropped images for evaluation: the data side of
    its preprocessing, which the model cannot do itself (it normalises by ViTConfig's mean and
    std). Imports keep it in config.json, so a fine-tune can feed images as the weights saw them.
    """

    interpolation: str  # the resize filter, by PIL's names
    crop_fraction: float  # the evaluation crop's share of the resized image (timm's crop_pct)
    # 'center': the shorter side is resized, the aspect ratio kept (timm, torchvision);
    # 'squash': both sides are resized to the size / crop_fraction (Hugging Face's processors)
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction {self.crop_fraction} is not in (0, 1]")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not one of {CROP_MODES}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**known_fields(cls, d, "preprocessing"))


# How vitray evaluates a checkpoint that declares no preprocessing (DataConfig's defaults):
# what its exports declare for one.
DEFAULT_EVAL = Preprocessing("bilinear", 0.875, "center")


def known_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """`d` if every key is a field of the dataclass `cls`: a config.json written by another
    version, or by hand, fails by name instead of deep inside the constructor."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}")
    return d


def preset_names() -> list[str]:
    """The named presets: the paper's models plus the small CPU demo model."""
    return ["micro/4", "ti/16", "s/16", "s/32", "b/16", "b/32", "l/16", "l/32", "h/14"]
