"""Shared builders for the tests: jobs run as the commands run them."""

from __future__ import annotations

import io
import socket
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jobs.config import JobConfig
from jobs.tracking.tracker import MlflowTracker
from jobs.training.fit import Outcome, fit
from jobs.training.search import SearchOutcome, search

ROOT = Path(__file__).resolve().parents[1]  # the repository


def tracked_fit(cfg: JobConfig, **kwargs: Any) -> Outcome:
    """`vitray pretrain`/`finetune`: fit with the config's MLflow tracker."""
    return fit(cfg, MlflowTracker(cfg.mlflow), **kwargs)


def tracked_search(cfg: JobConfig) -> SearchOutcome:
    """`vitray tune`: a search with the config's MLflow tracker."""
    return search(cfg, MlflowTracker(cfg.mlflow))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
