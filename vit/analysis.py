"""What a trained ViT has learned, as arrays (the paper's Figures 6 and 7); plotting lives in
jobs/tracking/plots.py. Every function takes tensors from a `ViT` and returns plain tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_filters(weight: torch.Tensor, patch: int, channels: int, k: int = 28) -> torch.Tensor:
    """The top-k principal components of the patch embedding E (Figure 7, left).

    `weight` is our linear E, (D, P*P*C) over HWC-flattened patches; each component is a
    (P, P, C) pattern in pixel space, scaled to [0, 1] for display.
    """
    w = weight.detach().float()
    w = w - w.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(w, full_matrices=False)  # rows of v: directions in pixel space
    comps = v[: min(k, v.shape[0])].reshape(-1, patch, patch, channels)
    lo = comps.amin(dim=(1, 2, 3), keepdim=True)
    hi = comps.amax(dim=(1, 2, 3), keepdim=True)
    return (comps - lo) / (hi - lo).clamp_min(1e-12)


def posemb_similarity(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Cosine similarity of each position's embedding with every other's (Figure 7, centre):
    (gh, gw, gh, gw); [i, j] is the map for the patch at row i, column j."""
    gh, gw = grid
    emb = pos_embed.detach().float().reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:]
    if emb.shape[0] != gh * gw:
        raise ValueError(f"{emb.shape[0]} position embeddings do not fill a {gh}x{gw} grid")
    emb = F.normalize(emb, dim=-1)
    return (emb @ emb.T).reshape(gh, gw, gh, gw)


def patch_distances(grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Pixel distance between the centres of every pair of patches, (N, N)."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch
    return torch.cdist(centres, centres)


def mean_attention_distance(
    attention: torch.Tensor, grid: tuple[int, int], patch: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Per head, the attention-weighted pixel distance between query and key patches,
    averaged over queries and images (Figure 7, right): (heads,).

    `attention` is one block's weights (B, heads, T, T). Prefix tokens have no position,
    so they are dropped and each query's weights over the patches renormalised."""
    p = num_prefix_tokens
    weights = attention.detach().float()[:, :, p:, p:]
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    distances = patch_distances(grid, patch).to(weights.device)
    return (weights * distances).sum(dim=-1).mean(dim=(0, 2))


def attention_rollout(
    attentions: list[torch.Tensor], grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020; the paper's Figure 6): attention averaged
    over heads, the residual added as 0.5 A + 0.5 I, multiplied through the layers. Returns
    (B, gh, gw): how much the class token (or, without one, the mean token) draws on each
    patch, scaled to a maximum of 1 per image."""
    rollout = None
    for attention in attentions:
        a = attention.detach().float().mean(dim=1)  # (B, T, T)
        eye = torch.eye(a.shape[-1], device=a.device)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    p = num_prefix_tokens
    source = rollout[:, 0, p:] if p else rollout.mean(dim=1)
    maps = source.reshape(-1, *grid)
    return maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
