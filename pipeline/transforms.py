"""Per-image crops and the batch function Ray Data maps over encoded images.

Crops are chosen on the header's size first, so that the JPEG decoder can skip the
resolution the crop throws away (see `pipeline.decode`). Output: uint8 patches in the
layout of `vit.patchify`; normalisation happens on the device.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import DataConfig
from pipeline.decode import (
    UPRIGHT,
    BadImage,
    check_size,
    image_bytes,
    image_orientation,
    jpeg_header,
    load,
    open_image,
    pixels,
    to_rgb,
)
from vit.patches import patchify

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


class StrictModeError(RuntimeError):
    """A bad image in strict mode: the message names the shard and the row."""


def random_resized_crop_box(
    w: int, h: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> Box:
    """torchvision's RandomResizedCrop box: random area and aspect, center crop fallback."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return float(left), float(top), float(left + cw), float(top + ch)
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) / 2, (h - ch) / 2
    return left, top, left + cw, top + ch


def center_crop_box(
    w: int, h: int, out_hw: tuple[int, int], crop_fraction: float, mode: str = "center"
) -> Box:
    """The region that 'resize to size/crop_fraction, then center-crop to size' keeps:
    resizing the shorter side (`center`: timm, torchvision) or both sides (`squash`:
    Hugging Face's processors, which then keep `crop_fraction` of each side)."""
    th, tw = out_hw
    if mode == "squash":
        cw, ch = w * crop_fraction, h * crop_fraction
    else:
        scale = max(th / h, tw / w) / crop_fraction  # source -> resized
        cw, ch = min(w, tw / scale), min(h, th / scale)
    left, top = (w - cw) / 2, (h - ch) / 2
    return left, top, left + cw, top + ch


@cache
def _randaugment(num_ops: int, magnitude: int) -> Any:
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(..., H, W) as stored -> upright: `PIL.ImageOps.exif_transpose` on a tensor."""
    transpose, flips = UPRIGHT[orientation]
    if transpose:
        pixels = pixels.transpose(-1, -2)
    return pixels.flip(flips) if flips else pixels


def decode_region(
    data: bytes,
    size: tuple[int, int],
    img: Image.Image | None,
    box: Box,
    out_hw: tuple[int, int],
    channels: int,
    max_pixels: int,
    orientation: int = 1,
) -> tuple[torch.Tensor, Box]:
    """Decode for a crop: (1, K, H, W) uint8 tensor, upright, and the box in its pixels.

    `size` and `box` are in the upright image: the stored one turned by its EXIF
    `orientation`. `img` is the image opened by Pillow, or None for a JPEG whose size came
    from its header.
    A JPEG whose crop is at least twice the output decodes at 1/2, 1/4 or 1/8 scale in PIL's
    DCT (`draft`); other JPEGs decode with torchvision's libjpeg-turbo binding, measured 20%
    faster than PIL's and straight into a tensor (no Pillow-to-array copy); other formats
    go through PIL and any mode is converted to RGB (or L).
    """
    w, h = size
    (th, tw), bw, bh = out_hw, box[2] - box[0], box[3] - box[1]
    jpeg = img is None or img.format == "JPEG"
    if jpeg and not (bw >= 2 * tw and bh >= 2 * th):
        # here, not at the top: torchvision's package import (models, ops, torch._dynamo)
        # costs every Ray process that loads this module seconds, PNG-only ones for nothing
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        try:
            full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        except RuntimeError as e:  # truncated or corrupt stream
            raise BadImage(f"cannot decode: {e}") from e
        return orient(full[None], orientation), box
    img = img or open_image(data, max_pixels)
    need = (math.ceil(w * tw / bw), math.ceil(h * th / bh))  # upright
    img = load(img, min_size=need[::-1] if UPRIGHT[orientation][0] else need)
    with warnings.catch_warnings():  # a read-only view is fine: it is only read
        warnings.simplefilter("ignore", UserWarning)
        full = torch.from_numpy(pixels(to_rgb(img, channels))).permute(2, 0, 1)[None]
    full = orient(full, orientation)
    sx, sy = full.shape[3] / w, full.shape[2] / h  # the decoder's reduction, if any
    return full, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def crop_image(data: bytes, cfg: DataConfig, train: bool, rng: np.random.Generator) -> np.ndarray:
    """Encoded image -> (H, W, C) uint8 at `cfg.image_size`; raises BadImage.

    The crop is chosen on the header's size, the image decoded only as large as the crop
    needs and turned upright by its EXIF orientation, then resized by torch's uint8
    antialiased kernel on channels-last memory (`data.interpolation`; bilinear by default,
    the filter of torchvision's RandomResizedCrop; 3.8x faster than PIL's resize here).
    """
    header, img = jpeg_header(data), None
    if header is not None:
        w, h, orientation = header
        check_size(w, h, cfg.max_pixels)
    else:
        img = open_image(data, cfg.max_pixels)
        (w, h), orientation = img.size, image_orientation(img)
    if UPRIGHT[orientation][0]:  # transposed: the upright image is h x w
        w, h = h, w
    th, tw = cfg.size_hw
    interpolation, crop_fraction, crop_mode = cfg.eval_transform
    if train:
        box = random_resized_crop_box(w, h, rng, cfg.crop_scale, cfg.crop_ratio)
    else:
        box = center_crop_box(w, h, (th, tw), crop_fraction, crop_mode)
    full, box = decode_region(
        data, (w, h), img, box, (th, tw), cfg.channels, cfg.max_pixels, orientation
    )
    left, top = round(box[0]), round(box[1])
    right, bottom = max(left + 1, round(box[2])), max(top + 1, round(box[3]))
    crop = full[:, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)
    if crop.shape[2:] != (th, tw):
        crop = F.interpolate(
            crop, size=(th, tw), mode=interpolation, antialias=interpolation != "nearest"
        )
    crop = crop[:, : cfg.channels]  # drop Pillow's RGBX padding once the image is small
    if train and cfg.randaugment is not None:
        crop = _randaugment(cfg.randaugment.num_ops, cfg.randaugment.magnitude)(crop)
    out = crop[0].permute(1, 2, 0)  # (H, W, C)
    if train and cfg.hflip and rng.random() < 0.5:
        out = out.flip(1)
    return out.numpy()


def _where(batch: dict[str, np.ndarray], i: int) -> str:
    parts = []
    if "path" in batch:
        parts.append(f"shard {batch['path'][i]}")
    if "row" in batch:
        parts.append(f"row {batch['row'][i]}")
    if "id" in batch:
        parts.append(f"id {batch['id'][i]!r}")
    return ", ".join(parts) or f"row {i} of a batch"


def preprocess_batch(
    batch: dict[str, np.ndarray],
    cfg: DataConfig,
    patch_size: int,
    train: bool,
    num_classes: int | None = None,
    keep_ids: bool = False,
    keep_errors: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: {image, label, ...} -> {patches, label, ok[, id]
    [, error]}.

    Bad rows stay in the batch with `ok=False`, `label=-1` and zero patches, so that every
    consumer can count them exactly (and with `keep_errors`, say why); in strict mode the
    first one raises StrictModeError.
    """
    n = len(batch["image"])
    th, tw = cfg.size_hw
    pixels = np.zeros((n, th, tw, cfg.channels), dtype=np.uint8)
    labels = batch["label"].astype(np.int64) if "label" in batch else np.full(n, -1, np.int64)
    errors = batch.get("error", [None] * n)
    ok = np.ones(n, dtype=bool)
    why = np.full(n, None, dtype=object)
    rng = np.random.default_rng()  # fresh OS entropy per batch, as DataLoader workers do
    for i in range(n):
        try:
            if errors[i] is not None:  # known bad by its reader (pipeline.readers)
                raise BadImage(errors[i])
            if num_classes is not None and not 0 <= labels[i] < num_classes:
                raise BadImage(f"label {labels[i]} outside [0, {num_classes})")
            pixels[i] = crop_image(image_bytes(batch["image"][i]), cfg, train, rng)
        except BadImage as e:
            if cfg.strict:
                raise StrictModeError(f"bad image at {_where(batch, i)}: {e}") from e
            log.warning("skipping bad image at %s: %s", _where(batch, i), e)
            ok[i], labels[i], why[i] = False, -1, str(e)
    out = {"patches": patchify(pixels, patch_size), "label": labels, "ok": ok}
    if keep_ids and "id" in batch:
        out["id"] = batch["id"]
    if keep_errors:
        out["error"] = why
    return out
