import pytest
import torch

from vit import ViT, ViTConfig, patchify, preset_names

from helpers import VIT_FAMILIES


def tiny(**kw) -> ViTConfig:
    base = dict(image_size=32, patch_size=8, dim=32, depth=2, num_heads=4, num_classes=5)
    return ViTConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "pool,posemb,class_token",
    [
        ("cls", "learn", True),
        ("gap", "learn", True),
        ("gap", "learn", False),
        ("cls", "sincos2d", True),
        ("gap", "sincos2d", False),
    ],
)
@pytest.mark.parametrize("image_size", [32, (16, 40)])
def test_shapes_for_every_pooling_and_posemb(pool, posemb, class_token, image_size):
    cfg = tiny(pool=pool, posemb=posemb, class_token=class_token, image_size=image_size)
    model = ViT(cfg)
    h, w = cfg.image_size
    x = torch.randn(2, 3, h, w)
    assert model(x).shape == (2, 5)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, cfg.num_prefix_tokens + cfg.num_patches, 32)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_runs_forward_and_backward_at_tiny_size(name):
    # Full widths, two blocks, the smallest image the patch size allows: fast on a CPU.
    cfg = ViTConfig.from_preset(name, depth=2, num_classes=3)
    cfg = cfg.replace(image_size=2 * cfg.patch_size)
    model = ViT(cfg)
    out = model(torch.randn(2, 3, *cfg.image_size))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert model.patch_embed.weight.grad is not None


def test_uint8_patches_are_normalised_inside_like_float_images():
    cfg = tiny(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    model = ViT(cfg).eval()
    torch.nn.init.normal_(model.head.weight)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    images = ((pixels.float() / 255 - mean) / std).permute(0, 3, 1, 2)
    from_images = model(images)
    from_patches = model(patchify(pixels, cfg.patch_size))
    torch.testing.assert_close(from_patches, from_images, atol=1e-5, rtol=1e-5)


def test_float_patches_equal_images():
    model = ViT(tiny()).eval()
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images.permute(0, 2, 3, 1), 8)
    torch.testing.assert_close(model(patches), model(images))


def test_wrong_input_shapes_are_clear_errors():
    model = ViT(tiny())
    with pytest.raises(ValueError, match="patches"):
        model(torch.zeros(2, 16, 7))
    with pytest.raises(ValueError, match="grid"):
        model(torch.zeros(2, 9, 8 * 8 * 3, dtype=torch.uint8))


def test_other_image_size_resizes_position_embeddings_on_the_fly():
    model = ViT(tiny()).eval()
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 5)


def test_head_is_zero_initialised_and_reset_head_keeps_it_zero():
    model = ViT(tiny())
    assert torch.count_nonzero(model.head.weight) == 0
    model.reset_head(7)
    assert model.config.num_classes == 7 and torch.count_nonzero(model.head.weight) == 0


def test_attention_weights_for_the_figures():
    model = ViT(tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_intermediates(x)
    assert len(out["attention"]) == 2
    attn = out["attention"][0]
    assert attn.shape == (2, 4, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 17))
    # the explicit-softmax path and SDPA compute the same tokens
    torch.testing.assert_close(out["features"][0], model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_representation_layer_and_drop_path_train():
    model = ViT(tiny(representation_size=16, drop_path=0.2, dropout=0.1)).train()
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert model.pre_logits[0].weight.shape == (16, 32)


def test_patch_embedding_starts_at_unit_scale_like_the_papers_flax_conv():
    # lecun_normal: unit-variance pixels give unit-variance tokens, so patch content is not
    # drowned out in the first steps (with std 0.02 digits sat near chance for ~10 epochs).
    model = ViT(tiny(dim=256))
    tokens = model.patch_embed(torch.randn(4096, model.config.patch_dim))
    assert 0.9 < float(tokens.std()) < 1.1
    assert abs(float(model.blocks[0].mlp.fc1.weight.std()) - 0.02) < 0.002


def test_a_model_without_qkv_bias_builds_and_runs():
    """timm's *_miil models have no qkv bias: building one crashed on the missing bias."""
    config = ViTConfig.from_preset("micro/4", qkv_bias=False, num_classes=3)
    model = ViT(config)
    assert model.blocks[0].attn.qkv.bias is None
    assert model(torch.zeros(1, 16, config.patch_dim, dtype=torch.uint8)).shape == (1, 3)


@pytest.mark.parametrize("family", list(VIT_FAMILIES))
def test_every_option_trains_and_runs_at_another_resolution(family, tmp_path):
    """Each option builds, trains (a backward pass reaches every parameter), saves, and
    loads at twice the resolution with its position embeddings resized: the fine-tune at a
    higher resolution that the paper's recipe is about."""
    from vit import load_checkpoint, save_checkpoint

    cfg = tiny(**VIT_FAMILIES[family])
    model = ViT(cfg)
    with torch.no_grad():
        for head in (model.head, getattr(model, "head_dist", model.head)):
            head.weight.normal_()  # a zero head would leave the rest without gradients
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, cfg.num_prefix_tokens + cfg.num_patches, 32)
    save_checkpoint(model, tmp_path / "ckpt")
    bigger = load_checkpoint(tmp_path / "ckpt", image_size=64, num_classes=7)  # new heads
    assert bigger.pos_embed.shape[1] == cfg.posemb_prefix_tokens + 64
    assert bigger(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_no_embed_class_resizes_the_patch_grid_alone_as_timm_does(tmp_path):
    """DINOv2 fine-tuned at 518 px from 224: timm's own resample of the same embeddings."""
    from timm.layers import resample_abs_pos_embed

    from vit import load_checkpoint, save_checkpoint

    model = ViT(tiny(layer_scale=1.0, reg_tokens=4, no_embed_class=True))
    path = save_checkpoint(model, tmp_path / "ckpt")
    bigger = load_checkpoint(path, image_size=56)
    theirs = resample_abs_pos_embed(model.pos_embed, (7, 7), (4, 4), num_prefix_tokens=0)
    torch.testing.assert_close(bigger.pos_embed, theirs)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """`train.grad_checkpointing` trades compute for memory, never the result."""
    torch.manual_seed(0)
    model = ViT(tiny(layer_scale=0.1))
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointed in (False, True):
        model.zero_grad()
        model.grad_checkpointing = checkpointed
        loss = model(x).square().mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain_loss, plain), (ckpt_loss, ckpt) = grads
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)
