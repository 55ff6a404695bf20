import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.config import DataConfig
from pipeline.transforms import (
    StrictModeError,
    center_crop_box,
    crop_image,
    preprocess_batch,
    random_resized_crop_box,
)
from vit import patchify

from helpers import encode, photo


def test_random_resized_crop_boxes_stay_inside_and_vary():
    rng = np.random.default_rng(0)
    boxes = [
        random_resized_crop_box(400, 300, rng, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(200)
    ]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
    areas = [(r - left) * (b - t) / (400 * 300) for left, t, r, b in boxes]
    assert min(areas) < 0.2 and max(areas) > 0.8


def test_center_crop_box_keeps_crop_fraction_of_shorter_side():
    left, top, right, bottom = center_crop_box(400, 300, (224, 224), 0.875)
    assert right - left == pytest.approx(0.875 * 300) and bottom - top == pytest.approx(0.875 * 300)
    assert left == pytest.approx((400 - 0.875 * 300) / 2)


def test_eval_batch_is_deterministic_and_exact_at_native_size():
    pixels = photo((64, 64))
    png = encode(Image.fromarray(pixels), "PNG")
    cfg = DataConfig(dataset="unused", image_size=64, eval_crop_fraction=1.0)
    batch = {"image": np.array([png, png], dtype=object), "label": np.array([1, 2])}
    out = preprocess_batch(batch, cfg, patch_size=16, train=False)
    assert out["patches"].shape == (2, 16, 16 * 16 * 3) and out["patches"].dtype == np.uint8
    # no resize needed: the patches are exactly vit.patchify of the pixels
    np.testing.assert_array_equal(out["patches"][0], patchify(pixels[None], 16)[0])
    again = preprocess_batch(batch, cfg, patch_size=16, train=False)
    np.testing.assert_array_equal(out["patches"], again["patches"])


def test_bad_rows_are_kept_flagged_and_counted(awkward_images):
    names = list(awkward_images)
    batch = {
        "image": np.array([awkward_images[n][0] for n in names] + [b""], dtype=object)[:-1],
        "label": np.zeros(len(names), dtype=np.int64),
    }
    batch["label"][0] = 7  # out of range for 5 classes
    cfg = DataConfig(dataset="unused", image_size=32)
    out = preprocess_batch(batch, cfg, patch_size=16, train=True, num_classes=5)
    expected_ok = [awkward_images[n][1] for n in names]
    expected_ok[0] = False
    assert out["ok"].tolist() == expected_ok
    assert (out["label"][~out["ok"]] == -1).all()
    assert (out["patches"][~out["ok"]] == 0).all()


def test_strict_mode_names_shard_and_row(awkward_images):
    data = awkward_images["truncated_jpeg"][0]
    batch = {
        "image": np.array([awkward_images["jpeg"][0], data], dtype=object),
        "label": np.array([0, 1]),
        "path": np.array(["s3://bucket/train-00003.parquet"] * 2, dtype=object),
        "row": np.array([41, 42]),
    }
    cfg = DataConfig(dataset="unused", image_size=32, strict=True)
    with pytest.raises(StrictModeError, match=r"train-00003\.parquet, row 42"):
        preprocess_batch(batch, cfg, patch_size=16, train=True)


def test_randaugment_and_grayscale_models():
    png = encode(Image.fromarray(photo((80, 60))), "PNG")
    batch = {"image": np.array([png] * 3, dtype=object), "label": np.array([0, 1, 2])}
    cfg = DataConfig(dataset="unused", image_size=32, randaugment={"num_ops": 2, "magnitude": 9})
    assert preprocess_batch(batch, cfg, 16, train=True)["ok"].all()
    gray = DataConfig(dataset="unused", image_size=32, channels=1)
    assert preprocess_batch(batch, gray, 16, train=False)["patches"].shape == (3, 4, 256)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_every_decode_path(orientation):
    """Images come out as `PIL.ImageOps.exif_transpose` shows them: JPEGs decoded by
    torchvision and by Pillow's reduced-scale draft, PNG and WebP by Pillow."""
    stored = Image.fromarray(photo((160, 96)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    cases = {  # name: (bytes, output size, mean |difference| allowed)
        "jpeg": (jpeg, 48, 0.5),  # an 84 px crop to 48 px: torchvision's decode_jpeg
        "jpeg draft": (jpeg, 16, 8),  # to 16 px: decoded at 1/2 scale, then resized
        "png": (encode(stored, "PNG", exif=exif.tobytes()), 48, 0.5),
        "webp": (encode(stored, "WEBP", lossless=True, exif=exif.tobytes()), 48, 0.5),
    }
    for name, (data, size, tolerance) in cases.items():
        cfg = DataConfig(dataset="unused", image_size=size)
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        expected = crop_image(encode(shown, "PNG"), cfg, False, None).astype(int)
        out = crop_image(data, cfg, False, None).astype(int)
        assert np.abs(out - expected).mean() < tolerance, name
        if orientation != 1:  # as stored, it would be another image
            stored_crop = crop_image(encode(stored, "PNG"), cfg, False, None)
            assert np.abs(out - stored_crop).mean() > 30, name
