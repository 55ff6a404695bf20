import json
import logging

import pytest
import torch

from vit import (
    Preprocessing,
    ViT,
    ViTConfig,
    load_checkpoint,
    model_from_weights,
    model_weights,
    read_checkpoint_meta,
    read_preprocessing,
    resize_pos_embed,
    save_checkpoint,
)
from vit.checkpoint import CheckpointMismatchError

from helpers import VIT_FAMILIES


def micro(**kw) -> ViT:
    return ViT(ViTConfig.from_preset("micro/4", depth=2, num_classes=10, **kw))


def test_save_and_load_round_trip(tmp_path):
    model = micro().eval()
    torch.nn.init.normal_(model.head.weight)
    save_checkpoint(model, tmp_path / "ckpt", class_names=[str(i) for i in range(10)])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    meta = read_checkpoint_meta(tmp_path / "ckpt")
    assert meta["class_names"][3] == "3" and meta["model"]["image_size"] == [16, 16]
    loaded = load_checkpoint(tmp_path / "ckpt").eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("family", sorted(VIT_FAMILIES))
def test_a_model_shipped_as_weights_is_the_same_model(family):
    """What predict's actors and a GPU scoring task rebuild from the object store: every
    family's options and weights, pickled as Ray ships them, answer as the model did."""
    import pickle

    model = micro(**VIT_FAMILIES[family]).eval()
    torch.nn.init.normal_(model.head.weight)
    shipped = model_from_weights(pickle.loads(pickle.dumps(model_weights(model)))).eval()
    assert shipped.config == model.config
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(shipped(x), model(x), atol=0, rtol=0)


def test_load_at_32px_resizes_posemb_and_runs(tmp_path, caplog):
    model = micro()
    save_checkpoint(model, tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="vit.checkpoint"):
        big = load_checkpoint(tmp_path / "ckpt", image_size=32)
    assert "4x4 -> 8x8" in caplog.text
    assert big.config.grid_size == (8, 8)
    expected = resize_pos_embed(model.pos_embed.detach(), (8, 8))
    torch.testing.assert_close(big.pos_embed.detach(), expected)
    assert big(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_new_num_classes_replaces_head_keeps_body(tmp_path):
    model = micro()
    torch.nn.init.normal_(model.head.weight)
    save_checkpoint(model, tmp_path / "ckpt")
    new = load_checkpoint(tmp_path / "ckpt", num_classes=3)
    assert new.head.weight.shape == (3, 64) and torch.count_nonzero(new.head.weight) == 0
    torch.testing.assert_close(new.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)


def test_mismatched_architecture_names_keys_and_shapes(tmp_path):
    save_checkpoint(micro(), tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["depth"], meta["model"]["dim"], meta["model"]["num_heads"] = 3, 96, 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(tmp_path / "ckpt")
    text = str(err.value)
    assert "missing keys" in text and "blocks.2." in text
    assert "shape mismatch: patch_embed.weight: checkpoint (64, 48) vs model (96, 48)" in text


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vitray checkpoint"):
        load_checkpoint(tmp_path)


def test_preprocessing_round_trips_and_older_checkpoints_have_none(tmp_path):
    declared = Preprocessing("bicubic", 0.9, "center")
    save_checkpoint(micro(), tmp_path / "ckpt", preprocessing=declared)
    assert read_preprocessing(tmp_path / "ckpt") == declared
    meta_path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["preprocessing"]["crop_fraction"] = 1.5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"ckpt/config\.json: preprocessing: crop_fraction 1\.5"):
        read_preprocessing(tmp_path / "ckpt")
    del meta["preprocessing"]  # written before preprocessing was kept
    meta_path.write_text(json.dumps(meta))
    assert read_preprocessing(tmp_path / "ckpt") is None
    assert load_checkpoint(tmp_path / "ckpt").config.mean == (0.5, 0.5, 0.5)
