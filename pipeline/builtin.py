"""Built-in datasets made from real data shipped in scikit-learn (nothing is downloaded).

- `digits`: the 1,797 real 8x8 handwritten digits (UCI), as PNG bytes, with a fixed
  stratified train/val/test split.
- `fashion-mnist`: Zalando's 70,000 28x28 clothing images in 10 classes, from Debian's
  `dataset-fashion-mnist` package (read by the IDX reader; its test split is held out).
- `photos`: JPEG crops of scikit-learn's two sample photographs at realistic sizes
  (256-500 px), labelled by photo and by the quadrant the crop is centred in (8 classes):
  for throughput tests and benchmarks.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image

from pipeline.sources import SourceError

DIGIT_CLASSES = [str(i) for i in range(10)]
PHOTO_CLASSES = [
    f"{photo}-{row}-{col}"
    for photo in ("china", "flower")
    for row in ("top", "bottom")
    for col in ("left", "right")
]


@dataclass
class Item:
    """One image to prepare: its id, label, split (None: to be assigned) and its bytes."""

    id: str
    label: int
    split: str | None
    read: Callable[[], bytes]


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def digits_items(seed: int = 0) -> list[Item]:
    """Digits with a fixed stratified split: 70% train, 10% val, 20% test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    index = np.arange(len(pixels))
    rest, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=seed)
    train, val = train_test_split(
        rest, test_size=0.125, stratify=digits.target[rest], random_state=seed
    )
    split_of = {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val")}
    split_of.update(dict.fromkeys(test, "test"))
    return [
        Item(
            f"digits/{i:04d}", int(digits.target[i]), split_of[i], lambda i=i: png_bytes(pixels[i])
        )
        for i in index
    ]


def _photo_crop(i: int, seed: int, photos: list[np.ndarray]) -> tuple[Callable[[], bytes], int]:
    """A random square crop, resized to 256-500 px: (its JPEG encoder, its label)."""
    rng = np.random.default_rng([seed, i])
    which = int(rng.integers(len(photos)))
    photo = photos[which]
    h, w = photo.shape[:2]
    side = int(rng.integers(96, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out = int(rng.integers(256, 501))

    def encode() -> bytes:
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((out, out))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    row, col = int(top + side / 2 >= h / 2), int(left + side / 2 >= w / 2)
    return encode, which * 4 + row * 2 + col


def photos_items(n: int = 2000, seed: int = 0) -> list[Item]:
    """`n` crops; encoding happens when an item is read, so it runs in parallel."""
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    items = []
    for i in range(n):
        encode, label = _photo_crop(i, seed, photos)
        items.append(Item(f"photos/{i:06d}", label, None, encode))
    return items


FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
BUILTINS = ("digits", "photos", "fashion-mnist")


def fashion_mnist_dir() -> str:
    """Where Debian keeps Fashion-MNIST's IDX files ($VITRAY_FASHION_MNIST overrides it)."""
    path = Path(os.environ.get("VITRAY_FASHION_MNIST", FASHION_MNIST))
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        raise SourceError(
            f"builtin:fashion-mnist reads Debian's package, not found at {path}: "
            "sudo apt-get install dataset-fashion-mnist"
        )
    return str(path)


def parse_builtin(spec: str) -> tuple[str, dict[str, int]]:
    name, _, query = spec.removeprefix("builtin:").partition("?")
    if name not in BUILTINS:
        raise SourceError(f"unknown built-in dataset {name!r}; choose one of {list(BUILTINS)}")
    try:
        options = {k: int(v) for k, v in parse_qsl(query, strict_parsing=bool(query))}
    except ValueError as e:
        raise SourceError(f"bad options in {spec!r}: use builtin:photos?n=2000&seed=0") from e
    allowed = {"digits": {"seed"}, "photos": {"seed", "n"}, "fashion-mnist": set()}[name]
    unknown = set(options) - allowed
    if unknown:
        raise SourceError(f"unknown options for builtin:{name}: {sorted(unknown)}")
    return name, options


def builtin_items(spec: str) -> tuple[list[Item], list[str]]:
    """The items of digits or photos (made here) and their class names."""
    name, options = parse_builtin(spec)
    if name == "digits":
        return digits_items(**options), DIGIT_CLASSES
    return photos_items(**options), PHOTO_CLASSES
