"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al. 2021).

Read top to bottom: attention, MLP and block, then the model. Parameter names follow timm
(`patch_embed`, `cls_token`, `pos_embed`, `blocks.i.attn.qkv`, ...) so that users find what
they expect; `patch_embed` is the paper's single linear map E over flattened patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vit.config import ViTConfig
from vit.patches import patchify
from vit.resize import INTERPOLATION_PRESETS, resize_pos_embed


def make_norm(config: ViTConfig, dim: int | None = None) -> nn.Module:
    """The config's norm (LayerNorm, or AIMv2's RMSNorm) over `dim` (default: the width)."""
    kind = nn.RMSNorm if config.norm == "rmsnorm" else nn.LayerNorm
    return kind(dim or config.dim, eps=config.norm_eps)


def norm_or_identity(on: bool, config: ViTConfig, dim: int | None = None) -> nn.Module:
    return make_norm(config, dim) if on else nn.Identity()


class Attention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        head_dim = config.dim // config.num_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=config.qkv_bias)
        # qk_norm: each head's queries and keys layer-normalised (ViT-22B), else Identity
        self.q_norm = norm_or_identity(config.qk_norm, config, head_dim)
        self.k_norm = norm_or_identity(config.qk_norm, config, head_dim)
        self.norm = norm_or_identity(config.sub_norm, config)  # sub-LN: before the projection
        self.proj = nn.Linear(config.dim, config.dim, bias=config.proj_bias)
        self.attn_dropout = config.attn_dropout
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        weights = None
        if need_weights:  # the figures need the attention matrix; SDPA never materialises it
            weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
            y = F.dropout(weights, self.attn_dropout, self.training) @ v
        else:
            p = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        y = self.norm(y.transpose(1, 2).reshape(b, n, d))
        return self.proj_drop(self.proj(y)), weights


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU; its weights were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The MLP's nonlinearity: exact GELU (paper), its tanh approximation (SigLIP), or
    QuickGELU (OpenAI CLIP): weights only reproduce with the one they were trained with."""
    if name == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class MLP(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        # swiglu_packed: fc1 makes a value and a gate side by side, SiLU(value) * gate goes
        # on (DINOv2 giant, as timm's SwiGLUPacked and HF's Dinov2SwiGLUFFN compute it)
        self.gated = config.mlp == "swiglu_packed"
        hidden = config.mlp_dim // 2 if self.gated else config.mlp_dim
        self.fc1 = nn.Linear(config.dim, config.mlp_dim, bias=config.proj_bias)
        self.act = nn.SiLU() if self.gated else activation(config.act)
        self.norm = norm_or_identity(config.sub_norm, config, hidden)  # sub-LN: before fc2
        self.fc2 = nn.Linear(hidden, config.dim, bias=config.proj_bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.gated:
            value, gate = x.chunk(2, dim=-1)
            x = self.act(value) * gate
        else:
            x = self.act(x)
        return self.drop(self.fc2(self.norm(self.drop(x))))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch (Huang et al. 2016)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class LayerScale(nn.Module):
    """Per-channel gammas on a residual branch, initialised small (CaiT; DeiT III, DINOv2)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-LayerNorm transformer block (paper eq. 2-3)."""

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.drop_path = DropPath(drop_path)
        scaled = config.layer_scale is not None  # layer scale: each branch times its gammas
        self.ls1 = LayerScale(config.dim, config.layer_scale) if scaled else nn.Identity()
        self.ls2 = LayerScale(config.dim, config.layer_scale) if scaled else nn.Identity()

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, weights


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision's MAPHead; SigLIP): a learned query attends
    over the patch tokens, then a residual MLP. timm's `attn_pool` names, so weights load."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        d = config.dim
        self.num_heads = config.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, h, d // h).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        y = self.proj(y)
        return (y + self.mlp(self.norm(y)))[:, 0]


def sincos_2d_posemb(
    grid: tuple[int, int], dim: int, temperature: float = 10_000.0
) -> torch.Tensor:
    """(gh*gw, D) fixed 2-D sine-cosine embeddings (big_vision `posemb_sincos_2d`)."""
    if dim % 4:
        raise ValueError(f"sincos2d position embeddings need dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32),
        torch.arange(grid[1], dtype=torch.float32),
        indexing="ij",
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4 - 1))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Linear(c.patch_dim, c.dim, bias=c.patch_bias)  # E, per patch
        self.patch_norm = norm_or_identity(c.patch_norm, c)  # AIMv2: E's output normalised
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.class_token else None
        # distilled DeiT: a second token after the class token, read by its own head
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.dist_token else None
        # registers: learned tokens after those, dropped at the head ("ViTs Need Registers")
        self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, c.dim)) if c.reg_tokens else None
        num_tokens = c.posemb_prefix_tokens + c.num_patches
        if c.posemb == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, c.dim))
        else:
            self.register_buffer("pos_embed", self._sincos(c.grid_size), persistent=False)
        self.pos_drop = nn.Dropout(c.dropout)
        self.norm_pre = norm_or_identity(c.norm_pre, c)  # CLIP's ln_pre
        rates = torch.linspace(0, c.drop_path, c.depth).tolist()
        self.blocks = nn.ModuleList(Block(c, rate) for rate in rates)
        # the final norm: on every token, or (fc_norm) on the pooled one; none without it
        self.norm = norm_or_identity(c.final_norm and not c.fc_norm, c)
        self.fc_norm = norm_or_identity(c.final_norm and c.fc_norm, c)
        if c.pool == "map":
            self.attn_pool = MAPHead(c)
        if c.representation_size:
            self.pre_logits = nn.Sequential(nn.Linear(c.dim, c.representation_size), nn.Tanh())
        else:
            self.pre_logits = nn.Identity()
        head_dim = c.representation_size or c.dim
        self.head = nn.Linear(head_dim, c.num_classes) if c.num_classes else nn.Identity()
        if c.dist_token:
            self.head_dist = nn.Linear(c.dim, c.num_classes) if c.num_classes else nn.Identity()
        # uint8 patches are normalised here, on the device; `x * scale + shift` per value.
        patch_std = torch.tensor(c.std).repeat(c.patch_size * c.patch_size)
        patch_mean = torch.tensor(c.mean).repeat(c.patch_size * c.patch_size)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * patch_std), persistent=False)
        self.register_buffer("pixel_shift", -patch_mean / patch_std, persistent=False)
        self.grad_checkpointing = False  # activation checkpointing per block (timm's name)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:  # qkv_bias=False
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init)
        # the paper's JAX code: a patch-embedding conv with Flax's default lecun_normal init
        nn.init.trunc_normal_(self.patch_embed.weight, std=self.config.patch_dim**-0.5)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        if self.config.pool == "map":  # as timm's attention pool
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.config.dim**-0.5)
        for token in (self.dist_token, self.reg_token):  # as timm initialises them
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        for head in (self.head, getattr(self, "head_dist", None)):
            if isinstance(head, nn.Linear):  # paper, appendix B.1.1: zero-initialised head
                nn.init.zeros_(head.weight)

    def _sincos(self, grid: tuple[int, int]) -> torch.Tensor:
        pe = sincos_2d_posemb(grid, self.config.dim)
        prefix = torch.zeros(self.config.posemb_prefix_tokens, self.config.dim)
        return torch.cat([prefix, pe])[None]

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a patch grid, resized on the fly when it is not ours."""
        if grid == self.config.grid_size:
            return self.pos_embed
        if self.config.posemb == "sincos2d":
            return self._sincos(grid).to(self.pos_embed)
        return resize_pos_embed(
            self.pos_embed,
            grid,
            self.config.grid_size,
            self.config.posemb_prefix_tokens,
            **INTERPOLATION_PRESETS[self.config.posemb_interpolation],
        )

    def to_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, C, H, W) or patches (B, N, P*P*C) -> float patches and their grid."""
        p = self.config.patch_size
        if x.ndim == 4:  # float images, already normalised
            grid = (x.shape[2] // p, x.shape[3] // p)
            return patchify(x.permute(0, 2, 3, 1), p), grid
        if x.ndim != 3 or x.shape[2] != self.config.patch_dim:
            raise ValueError(
                f"expected images (B, C, H, W) or patches (B, N, {self.config.patch_dim}), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[1] != self.config.num_patches:
            raise ValueError(
                f"got {x.shape[1]} patches; this model's grid {self.config.grid_size} has "
                f"{self.config.num_patches} (pass images to run at another size)"
            )
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        return x, self.config.grid_size

    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches -> float patches normalised with the config's mean and std."""
        return torch.addcmul(self.pixel_shift, patches.float(), self.pixel_scale)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embeddings, after the prefix tokens."""
        patches, grid = self.to_patches(x)
        x = self.patch_norm(self.patch_embed(patches))  # (B, N, D)
        tokens = (self.cls_token, self.dist_token, self.reg_token)
        prefix = [t.expand(x.shape[0], -1, -1).to(x.dtype) for t in tokens if t is not None]
        if self.config.no_embed_class:  # the patches alone are embedded, then prefixed
            return self.pos_drop(torch.cat([*prefix, x + self.pos_embed_for(grid)], dim=1))
        return self.pos_drop(torch.cat([*prefix, x], dim=1) + self.pos_embed_for(grid))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded tokens (B, prefix + N, D), after the final norm."""
        x = self.norm_pre(self.embed(x))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():  # recomputed in backward
                x, _ = checkpoint(block, x, use_reentrant=False)
            else:
                x, _ = block(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Every block's output tokens and attention weights (B, heads, N, N), by name."""
        x = self.norm_pre(self.embed(x))
        tokens, attention = [], []
        for block in self.blocks:
            x, weights = block(x, need_weights=True)
            tokens.append(x)
            attention.append(weights)
        return {"tokens": tokens, "attention": attention, "features": [self.norm(x)]}

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.config.dist_token:  # the two tokens' heads, averaged (DeiT at inference)
            if pre_logits:
                return (x[:, 0] + x[:, 1]) / 2
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        prefix, pool = self.config.num_prefix_tokens, self.config.pool
        if pool == "cls":
            x = x[:, 0]
        elif pool == "gap":
            x = x[:, prefix:].mean(dim=1)
        else:
            x = self.attn_pool(x[:, prefix:])
        x = self.pre_logits(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_head(self, num_classes: int) -> None:
        """A new zero-initialised head, as the paper does for every fine-tuning task."""
        self.config = self.config.replace(num_classes=num_classes)
        head_dim = self.config.representation_size or self.config.dim
        device = self.pos_embed.device
        heads = ["head", "head_dist"] if self.config.dist_token else ["head"]
        for name in heads:
            dim = head_dim if name == "head" else self.config.dim
            head = nn.Linear(dim, num_classes, device=device) if num_classes else nn.Identity()
            if num_classes:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            setattr(self, name, head)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
