"""The figure computations on cases with known answers."""

import torch

from vit import ViT, ViTConfig, resize_pos_embed
from vit.analysis import (
    attention_rollout,
    embedding_filters,
    mean_attention_distance,
    patch_distances,
    posemb_similarity,
)
from vit.model import sincos_2d_posemb


def test_sincos_posemb_is_most_similar_to_itself_and_decays_with_distance():
    grid = (6, 8)  # non-square on purpose
    pos = sincos_2d_posemb(grid, 64).reshape(1, -1, 64)
    sim = posemb_similarity(pos, grid, num_prefix_tokens=0)
    assert sim.shape == (6, 8, 6, 8)
    for i, j in [(0, 0), (2, 3), (5, 7)]:
        own = sim[i, j]
        assert own.argmax() == i * 8 + j and torch.isclose(own[i, j], torch.tensor(1.0))
    row = sim[2, 0, 2]  # the map of (2, 0) along its own row
    assert all(row[k] > row[k + 1] for k in range(4))


def test_posemb_similarity_of_resized_embeddings_keeps_the_structure():
    pos = torch.cat([torch.zeros(1, 1, 32), sincos_2d_posemb((4, 4), 32).reshape(1, 16, 32)], 1)
    big = resize_pos_embed(pos, (8, 8), (4, 4))
    sim = posemb_similarity(big, (8, 8))
    assert sim.shape == (8, 8, 8, 8)
    assert sim[0, 0, 0, 1] > sim[0, 0, 0, 7]  # near neighbours stay more alike than far ones


def test_local_attention_has_small_distance_and_uniform_attention_large():
    grid, patch = (4, 4), 16
    n = 16
    local = torch.eye(n + 1).expand(2, 3, n + 1, n + 1)  # each token attends to itself
    uniform = torch.full((2, 3, n + 1, n + 1), 1 / (n + 1))
    assert torch.allclose(mean_attention_distance(local, grid, patch), torch.zeros(3))
    far = mean_attention_distance(uniform, grid, patch)
    assert torch.allclose(far, patch_distances(grid, patch).mean().expand(3))
    assert (far > 20).all()  # mean distance of a 64-px square, in pixels


def test_filters_recover_the_dominant_direction_of_e():
    patch, channels = 4, 3
    pattern = torch.randn(patch * patch * channels)
    weight = torch.randn(64, 1) * pattern + 0.01 * torch.randn(64, patch * patch * channels)
    comps = embedding_filters(weight, patch, channels, k=5)
    assert comps.shape == (5, 4, 4, 3) and comps.min() >= 0 and comps.max() <= 1
    first = comps[0].flatten() - comps[0].mean()
    cosine = torch.nn.functional.cosine_similarity(first, pattern - pattern.mean(), dim=0)
    assert cosine.abs() > 0.99


def test_rollout_points_at_the_patch_the_class_token_reads():
    n, target = 16, 5
    attention = torch.eye(n + 1).repeat(1, 2, 1, 1)  # (1, heads, T, T)
    attention[0, :, 0] = 0
    attention[0, :, 0, 1 + target] = 1.0  # the class token reads patch 5 only
    maps = attention_rollout([attention, attention], (4, 4))
    assert maps.shape == (1, 4, 4)
    assert maps.flatten().argmax() == target and maps.max() == 1.0


def test_a_real_model_gives_one_distance_per_head_per_block():
    model = ViT(ViTConfig.from_preset("micro/4", num_classes=3)).eval()
    patches = torch.randint(0, 256, (2, 16, 48), dtype=torch.uint8)
    with torch.no_grad():
        attention = model.forward_intermediates(patches)["attention"]
    distances = [mean_attention_distance(a, (4, 4), 4) for a in attention]
    assert len(distances) == model.config.depth and distances[0].shape == (4,)
    assert all(((d >= 0) & (d <= 4 * 3 * 2**0.5)).all() for d in distances)
