"""Peer equivalence against models created locally with random weights (no downloads)."""

import re

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from timm.models.vision_transformer import _load_weights as timm_load_npz
from transformers import ViTConfig as HFConfig
from transformers import ViTForImageClassification

from vit import Preprocessing, ViT, ViTConfig, patchify, save_checkpoint
from vit.checkpoint import CheckpointMismatchError
from vit.convert import export_weights
from vit.interop import (
    from_hf,
    from_jax_npz,
    from_timm,
    from_torchvision,
    hf_preprocessing,
    timm_preprocessing,
    to_hf,
    to_jax_npz,
    to_timm,
)

torch.manual_seed(0)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Peers zero-init some tensors (heads); random values everywhere make the test strict."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1 if p.ndim > 1 else 0.5)
    return model.eval()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("vit_tiny_patch16_224", {}, 224),
        ("vit_small_patch16_384", {"depth": 4}, 384),
        ("vit_small_patch16_224", {"depth": 2, "global_pool": "avg", "fc_norm": True}, 224),
    ],
)
def test_timm_logits_match(name, kwargs, size):
    theirs = randomize(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
    ours = from_timm(theirs.state_dict())
    assert ours.config.image_size == (size, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
    assert_same_state(to_timm(ours), theirs.state_dict())


def test_timm_conv_patch_embedding_equals_our_linear_on_our_patches():
    theirs = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    ours = from_timm(theirs.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        conv = theirs.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        linear = ours.patch_embed(patchify(x.permute(0, 2, 3, 1), 16))
    torch.testing.assert_close(linear, conv, atol=1e-4, rtol=1e-4)


def test_hf_logits_match_and_round_trip(tmp_path):
    cfg = HFConfig(
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=64,
        patch_size=16,
        num_labels=7,
    )
    theirs = randomize(ViTForImageClassification(cfg))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(pixel_values=x).logits
        ours = from_hf(theirs.state_dict())  # transformers 5's in-memory names
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)
        for side in (48, 96):  # at another size, position embeddings resized as HF does
            x = torch.randn(2, 3, side, side)
            expected = theirs(pixel_values=x, interpolate_pos_encoding=True).logits
            torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)
    # the file layout (Hub, save_pretrained) reads the same and round-trips exactly
    theirs.save_pretrained(tmp_path / "hf")
    on_disk = load_file(tmp_path / "hf" / "model.safetensors")
    assert_same_state(to_hf(from_hf(on_disk)), on_disk)


def test_hf_export_loads_with_from_pretrained(tmp_path):
    ours = randomize(ViT(ViTConfig.from_preset("ti/16", image_size=32, depth=2, num_classes=4)))
    save_checkpoint(ours, tmp_path / "ckpt", class_names=["a", "b", "c", "d"])
    export_weights("hf", tmp_path / "ckpt", tmp_path / "hf")
    theirs = ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.id2label[2] == "c"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).logits, ours(x), atol=1e-4, rtol=1e-4)


def test_torchvision_logits_match():
    theirs = randomize(
        torchvision.models.VisionTransformer(
            image_size=64,
            patch_size=16,
            num_layers=2,
            num_heads=12,
            hidden_dim=768,
            mlp_dim=3072,
            num_classes=7,
        )
    )
    ours = from_torchvision(theirs.state_dict())
    assert ours.config.mean == (0.485, 0.456, 0.406)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_jax_npz_round_trip_and_timm_reads_what_we_write(tmp_path):
    ours = randomize(ViT(ViTConfig.from_preset("ti/16", image_size=64, depth=2, num_classes=5)))
    path = to_jax_npz(ours, tmp_path / "vit.npz")
    with np.load(path) as npz:
        assert npz["embedding/kernel"].shape == (16, 16, 3, 192)
        assert npz[
            "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"
        ].shape == (192, 3, 64)
    back = from_jax_npz(path)
    assert_same_state(back.state_dict(), ours.state_dict())
    # timm's own vit_jax npz loader, into a timm model of the same shape: same logits.
    theirs = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=5
    ).eval()
    timm_load_npz(theirs, str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_big_vision_scanned_npz_loads(tmp_path):
    ours = randomize(
        ViT(
            ViTConfig.from_preset(
                "ti/16", image_size=32, depth=2, num_classes=3, pool="gap", class_token=False
            )
        )
    )
    path = to_jax_npz(ours, tmp_path / "vit.npz")
    with np.load(path) as npz:
        arrays = dict(npz)
    rename = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    blocks: dict[str, list] = {}
    scanned = {}
    for k, v in arrays.items():
        if k.startswith("Transformer/encoderblock_"):
            sub = k.split("/", 2)[2]
            for old, new in rename.items():
                sub = sub.replace(old, new)
            blocks.setdefault(sub, []).append(v)  # blocks come in order 0, 1
        else:
            scanned[k.replace("Transformer/posembed_input/", "")] = v
    scanned.update({f"Transformer/encoderblock/{k}": np.stack(v) for k, v in blocks.items()})
    np.savez(tmp_path / "bv.npz", **scanned)
    back = from_jax_npz(tmp_path / "bv.npz")
    assert back.config.pool == "gap" and not back.config.class_token
    assert_same_state(back.state_dict(), ours.state_dict())


def test_unknown_extra_weights_are_named():
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    state = {**theirs.state_dict(), "blocks.0.attn.mystery.weight": torch.zeros(3)}
    with pytest.raises(CheckpointMismatchError, match="mystery"):
        from_timm(state)


VIT_PROCESSOR = {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3}


@pytest.mark.parametrize(
    "processor,size,preprocessing",
    [
        (VIT_PROCESSOR, (224, 224), Preprocessing("bilinear", 1.0, "squash")),
        (
            {**VIT_PROCESSOR, "size": 384, "resample": 3},
            (384, 384),
            Preprocessing("bicubic", 1.0, "squash"),
        ),
        (
            {
                **VIT_PROCESSOR,
                "size": {"height": 256, "width": 256},
                "do_center_crop": True,
                "crop_size": 224,
            },
            (224, 224),
            Preprocessing("bilinear", 0.875, "squash"),
        ),
        (
            {
                **VIT_PROCESSOR,
                "size": {"shortest_edge": 256},
                "do_center_crop": True,
                "crop_size": {"height": 224, "width": 224},
            },
            (224, 224),
            Preprocessing("bilinear", 0.875, "center"),
        ),
        (
            {**VIT_PROCESSOR, "size": {"shortest_edge": 224}, "crop_pct": 0.9},
            (224, 224),
            Preprocessing("bilinear", 0.9, "center"),
        ),
    ],
)
def test_hf_processor_sizes_and_crops(processor, size, preprocessing):
    fields, found = hf_preprocessing({**processor, "image_std": [0.5] * 3})
    assert fields["image_size"] == size and found == preprocessing
    assert fields["mean"] == (0.5, 0.5, 0.5)


def test_hf_rescale_and_normalise_fold_into_mean_and_std():
    """HF: (pixel * rescale_factor - mean) / std; ours: (pixel / 255 - mean') / std'."""
    cfg = {**VIT_PROCESSOR, "image_std": [0.5] * 3}
    raw = hf_preprocessing(
        {**cfg, "do_rescale": False, "image_mean": [127.5] * 3, "image_std": [127.5] * 3}
    )[0]
    assert raw["mean"] == raw["std"] == (0.5, 0.5, 0.5)
    plain = hf_preprocessing({**cfg, "do_normalize": False})[0]
    assert plain["mean"] == (0.0, 0.0, 0.0) and plain["std"] == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"resample": 7}, "resample 7"),
        ({"image_mean": None}, "no image_mean"),
        ({"size": {"shortest_edge": 224}}, "shapes vary"),
        ({"size": {"longest_edge": 224}}, "size {'longest_edge': 224}"),
        ({"do_center_crop": True}, "no crop_size"),
        ({"do_center_crop": True, "crop_size": {"height": 200, "width": 224}}, "not one fraction"),
    ],
)
def test_hf_processor_configs_we_cannot_follow_name_the_key(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_preprocessing({**VIT_PROCESSOR, "image_std": [0.5] * 3, **change})


def test_timm_pretrained_cfg_of_a_model_object():
    """In Python: a timm model's own pretrained_cfg; timm's defaults fill what it lacks."""
    theirs = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    fields, preprocessing = timm_preprocessing(theirs.pretrained_cfg)
    ours = from_timm(theirs.state_dict(), **fields)
    assert ours.config.mean == (0.485, 0.456, 0.406) and ours.config.image_size == (224, 224)
    assert preprocessing == Preprocessing("bicubic", 0.9, "center")
    assert timm_preprocessing({"mean": [0.5] * 3, "std": [0.5] * 3})[1] == Preprocessing(
        "bicubic", 0.875, "center"
    )
    with pytest.raises(ValueError, match="crop_mode 'border'"):
        timm_preprocessing({**theirs.pretrained_cfg, "crop_mode": "border"})


@pytest.mark.parametrize("arch", ["vit_base_r50_s16_224", "vit_small_r26_s32_224"])
def test_a_hybrid_cnn_stem_is_refused_by_name_not_a_crash(arch):
    """timm's R50+ViT hybrids embed patches with a ResNet: refused before any weight."""
    from vit.timm_config import timm_architecture

    with pytest.raises(
        ValueError, match="cannot be converted exactly.*HybridEmbed patch embedding"
    ):
        timm_architecture({"architecture": arch})


@pytest.mark.parametrize("arch", ["vit_giant_patch14_dinov2", "aimv2_large_patch14_224"])
def test_an_attention_pool_whose_mlp_is_not_the_blocks_is_refused_by_name(arch):
    """timm's attention pool keeps a plain MLP where the blocks have a SwiGLU; vitray's MAP
    head (big_vision's) uses the blocks' own: named, not a shape mismatch."""
    from vit.timm_config import timm_architecture

    with pytest.raises(ValueError, match=r"an attention pool whose MLP \(Mlp\) is not the blocks'"):
        timm_architecture({"architecture": arch, "model_args": {"global_pool": "map"}})
