"""Shared fixtures: a real local Ray, and real image bytes of every awkward kind."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
# Ray Train's controller polls workers every 2 s; every report waits for it (FIELD-NOTES:
# a 10-step run took 34 s at 2 s, 11 s at 0.1). Set before Ray starts so actors inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session, 2 CPUs, no dashboard."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> np.ndarray:
    """A real photo crop (scikit-learn's sample images), (H, W, 3) uint8."""
    from sklearn.datasets import load_sample_images

    img = load_sample_images().images[seed % 2]
    w, h = size
    return np.asarray(Image.fromarray(img).resize((w, h)))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decompression_bomb_png() -> bytes:
    """A tiny PNG whose header declares 100000 x 100000 pixels."""
    raw = zlib.compress(b"\x00" * 16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def awkward_images() -> dict[str, tuple[bytes, bool]]:
    """name -> (encoded bytes, usable?) for every case the pipeline must handle."""
    rgb = Image.fromarray(photo())
    good_jpeg = encode(rgb, "JPEG", quality=90)
    sixteen = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    return {
        "jpeg": (good_jpeg, True),
        "png_rgba": (encode(rgb.convert("RGBA"), "PNG"), True),
        "grayscale_jpeg": (encode(rgb.convert("L"), "JPEG"), True),
        "cmyk_jpeg": (encode(rgb.convert("CMYK"), "JPEG"), True),
        "png_16bit": (encode(sixteen, "PNG"), True),
        "palette_gif": (encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"), True),
        "truncated_jpeg": (good_jpeg[: len(good_jpeg) // 2], False),
        "zero_bytes": (b"", False),
        "text_named_jpg": (b"this is a text file, not an image\n", False),
        "decompression_bomb": (decompression_bomb_png(), False),
    }
