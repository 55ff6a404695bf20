"""DataConfig: images fed as the weights saw them unless the config says otherwise."""

import pytest

from pipeline.config import DataConfig
from pipeline.transforms import center_crop_box

DEIT = {"interpolation": "bicubic", "crop_fraction": 0.875, "crop_mode": "center"}
HF = {"interpolation": "bilinear", "crop_fraction": 1.0, "crop_mode": "squash"}
META = {"model": {"image_size": [224, 224], "in_chans": 3}, "preprocessing": DEIT}


def test_defaults_are_timms_when_nothing_is_declared():
    assert DataConfig(dataset="x").eval_transform == ("bilinear", 0.875, "center")


def test_a_checkpoints_resize_and_crop_fill_what_the_config_leaves_unset():
    data = DataConfig.for_checkpoint("x", META)
    assert data.size_hw == (224, 224) and data.eval_transform == ("bicubic", 0.875, "center")
    mine = DataConfig.for_checkpoint("x", META, eval_crop_fraction=1.0)  # given: it wins
    assert mine.eval_transform == ("bicubic", 1.0, "center")
    none = DataConfig.for_checkpoint("x", {**META, "preprocessing": None})
    assert none.eval_transform == ("bilinear", 0.875, "center")


def test_a_resize_filter_we_lack_is_a_named_error_not_a_silent_swap():
    lanczos = {**DEIT, "interpolation": "lanczos"}
    with pytest.raises(ValueError, match="lanczos .* set data.interpolation"):
        DataConfig(dataset="x").with_preprocessing(lanczos)
    chosen = DataConfig(dataset="x", interpolation="bicubic").with_preprocessing(lanczos)
    assert chosen.interpolation == "bicubic"  # the user's choice stands


def test_center_and_squash_crops_keep_what_timm_and_hugging_face_keep():
    # timm: the shorter side resized to 224 / 0.875 = 256, then 224 x 224 from the center
    assert center_crop_box(512, 256, (224, 224), 0.875) == pytest.approx((144, 16, 368, 240))
    # Hugging Face: both sides squashed, then the crop keeps 87.5% of each
    assert center_crop_box(512, 256, (224, 224), 0.875, "squash") == pytest.approx(
        (32, 16, 480, 240)
    )
    assert center_crop_box(300, 200, (16, 16), 1.0) == (50, 0, 250, 200)  # no crop: a square


def test_declared_preprocessing_is_checked_and_completed_as_the_checkpoint_reader_does():
    partial = {"interpolation": "bicubic", "crop_fraction": 0.9}  # crop_mode: its default
    assert DataConfig(dataset="x").with_preprocessing(partial).eval_transform == (
        "bicubic", 0.9, "center"
    )  # fmt: skip
    with pytest.raises(ValueError, match="crop_fraction 1.5"):
        DataConfig(dataset="x").with_preprocessing({**partial, "crop_fraction": 1.5})
