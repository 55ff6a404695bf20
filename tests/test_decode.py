import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.decode import BadImage, image_bytes, open_image, pixels, to_rgb
from pipeline.transforms import crop_image


@pytest.mark.parametrize("train", [True, False])
def test_every_awkward_image_is_decoded_or_rejected_with_a_reason(awkward_images, train):
    cfg = DataConfig(dataset="unused", image_size=64)
    rng = np.random.default_rng(0)
    for name, (data, usable) in awkward_images.items():
        if usable:
            out = crop_image(data, cfg, train, rng)
            assert out.shape == (64, 64, 3) and out.dtype == np.uint8, name
            assert out.std() > 1, f"{name} decoded to a flat image"
        else:
            with pytest.raises(BadImage):
                crop_image(data, cfg, train, rng)


def test_alpha_is_composited_on_white(awkward_images):
    from PIL import Image

    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img = to_rgb(transparent)
    assert img.mode == "RGB" and np.asarray(img).min() == 255


def test_decompression_bomb_is_named(awkward_images):
    with pytest.raises(BadImage, match="decompression bomb"):
        open_image(awkward_images["decompression_bomb"][0])


def test_zero_copy_pixels_match_numpy_view(awkward_images):
    img = open_image(awkward_images["jpeg"][0])
    img.load()
    view = pixels(img)
    np.testing.assert_array_equal(view[..., :3], np.asarray(img))


def test_hf_struct_and_missing_bytes():
    assert image_bytes({"bytes": b"abc", "path": "x.jpg"}) == b"abc"
    with pytest.raises(BadImage):
        image_bytes({"bytes": None, "path": "x.jpg"})
