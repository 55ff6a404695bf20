import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.decode import BadImage, image_bytes, jpeg_header, open_image, pixels, to_rgb
from pipeline.transforms import crop_image

from helpers import encode, photo


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


def test_missing_bytes_are_a_bad_image():
    # Hugging Face's {bytes, path} struct is unpacked by pipeline.readers (test_dataset)
    assert image_bytes(b"abc") == b"abc"
    with pytest.raises(BadImage, match="no image bytes"):
        image_bytes(None)


def test_jpeg_header_matches_pillow(awkward_images):
    """The crop is planned on the header's size and EXIF orientation without Pillow; they
    must be Pillow's."""
    rgb = Image.fromarray(photo((333, 217)))
    jpegs = {
        "baseline": encode(rgb, "JPEG"),
        "progressive": encode(rgb, "JPEG", progressive=True),
        "grayscale": awkward_images["grayscale_jpeg"][0],
        "cmyk": awkward_images["cmyk_jpeg"][0],
    }
    for endian, orientation in (("<", 6), (">", 8)):  # an APP1 segment before the frame
        exif = Image.Exif()
        exif.endian = endian
        exif[0x0112], exif[0x010F] = orientation, "a camera"
        jpegs[f"exif {endian}"] = encode(rgb, "JPEG", exif=exif.tobytes())
    for name, data in jpegs.items():
        img = Image.open(io.BytesIO(data))
        assert jpeg_header(data) == (*img.size, img.getexif().get(0x0112, 1)), name
    assert jpeg_header(jpegs["exif >"])[2] == 8
    for name in ("png_rgba", "palette_gif", "text_named_jpg", "zero_bytes"):
        assert jpeg_header(awkward_images[name][0]) is None, name


def test_only_accepted_formats_are_opened():
    """JPEG, PNG, WebP, GIF, BMP, TIFF; anything else Pillow could parse is a bad image."""
    img = Image.fromarray(photo((64, 48)))
    cfg = DataConfig(dataset="unused", image_size=32)
    for fmt in ("BMP", "TIFF", "WEBP"):
        assert crop_image(encode(img, fmt), cfg, False, None).shape == (32, 32, 3), fmt
    for fmt in ("PPM", "TGA", "PCX", "SGI", "ICO", "EPS", "PDF"):
        data = encode(img, fmt)
        if fmt != "PDF":  # Pillow writes PDF but cannot read it
            assert Image.open(io.BytesIO(data)).format == fmt
        with pytest.raises(BadImage, match=r"not a readable image of an accepted format"):
            crop_image(data, cfg, False, None)
    png = encode(img, "PNG")
    with pytest.raises(BadImage, match="cannot decode"):  # PNG decodes to read its EXIF
        crop_image(png[: len(png) // 2], cfg, False, None)


def test_a_jpeg_declaring_a_huge_frame_is_a_decompression_bomb(awkward_images):
    data = bytearray(awkward_images["jpeg"][0])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (50_000).to_bytes(2, "big") * 2  # 50000 x 50000 declared
    with pytest.raises(BadImage, match="decompression bomb"):
        crop_image(bytes(data), DataConfig(dataset="unused", image_size=64), True, None)
