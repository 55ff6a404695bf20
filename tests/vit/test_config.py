import pytest

from vit import ViTConfig, preset_names
from vit.flops import forward_flops


def test_presets_have_paper_sizes():
    b16 = ViTConfig.from_preset("b/16")
    assert (b16.dim, b16.depth, b16.num_heads, b16.mlp_dim) == (768, 12, 12, 3072)
    l16 = ViTConfig.from_preset("l/16")
    assert (l16.dim, l16.depth, l16.num_heads, l16.mlp_dim) == (1024, 24, 16, 4096)
    h14 = ViTConfig.from_preset("h/14")
    assert (h14.dim, h14.depth, h14.num_heads, h14.mlp_dim, h14.patch_size) == (
        1280,
        32,
        16,
        5120,
        14,
    )


def test_preset_overrides_and_json_round_trip():
    cfg = ViTConfig.from_preset("s/16", image_size=384, num_classes=10)
    assert cfg.image_size == (384, 384) and cfg.grid_size == (24, 24) and cfg.num_classes == 10
    assert ViTConfig.from_json(cfg.to_json()) == cfg
    rect = ViTConfig.from_preset("micro/4", image_size=(16, 32))
    assert ViTConfig.from_json(rect.to_json()).grid_size == (4, 8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(image_size=30, patch_size=16), "not a multiple"),
        (dict(dim=100, num_heads=3), "divisible"),
        (dict(pool="max"), "pool"),
        (dict(pool="cls", class_token=False), "class_token"),
        (dict(mean=(0.5,)), "mean/std"),
    ],
)
def test_invalid_configs_say_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown ViTConfig keys"):
        ViTConfig.from_dict({"dim": 192, "heads": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        ViTConfig.from_preset("xl/16")


def test_flops_match_published_numbers():
    # Published forward GFLOPs at 224: Ti/16 2.5, S/16 9.2, B/16 35.2; B/16@384 111
    # (docs/design.md#published-reference-numbers).
    gflops = {
        name: forward_flops(ViTConfig.from_preset(name)) / 1e9 for name in ("ti/16", "s/16", "b/16")
    }
    assert gflops["ti/16"] == pytest.approx(2.5, rel=0.03)
    assert gflops["s/16"] == pytest.approx(9.2, rel=0.03)
    assert gflops["b/16"] == pytest.approx(35.2, rel=0.03)
    assert forward_flops(ViTConfig.from_preset("b/16", image_size=384)) / 1e9 == pytest.approx(
        111, rel=0.03
    )
    assert len(preset_names()) >= 6
