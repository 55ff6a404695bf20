"""Weight files as the peers write them: the normalisation travels with the weights.

Each peer prepares the same uint8 pixels its own way (timm's transform, Hugging Face's image
processor, a torchvision weights enum's transforms); our converted model, fed those pixels
as uint8 patches, must give the peer model's logits.
"""

import argparse
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from timm.models._hub import save_for_hf
from torchvision.models import ViT_B_16_Weights
from transformers import (
    AutoImageProcessor,
    DeiTImageProcessor,
    ViTForImageClassification,
    ViTImageProcessor,
)
from transformers import ViTConfig as HFConfig

from vit import (
    Preprocessing,
    ViT,
    ViTConfig,
    load_checkpoint,
    patchify,
    read_preprocessing,
    save_checkpoint,
)
from vit.convert import export_weights, import_weights, read_state_dict
from vit.interop import IMAGENET_MEAN, IMAGENET_STD, to_jax_npz

from helpers import VIT_FAMILIES, photo

HALF = (0.5, 0.5, 0.5)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (peers zero-init heads), so logits depend on every weight."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1 if p.ndim > 1 else 0.5)
    return model.eval()


def logits_on_uint8(model: ViT, pixels: np.ndarray) -> torch.Tensor:
    """Our model on (H, W, 3) uint8 pixels, as the data pipeline feeds it: it normalises."""
    patches = patchify(torch.tensor(pixels)[None], model.config.patch_size)
    with torch.no_grad():
        return model(patches)


def timm_hub_dir(tmp_path: Path, name: str, **save_kw) -> tuple[torch.nn.Module, Path]:
    theirs = randomize(timm.create_model(name, pretrained=False, img_size=32, depth=1))
    save_for_hf(theirs, tmp_path / "timm", **save_kw)
    return theirs, tmp_path / "timm"


def hf_model(image_size: int = 32) -> ViTForImageClassification:
    cfg = HFConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=image_size,
        patch_size=16,
        num_labels=5,
    )
    return randomize(ViTForImageClassification(cfg))


@pytest.mark.parametrize(
    "name,mean,std",
    [("vit_tiny_patch16_224", HALF, HALF), ("deit_tiny_patch16_224", IMAGENET_MEAN, IMAGENET_STD)],
)
def test_timm_hub_dir_normalises_as_timms_own_transform(tmp_path, name, mean, std):
    theirs, hub = timm_hub_dir(tmp_path, name, safe_serialization=True)
    import_weights("timm", hub, tmp_path / "ours")
    ours = load_checkpoint(tmp_path / "ours").eval()
    assert ours.config.mean == mean and ours.config.std == std
    assert read_preprocessing(tmp_path / "ours") == Preprocessing("bicubic", 0.9, "center")
    # timm's own reading of its config.json, at the image's size (no resize, no crop)
    pretrained_cfg = json.loads((hub / "config.json").read_text())["pretrained_cfg"]
    data_cfg = {**resolve_data_config(pretrained_cfg=pretrained_cfg), "crop_pct": 1.0}
    assert list(data_cfg["input_size"]) == [3, 32, 32]
    pixels = photo((32, 32))
    x = create_transform(**data_cfg)(Image.fromarray(pixels))[None]
    with torch.no_grad():
        expected = theirs(x)
    torch.testing.assert_close(logits_on_uint8(ours, pixels), expected, atol=1e-4, rtol=1e-4)


def test_hf_vit_processor_half_normalisation(tmp_path):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path / "hf")
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, resample=3)
    processor.save_pretrained(tmp_path / "hf")
    import_weights("hf", tmp_path / "hf", tmp_path / "ours")
    ours = load_checkpoint(tmp_path / "ours").eval()
    assert ours.config.mean == HALF and ours.config.std == HALF
    assert read_preprocessing(tmp_path / "ours") == Preprocessing("bicubic", 1.0, "squash")
    pixels = photo((32, 32))
    x = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = theirs(pixel_values=x).logits
    torch.testing.assert_close(logits_on_uint8(ours, pixels), expected, atol=1e-4, rtol=1e-4)


def test_hf_deit_processor_imagenet_normalisation_and_crop(tmp_path):
    """DeiT's processor: resize to 40x40, center-crop 32x32 (fraction 0.8), ImageNet mean."""
    theirs = hf_model()
    theirs.save_pretrained(tmp_path / "hf")
    processor = DeiTImageProcessor(
        size={"height": 40, "width": 40},
        crop_size={"height": 32, "width": 32},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(tmp_path / "hf")
    import_weights("hf", tmp_path / "hf", tmp_path / "ours")
    ours = load_checkpoint(tmp_path / "ours").eval()
    torch.testing.assert_close(ours.config.mean, IMAGENET_MEAN)
    torch.testing.assert_close(ours.config.std, IMAGENET_STD)
    assert read_preprocessing(tmp_path / "ours") == Preprocessing("bicubic", 0.8, "squash")
    pixels = photo((40, 40))  # already at the resize size: the processor only crops
    x = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = theirs(pixel_values=x).logits
    got = logits_on_uint8(ours, pixels[4:36, 4:36])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def torchvision_224() -> torch.nn.Module:
    """A small torchvision ViT at vit_b_16's 224 px (the size its IMAGENET1K_V1 crops to)."""
    return randomize(
        torchvision.models.VisionTransformer(
            image_size=224,
            patch_size=16,
            num_layers=1,
            num_heads=3,
            hidden_dim=192,
            mlp_dim=384,
            num_classes=7,
        )
    )


@pytest.mark.parametrize(
    "file,spec",
    [
        ("vit_b_16-c867db91.pth", "{path}"),  # named as torchvision downloads it
        ("mine.pth", "{path}:ViT_B_16_Weights.IMAGENET1K_V1"),  # the weights named
    ],
)
def test_torchvision_weights_enum_brings_its_transforms(tmp_path, file, spec):
    theirs = torchvision_224()
    torch.save(theirs.state_dict(), tmp_path / file)
    import_weights("torchvision", Path(spec.format(path=tmp_path / file)), tmp_path / "ours")
    ours = load_checkpoint(tmp_path / "ours").eval()
    assert read_preprocessing(tmp_path / "ours") == Preprocessing("bilinear", 224 / 256)
    # torchvision's own transforms: resize the shorter side to 256, center-crop 224
    transforms = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    pixels = photo((256, 256))
    x = transforms(Image.fromarray(pixels))[None]
    with torch.no_grad():
        expected = theirs(x)
    got = logits_on_uint8(ours, pixels[16:240, 16:240])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unnamed_torchvision_and_jax_files_warn_with_the_default_they_get(tmp_path, caplog):
    torch.save(torchvision_224().state_dict(), tmp_path / "mine.pth")
    tiny = ViT(ViTConfig.from_preset("ti/16", image_size=32, depth=1, num_classes=3))
    npz = to_jax_npz(tiny, tmp_path / "vit.npz")
    with caplog.at_level(logging.WARNING, logger="vit.convert"):
        tv = import_weights("torchvision", tmp_path / "mine.pth", tmp_path / "tv")
        jax = import_weights("jax", npz, tmp_path / "jax")
    assert tv.config.mean == IMAGENET_MEAN and jax.config.mean == HALF
    assert read_preprocessing(tmp_path / "tv") is None
    assert f"{tmp_path / 'mine.pth'} declares no normalisation: using ImageNet's" in caplog.text
    assert f"{npz} declares no normalisation: using mean and std 0.5" in caplog.text


def test_timm_or_hf_weights_without_their_preprocessing_file_fail(tmp_path):
    _, hub = timm_hub_dir(tmp_path, "deit_tiny_patch16_224", safe_serialization=True)
    (hub / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json.*it holds: model\.safetensors"):
        import_weights("timm", hub / "model.safetensors", tmp_path / "ours")
    # the mean and std given in Python instead: converted, resize and crop unknown
    model = import_weights("timm", hub, tmp_path / "ours", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert model.config.mean == IMAGENET_MEAN and read_preprocessing(tmp_path / "ours") is None
    hf_model().save_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json, which .*/hf lacks"):
        import_weights("hf", tmp_path / "hf", tmp_path / "ours")


def test_declared_preprocessing_that_does_not_fit_names_file_and_key(tmp_path):
    _, hub = timm_hub_dir(tmp_path, "vit_tiny_patch16_224", safe_serialization=True)
    config = json.loads((hub / "config.json").read_text())
    del config["pretrained_cfg"]["std"]
    (hub / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"timm/config\.json: no std"):
        import_weights("timm", hub, tmp_path / "ours")
    config["pretrained_cfg"]["std"] = list(HALF)
    config["pretrained_cfg"]["input_size"] = [3, 64, 64]  # the weights' posemb is 2x2
    (hub / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pos_embed"):
        import_weights("timm", hub, tmp_path / "ours")


def test_exports_carry_the_normalisation_to_the_peers_and_back(tmp_path, caplog):
    _, hub = timm_hub_dir(tmp_path, "deit_tiny_patch16_224", safe_serialization=True)
    import_weights("timm", hub, tmp_path / "ours")
    export_weights("timm", tmp_path / "ours", tmp_path / "timm-out")
    pretrained_cfg = json.loads((tmp_path / "timm-out" / "config.json").read_text())
    data_cfg = resolve_data_config(pretrained_cfg=pretrained_cfg["pretrained_cfg"])
    assert data_cfg["mean"] == list(IMAGENET_MEAN) and data_cfg["crop_pct"] == 0.9
    import_weights("timm", tmp_path / "timm-out", tmp_path / "back")
    assert read_preprocessing(tmp_path / "back") == read_preprocessing(tmp_path / "ours")
    assert load_checkpoint(tmp_path / "back").config == load_checkpoint(tmp_path / "ours").config

    config = ViTConfig.from_preset(
        "ti/16", image_size=32, depth=1, num_classes=3, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    save_checkpoint(ViT(config), tmp_path / "mine")  # no preprocessing: vitray's default
    with caplog.at_level("WARNING"):
        export_weights("hf", tmp_path / "mine", tmp_path / "hf-out")
    assert "its crop keeps 0.8649 of the resized image, the source's 0.875" in caplog.text
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf-out")
    assert tuple(processor.image_mean) == IMAGENET_MEAN and processor.crop_size["height"] == 32
    back = import_weights("hf", tmp_path / "hf-out", tmp_path / "hf-back")
    torch.testing.assert_close(back.config.mean, IMAGENET_MEAN)
    # bilinear, center 0.875 as vitray evaluates, to HF's whole pixels: 32 of 37
    assert read_preprocessing(tmp_path / "hf-back") == Preprocessing("bilinear", 32 / 37, "center")


@pytest.mark.parametrize(
    "preprocessing",
    [Preprocessing("bicubic", 0.875, "center"), Preprocessing("bilinear", 0.875, "squash")],
)
def test_the_hf_export_prepares_images_as_vitray_evaluates_them(tmp_path, preprocessing):
    """The exported processor crops as vitray's evaluation does: 28 px kept of 32, the
    shorter side (center) or both sides (squash) resized first. Images already at the
    resize size, so that no resampler's rounding enters: the same pixels, exactly."""
    from pipeline.config import DataConfig
    from pipeline.transforms import crop_image

    config = ViTConfig(image_size=28, patch_size=7, dim=32, depth=1, num_heads=4, num_classes=3)
    save_checkpoint(ViT(config), tmp_path / "ours", preprocessing=preprocessing)
    export_weights("hf", tmp_path / "ours", tmp_path / "hf")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    data = DataConfig(dataset="unused", image_size=28, interpolation=preprocessing.interpolation,
                      eval_crop_fraction=0.875, eval_crop_mode=preprocessing.crop_mode)  # fmt: skip
    side = (32, 40) if preprocessing.crop_mode == "center" else (32, 32)
    image = Image.fromarray(photo(side))
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    ours = crop_image(encoded.getvalue(), data, train=False, rng=np.random.default_rng(0))
    mean, std = torch.tensor(config.mean)[:, None, None], torch.tensor(config.std)[:, None, None]
    expected = (torch.from_numpy(ours).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
    import_weights("hf", tmp_path / "hf", tmp_path / "back")
    assert read_preprocessing(tmp_path / "back") == preprocessing


def test_fine_tune_start_keeps_the_imported_normalisation(tmp_path):
    """jobs/training/start.py on converted weights: the resized start keeps the source's mean
    and std (in its ViTConfig) and exposes its resize and crop for the job's data config."""
    from jobs.config import CONFIGS, load_config
    from jobs.training.start import resized_start

    _, hub = timm_hub_dir(tmp_path, "deit_tiny_patch16_224", safe_serialization=True)
    import_weights("timm", hub, tmp_path / "ours")
    sets = [f"init.checkpoint={tmp_path / 'ours'}", "data.image_size=64"]
    cfg = load_config(CONFIGS / "demo-finetune.yaml", sets)
    start = resized_start(cfg, ["a", "b"], lambda ref, _: Path(ref), str(tmp_path / "work"))
    assert start.config.image_size == (64, 64) and start.config.mean == IMAGENET_MEAN
    assert start.preprocessing == Preprocessing("bicubic", 0.9, "center")
    assert read_preprocessing(start.directory) == start.preprocessing
    assert load_checkpoint(start.directory).config.std == IMAGENET_STD
    assert start.tags["vitray.init.preprocessing"] == (
        "mean/std 0.485/0.229, 0.456/0.224, 0.406/0.225, bicubic resize, center crop 0.9"
    )


def hf_hub_dir(tmp_path: Path, **save_kw) -> tuple[ViTForImageClassification, Path]:
    theirs = hf_model()
    theirs.save_pretrained(tmp_path / "hf", **save_kw)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "hf")
    return theirs, tmp_path / "hf"


def assert_same_logits(ours: ViT, theirs: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = theirs(x)
        out = getattr(out, "logits", out)  # transformers wraps its logits
        torch.testing.assert_close(ours.eval()(x), out, atol=1e-4, rtol=1e-4)


def test_hub_dirs_holding_only_pytorch_model_bin_load(tmp_path):
    theirs, hub = timm_hub_dir(tmp_path, "vit_tiny_patch16_224", safe_serialization=False)
    assert sorted(p.name for p in hub.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert_same_logits(import_weights("timm", hub, tmp_path / "timm-ours"), theirs)
    # an older Hugging Face repository: the same file layout, pickled
    theirs, hub = hf_hub_dir(tmp_path)
    torch.save(load_file(hub / "model.safetensors"), hub / "pytorch_model.bin")
    (hub / "model.safetensors").unlink()
    assert_same_logits(import_weights("hf", hub, tmp_path / "hf-ours"), theirs)


def test_sharded_safetensors_dir_loads(tmp_path):
    theirs, hub = hf_hub_dir(tmp_path, max_shard_size="50KB")
    shards = sorted(p.name for p in hub.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (hub / "model.safetensors").exists()
    assert (hub / "model.safetensors.index.json").is_file()
    assert_same_logits(import_weights("hf", hub, tmp_path / "ours"), theirs)
    (hub / shards[1]).unlink()
    with pytest.raises(
        FileNotFoundError, match=f"lists shards \\['{shards[1]}'\\] that .*/hf lacks"
    ):
        read_state_dict(hub)


def test_missing_or_unreadable_weights_name_the_directory_and_what_it_holds(tmp_path):
    _, hub = hf_hub_dir(tmp_path)
    (hub / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"/hf: no weights \(model\.safetensors, .*\); it holds: config\.json, "
        r"preprocessor_config\.json",
    ):
        import_weights("hf", hub, tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match="nowhere.pth: no such file or directory"):
        import_weights("torchvision", tmp_path / "nowhere.pth", tmp_path / "ours")
    torch.save({"args": argparse.Namespace(lr=1)}, hub / "pytorch_model.bin")  # not weights only
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a weights file"):
        read_state_dict(hub)


@pytest.mark.parametrize("family", ["paper", *VIT_FAMILIES])
def test_every_family_exports_to_timm_and_timm_builds_the_same_function(tmp_path, family):
    """`vitray convert --to timm`: timm's own `create_model("local-dir:...")` builds the
    model from the config.json we write and gives our logits; importing it back gives our
    config. A fine-tuned model goes back to the ecosystem it came from."""
    torch.manual_seed(0)
    options = {} if family == "paper" else VIT_FAMILIES[family]
    config = ViTConfig(
        image_size=32, patch_size=8, dim=32, depth=2, num_heads=4, num_classes=5, **options
    )
    model = ViT(config)
    with torch.no_grad():
        for parameter in model.parameters():  # every weight matters, none left at 0 or 1
            parameter.add_(torch.randn_like(parameter) * 0.1)
    save_checkpoint(model, tmp_path / "ours")
    if family == "aimv2":  # timm builds AIMv2 from its own registered names only
        with pytest.raises(ValueError, match="AIMv2's layout"):
            export_weights("timm", tmp_path / "ours", tmp_path / "timm-out")
        return
    export_weights("timm", tmp_path / "ours", tmp_path / "timm-out")
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm-out'}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), model.eval()(images), atol=1e-5, rtol=1e-4)
    back = import_weights("timm", tmp_path / "timm-out", tmp_path / "back")
    assert back.config == config


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(norm_eps=1e-3), "LayerNorm eps 0.001 with dist_token False and mlp mlp"),
        (dict(dist_token=True, no_embed_class=True), "a distillation token without position"),
        (dict(pool="map", class_token=False, mlp="swiglu_packed", layer_scale=0.1), "a MAP head"),
        (dict(pool="map", class_token=False, sub_norm=True), "a MAP head whose MLP"),
    ],
)
def test_a_model_timm_cannot_hold_is_refused_before_anything_is_written(tmp_path, change, named):
    """Written anyway, timm's own loader (`local-dir:`) failed on these files."""
    config = ViTConfig(image_size=32, patch_size=8, dim=32, depth=1, num_heads=4, **change)
    save_checkpoint(ViT(config), tmp_path / "ours")
    with pytest.raises(ValueError, match=re.escape(named)):
        export_weights("timm", tmp_path / "ours", tmp_path / "timm-out")
    assert not (tmp_path / "timm-out").exists()


@pytest.mark.parametrize("target", ["hf", "jax"])
def test_an_option_the_target_cannot_hold_is_refused_by_name(tmp_path, target):
    """HF's ViT and the paper's JAX layout have none of the later options: written anyway,
    the exported model would be another function (layer scale's gammas dropped: 4.3 off)."""
    config = ViTConfig(image_size=32, patch_size=8, dim=32, depth=1, num_heads=4, num_classes=3,
                       layer_scale=0.1, norm_pre=True)  # fmt: skip
    save_checkpoint(ViT(config), tmp_path / "ours")
    with pytest.raises(ValueError, match=r"layer_scale=0.1, norm_pre=True: export it to timm"):
        export_weights(target, tmp_path / "ours", tmp_path / "out")


@pytest.mark.parametrize("hidden_act, converts", [("quick_gelu", True), ("relu", False)])
def test_a_hf_vit_converts_with_its_own_activation_or_is_refused(tmp_path, hidden_act, converts):
    theirs = ViTForImageClassification(
        HFConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                 image_size=32, patch_size=8, num_labels=3, hidden_act=hidden_act)
    ).eval()  # fmt: skip
    theirs.save_pretrained(tmp_path / "hf")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "hf")
    if not converts:
        with pytest.raises(ValueError, match="hidden_act 'relu'"):
            import_weights("hf", tmp_path / "hf", tmp_path / "ours")
        return
    ours = import_weights("hf", tmp_path / "hf", tmp_path / "ours").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).logits, atol=1e-5, rtol=1e-4)


def converted(hub: Path, out: Path) -> ViT:
    return import_weights("timm", hub, out).eval()


def test_a_timm_model_of_dynamic_size_converts_at_the_grid_its_weights_have(tmp_path):
    """timm keeps a dynamic_img_size model's default input_size (224) in pretrained_cfg;
    its grid is model_args' img_size: here 2x8, as many tokens as a 4x4 grid."""
    theirs = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1,
                                         img_size=(32, 128), dynamic_img_size=True))  # fmt: skip
    save_for_hf(theirs, tmp_path / "timm", safe_serialization=True)
    ours = converted(tmp_path / "timm", tmp_path / "ours")
    assert ours.config.image_size == (32, 128)
    x = torch.randn(2, 3, 32, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fc_norm", [None, False])  # avg pooling's default (a norm), or none
def test_an_older_timm_config_keeps_its_pooling_or_is_refused(tmp_path, fc_norm):
    """Older timm wrote the pooling to config.json's top-level global_pool alone, without
    model_args: read from there, the weights convert exactly or do not load."""
    options = dict(depth=1, img_size=32, global_pool="avg", fc_norm=fc_norm)
    theirs = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **options))
    save_for_hf(theirs, tmp_path / "timm", safe_serialization=True)
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    del cfg["model_args"]
    (tmp_path / "timm" / "config.json").write_text(json.dumps(cfg))
    if fc_norm is False:  # pooled without its norm: not the default, so not in the file
        with pytest.raises(ValueError, match="missing keys: .*fc_norm"):
            converted(tmp_path / "timm", tmp_path / "ours")
        return
    ours = converted(tmp_path / "timm", tmp_path / "ours")
    assert ours.config.pool == "gap"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_hf_weights_convert_with_their_config_json_or_are_refused(tmp_path):
    """A non-square ViT converts exactly; without config.json (heads, eps, activation) or of
    a model type that is no ViT vitray reads, the weights are refused by name."""
    from transformers import BeitConfig, BeitForImageClassification

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 patch_size=8, num_labels=3)  # fmt: skip
    theirs = randomize(ViTForImageClassification(HFConfig(**small, image_size=[32, 48])))
    theirs.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 48}).save_pretrained(tmp_path / "vit")
    ours = import_weights("hf", tmp_path / "vit", tmp_path / "ours").eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).logits, atol=1e-5, rtol=1e-4)

    (tmp_path / "vit" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="architecture .* in config.json, which .* lacks"):
        import_weights("hf", tmp_path / "vit", tmp_path / "ours")

    BeitForImageClassification(BeitConfig(**small, image_size=32)).save_pretrained(tmp_path / "b")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="model_type 'beit' .* is not a ViT vitray reads"):
        import_weights("hf", tmp_path / "b", tmp_path / "ours")


def test_a_hf_vit_model_with_its_pooler_converts_to_the_papers_pre_logits(tmp_path):
    """ViTModel's pooler (dense and tanh over the normed class token, as the in21k models
    have it) is the paper's pre-logits layer; exported back to HF's classifier, which has
    none, it would be dropped: refused, nothing written."""
    from transformers import ViTModel

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 patch_size=8, image_size=32)  # fmt: skip
    theirs = randomize(ViTModel(HFConfig(**small), add_pooling_layer=True))
    theirs.save_pretrained(tmp_path / "hf")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "hf")
    ours = import_weights("hf", tmp_path / "hf", tmp_path / "ours").eval()
    assert ours.config.representation_size == 32 and ours.config.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x), theirs(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-4
        )
    with pytest.raises(ValueError, match="no pre-logits layer .*representation_size=32"):
        export_weights("hf", tmp_path / "ours", tmp_path / "back")
    assert not (tmp_path / "back" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(pool="map", class_token=False), "a MAP head"),
        (dict(pool="gap"), "average pooling beside a class token"),
        (dict(norm_eps=1e-5), "norm_eps=1e-05 (read as 1e-6)"),
        (dict(mean=IMAGENET_MEAN, std=IMAGENET_STD), "(read as 0.5)"),
        (dict(image_size=(16, 32)), "a non-square image (16, 32)"),
    ],
)
def test_what_the_papers_npz_cannot_say_is_refused_and_nothing_written(tmp_path, change, named):
    """The .npz holds weights alone: read back (by vitray, timm or big_vision), such a model
    was another function (a MAP head dropped: 16.7 off; eps 1e-3: 0.005)."""
    small = dict(image_size=16, patch_size=8, dim=32, depth=1, num_heads=4, num_classes=3)
    save_checkpoint(ViT(ViTConfig(**{**small, **change})), tmp_path / "ours")
    with pytest.raises(ValueError, match=re.escape(named)):
        export_weights("jax", tmp_path / "ours", tmp_path / "out" / "weights.npz")
    assert not (tmp_path / "out").exists()


def test_a_refused_or_unknown_export_leaves_no_directory(tmp_path):
    config = ViTConfig(image_size=16, patch_size=8, dim=32, depth=1, num_heads=4, num_classes=3,
                       pool="gap", class_token=False)  # fmt: skip
    save_checkpoint(ViT(config), tmp_path / "ours")
    with pytest.raises(ValueError, match="pool='cls'"):
        export_weights("hf", tmp_path / "ours", tmp_path / "hf" / "out")
    with pytest.raises(ValueError, match="unknown target format 'onnx'"):
        export_weights("onnx", tmp_path / "ours", tmp_path / "onnx")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "onnx").exists()
