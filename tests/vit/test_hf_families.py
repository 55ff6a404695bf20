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

# family: (config, model class, processor, output read, mean and preprocessing declared)
FAMILIES = {
    "dinov2": (
        T.Dinov2Config(**SMALL, mlp_ratio=2),
        T.Dinov2Model,
        T.BitImageProcessor(size={"shortest_edge": 36}, crop_size=CROP, resample=3,
                            image_mean=IMAGENET_MEAN, image_std=(0.229, 0.224, 0.225)),
        "pooler_output",
        IMAGENET_MEAN,
        Preprocessing("bicubic", 32 / 36, "center"),
    ),
    "dinov2 with registers": (
        T.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=4),
        T.Dinov2WithRegistersModel,
        T.BitImageProcessor(size={"shortest_edge": 36}, crop_size=CROP, resample=3,
                            image_mean=IMAGENET_MEAN, image_std=(0.229, 0.224, 0.225)),
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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_saved_tower_converts_to_its_own_output_and_preprocessing(tmp_path, family):
    config, model_class, processor, output, mean, preprocessing = FAMILIES[family]
    torch.manual_seed(0)
    theirs = model_class(config).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():  # every weight matters: none left at 0 or 1
            parameter.add_(torch.randn_like(parameter) * 0.1)
    theirs.save_pretrained(tmp_path / "hub")
    processor.save_pretrained(tmp_path / "hub")
    ours = import_weights("hf", tmp_path / "hub", tmp_path / "ours").eval()

    pixels = processor(images=[photo((48, 40)), photo((40, 56), seed=1)], return_tensors="pt")
    pixels = pixels["pixel_values"]
    with torch.no_grad():
        expected = getattr(theirs(pixel_values=pixels), output)
        got = ours(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(ours.config.mean, mean, rtol=1e-6)
    assert read_preprocessing(tmp_path / "ours") == pytest.approx(preprocessing)


def test_a_family_model_vitray_does_not_read_is_refused_naming_the_one_to_save(tmp_path):
    theirs = T.Dinov2ForImageClassification(T.Dinov2Config(**SMALL, num_labels=3))
    theirs.save_pretrained(tmp_path / "hub")
    FAMILIES["dinov2"][2].save_pretrained(tmp_path / "hub")
    with pytest.raises(ValueError, match="Dinov2ForImageClassification weights: .* as Dinov2Model"):
        import_weights("hf", tmp_path / "hub", tmp_path / "ours")
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["model_type"] == "dinov2"
