"""`vitray info` names the family a checkpoint's options make, in words."""

from __future__ import annotations

import pytest

from jobs.cli import main
from vit import ViT, ViTConfig, save_checkpoint

from helpers import VIT_FAMILIES

NAMED = {
    "deit3": "DeiT III / DINOv2: layer scale (init 1e-05), position embeddings for the "
    "patches only",
    "dinov2 with registers": "DINOv2 with registers: layer scale (init 1), 4 register tokens",
    "openai clip": "OpenAI CLIP image tower: a norm before the blocks, quick_gelu activation, "
    "no patch embedding bias",
    "siglip": "SigLIP image tower: no class token, gelu_tanh activation, attention pooling",
    "distilled deit": "distilled DeiT: a distillation token and head",
}


@pytest.mark.parametrize("family", list(NAMED))
def test_info_names_the_family_of_a_checkpoint(tmp_path, capsys, family):
    config = ViTConfig(image_size=32, patch_size=8, dim=32, depth=1, num_heads=4, num_classes=3,
                       **VIT_FAMILIES[family])  # fmt: skip
    save_checkpoint(ViT(config), tmp_path / "ckpt")
    main(["info", str(tmp_path / "ckpt")])
    assert f"family: {NAMED[family]}" in capsys.readouterr().out
