import pytest
import timm.layers
import torch
import torch.nn.functional as F

from vit import resample_patch_embed, resize_pos_embed
from vit.resize import INTERPOLATION_PRESETS


@pytest.mark.parametrize("old,new", [((14, 14), (24, 24)), ((4, 4), (8, 8)), ((6, 4), (9, 12))])
def test_timm_mode_matches_timm(old, new):
    pe = torch.randn(1, 1 + old[0] * old[1], 32)
    ours = resize_pos_embed(pe, new, old_grid=old)
    theirs = timm.layers.resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=1)
    assert ours.shape == (1, 1 + new[0] * new[1], 32)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[:, :1], pe[:, :1], atol=0, rtol=0)  # class token untouched


def test_hf_mode_matches_transformers_interpolation():
    from transformers import ViTConfig as HFConfig
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    hf_cfg = HFConfig(hidden_size=32, image_size=64, patch_size=16, num_channels=3)
    emb = ViTEmbeddings(hf_cfg)
    torch.nn.init.normal_(emb.position_embeddings)
    pe = emb.position_embeddings.detach()
    tokens = torch.zeros(1, 1 + 8 * 8, 32)  # the embeddings for a 128x128 input
    theirs = emb.interpolate_pos_encoding(tokens, 128, 128).detach()
    ours = resize_pos_embed(pe, (8, 8), **INTERPOLATION_PRESETS["hf"])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_big_vision_mode_is_bilinear_align_corners():
    pe = torch.randn(1, 16, 8)
    ours = resize_pos_embed(pe, (7, 7), num_prefix_tokens=0, **INTERPOLATION_PRESETS["big_vision"])
    grid = pe.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(7, 7), mode="bilinear", align_corners=True)
    torch.testing.assert_close(ours, ref.permute(0, 2, 3, 1).reshape(1, 49, 8))
    # align_corners keeps the corner embeddings exactly
    torch.testing.assert_close(ours[0, 0], pe[0, 0])


def test_identity_resize_returns_input_exactly():
    pe = torch.randn(1, 17, 8, dtype=torch.bfloat16)
    assert resize_pos_embed(pe, (4, 4)) is pe


def test_dtype_kept_and_bad_grids_named():
    pe = torch.randn(1, 17, 8, dtype=torch.bfloat16)
    assert resize_pos_embed(pe, (6, 6)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 1 + 12, 8), (6, 6))
    with pytest.raises(ValueError, match="does not hold"):
        resize_pos_embed(torch.randn(1, 1 + 12, 8), (6, 6), old_grid=(3, 3))


def test_pi_resize_keeps_tokens_when_upsampling_patches():
    dim, old, new, c = 6, 4, 8, 3
    weight = torch.randn(dim, old * old * c, dtype=torch.float64)
    new_weight = resample_patch_embed(weight, new, in_chans=c)
    assert new_weight.shape == (dim, new * new * c)
    patches = torch.randn(5, old, old, c, dtype=torch.float64)
    upsampled = F.interpolate(
        patches.permute(0, 3, 1, 2), size=(new, new), mode="bilinear", antialias=True
    ).permute(0, 2, 3, 1)
    tokens_old = patches.reshape(5, -1) @ weight.T
    tokens_new = upsampled.reshape(5, -1) @ new_weight.T
    torch.testing.assert_close(tokens_new, tokens_old, atol=1e-8, rtol=1e-6)
