"""The Hugging Face towers people fine-tune from, differentially: transformers builds each
(small, random weights), `save_pretrained` writes it with its own image processor's
config, `vitray convert --from hf` reads the directory, and our model must give the
tower's own output (`pooler_output`, or the distilled DeiT's averaged logits) on the
processor's own pixels; the declared normalisation, resize and crop are the processor's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T

from vit.checkpoint import read_preprocessing
from vit.config import Preprocessing
from vit.convert import import_weights

from helpers import photo

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
CROP = {"height": 32, "width": 32}
DINOV2_PROCESSOR = T.BitImageProcessor(  # DINOv2's: resize to 256, crop 224 (here 36, 32)
    size={"shortest_edge": 36},
    crop_size=CROP,
    resample=3,
    image_mean=IMAGENET_MEAN,
    image_std=(0.229, 0.224, 0.225),
)

# family: (config, model class, processor, output read, mean and preprocessing declared)
FAMILIES = {
    "dinov2": (
        T.Dinov2Config(**SMALL, mlp_ratio=2),
        T.Dinov2Model,
        DINOV2_PROCESSOR,
        "pooler_output",
        IMAGENET_MEAN,
        Preprocessing("bicubic", 32 / 36, "center"),
    ),
    "dinov2 giant": (  # its SwiGLU MLP
        T.Dinov2Config(**SMALL, use_swiglu_ffn=True),
        T.Dinov2Model,
        DINOV2_PROCESSOR,
        "pooler_output",
        IMAGENET_MEAN,
        Preprocessing("bicubic", 32 / 36, "center"),
    ),
    "dinov2 with registers": (
        T.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=4),
        T.Dinov2WithRegistersModel,
        DINOV2_PROCESSOR,
        "pooler_output",
        IMAGENET_MEAN,
        Preprocessing("bicubic", 32 / 36, "center"),
    ),
    "clip": (
        T.CLIPVisionConfig(**SMALL, intermediate_size=64),  # QuickGELU, eps 1e-5
        T.CLIPVisionModel,
        T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=CROP),
        "pooler_output",
        CLIP_MEAN,
        Preprocessing("bicubic", 1.0, "center"),
    ),
    "siglip": (
        T.SiglipVisionConfig(**SMALL, intermediate_size=64),  # tanh GELU, attention pool
        T.SiglipVisionModel,
        T.SiglipImageProcessor(size=CROP),
        "pooler_output",
        (0.5, 0.5, 0.5),
        Preprocessing("bicubic", 1.0, "squash"),
    ),
    "distilled deit": (
        T.DeiTConfig(**SMALL, intermediate_size=64, num_labels=3),
        T.DeiTForImageClassificationWithTeacher,
        T.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size=CROP, resample=3,
                             image_mean=IMAGENET_MEAN, image_std=(0.229, 0.224, 0.225)),
        "logits",
        IMAGENET_MEAN,
        Preprocessing("bicubic", 32 / 36, "squash"),
    ),
}  # fmt: skip


def saved(tmp_path, family: str):
    """(their model, our converted model) of `family`, random weights, as on the Hub."""
    config, model_class, processor, *_ = FAMILIES[family]
    torch.manual_seed(0)
    theirs = model_class(config).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():  # every weight matters: none left at 0 or 1
            parameter.add_(torch.randn_like(parameter) * 0.1)
    theirs.save_pretrained(tmp_path / "hub")
    processor.save_pretrained(tmp_path / "hub")
    return theirs, import_weights("hf", tmp_path / "hub", tmp_path / "ours").eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_saved_tower_converts_to_its_own_output_and_preprocessing(tmp_path, family):
    _, _, processor, output, mean, preprocessing = FAMILIES[family]
    theirs, ours = saved(tmp_path, family)

    pixels = processor(images=[photo((48, 40)), photo((40, 56), seed=1)], return_tensors="pt")
    pixels = pixels["pixel_values"]
    with torch.no_grad():
        expected = getattr(theirs(pixel_values=pixels), output)
        got = ours(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(ours.config.mean, mean, rtol=1e-6)
    assert read_preprocessing(tmp_path / "ours") == pytest.approx(preprocessing)


@pytest.mark.parametrize(
    "model, family, names",
    [
        (T.Dinov2ForImageClassification(T.Dinov2Config(**SMALL, num_labels=3)), "dinov2",
         "Dinov2ForImageClassification weights: .* as Dinov2Model"),
        # its distillation token is in the sequence, and no head reads it
        (T.DeiTForImageClassification(T.DeiTConfig(**SMALL, num_labels=3)), "distilled deit",
         "DeiTForImageClassification weights: .* as DeiTForImageClassificationWithTeacher"),
    ],
)  # fmt: skip
def test_a_family_model_vitray_does_not_read_is_refused_naming_the_one_to_save(
    tmp_path, model, family, names
):
    model.save_pretrained(tmp_path / "hub")
    FAMILIES[family][2].save_pretrained(tmp_path / "hub")
    with pytest.raises(ValueError, match=names):
        import_weights("hf", tmp_path / "hub", tmp_path / "ours")


@pytest.mark.parametrize("side", [24, 48])  # a 3x3 grid and a 6x6 one, from 4x4
@pytest.mark.parametrize("family", list(FAMILIES))
def test_at_another_size_every_family_resizes_its_position_embeddings_as_hf_does(
    tmp_path, family, side
):
    """DINOv2's embeddings are 518 px and its processor crops 224: it always runs at another
    size. The others do when asked (interpolate_pos_encoding). HF resizes bicubic without
    antialiasing, but DINOv2 with registers with: the converted model does as its source."""
    theirs, ours = saved(tmp_path, family)
    output = FAMILIES[family][3]
    pixels = torch.randn(2, 3, side, side)
    asked = {} if "dinov2" in family else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        expected = getattr(theirs(pixel_values=pixels, **asked), output)
        torch.testing.assert_close(ours(pixels), expected, atol=1e-5, rtol=1e-4)


def test_a_config_json_without_its_defaults_takes_the_familys_own(tmp_path):
    """CLIP's activation is QuickGELU and its eps 1e-5 by default, not ViT's."""
    theirs, _ = saved(tmp_path, "clip")
    path = tmp_path / "hub" / "config.json"
    trimmed = {k: v for k, v in json.loads(path.read_text()).items()
               if k not in ("hidden_act", "layer_norm_eps")}  # fmt: skip
    path.write_text(json.dumps(trimmed))
    ours = import_weights("hf", tmp_path / "hub", tmp_path / "trimmed").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), theirs(pixel_values=pixels).pooler_output)


def test_a_siglip_size_that_is_not_a_multiple_of_its_patch_is_said(tmp_path, caplog):
    """SigLIP so400m/14 at 384 px: HF's convolution leaves the last 6 px out."""
    config = T.SiglipVisionConfig(**{**SMALL, "image_size": 36}, intermediate_size=64)
    T.SiglipVisionModel(config).save_pretrained(tmp_path / "hub")
    T.SiglipImageProcessor(size={"height": 36, "width": 36}).save_pretrained(tmp_path / "hub")
    with caplog.at_level("WARNING"):
        ours = import_weights("hf", tmp_path / "hub", tmp_path / "ours")
    assert ours.config.image_size == (32, 32)
    assert "image_size 36x36 is not a multiple of patch 8" in caplog.text


def test_a_siglip_tower_without_its_pooling_head_is_refused_by_name(tmp_path):
    config = T.SiglipVisionConfig(**SMALL, intermediate_size=64, vision_use_head=False)
    T.SiglipVisionModel(config).save_pretrained(tmp_path / "hub")
    T.SiglipImageProcessor(size=CROP).save_pretrained(tmp_path / "hub")
    with pytest.raises(ValueError, match="SigLIP tower without its attention-pool head"):
        import_weights("hf", tmp_path / "hub", tmp_path / "ours")
