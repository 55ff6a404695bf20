"""Datasets in the layouts the peers document, written by the peers' own code or byte
layouts: the builders of tests/pipeline/test_layouts.py and tests/e2e/test_layouts_train.py."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage


def png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def class_tree(root: Path, classes: list[str], per_class: int, seed: int = 0) -> None:
    """Class folders as people have them: upper-case extensions, images in nested folders,
    files that are no images (ignored), a hidden folder of thumbnails (skipped)."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext = (".JPEG", ".png", ".Jpg")[i % 3]
            nested = "sub/deeper/" if i % 4 == 3 else ""
            write(root / name / f"{nested}{name}_{i}{ext}", png(seed + 100 * c + i))
        write(root / name / "README.txt", b"not an image")
        write(root / name / "labels.csv", b"file,label\n")
    write(root / ".thumbnails" / "x.png", png(9))


def split_tree(root: Path, val_name: str, per_class: int = 3) -> None:
    """ImageNet's layout: train/<class>, val/<class>, test/<class>; val lacks a class."""
    for s, (split, classes) in enumerate(
        {
            "train": ["n0144", "n0151", "n0201"],
            val_name: ["n0144", "n0201"],
            "test": ["n0151", "n0201"],
        }.items()
    ):
        for c, name in enumerate(classes):
            for i in range(per_class):
                write(root / split / name / f"{name}_{i}.JPEG", png(1000 * s + 100 * c + i))


def write_metadata(folder: Path, rows: list[dict], fmt: str) -> None:
    table = pa.Table.from_pylist(rows)
    if fmt == "csv":
        lines = ["file_name,label", *(f"{r['file_name']},{r['label']}" for r in rows)]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(table, folder / "metadata.parquet")


def idx_bytes(array: np.ndarray) -> bytes:
    """The published IDX layout: two zero bytes, type 0x08 (unsigned byte), the number of
    dimensions, each dimension as a big-endian int32, then the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def idx_folder(raw: Path, gz: bool, n: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for prefix, count in n.items():
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            write(raw / (name + (".gz" if gz else "")), gzip.compress(data) if gz else data)


def hub_train_and_test(root: Path, rows: int = 60) -> None:
    """As the Hub serves CIFAR-10 or Fashion-MNIST: train and test, no validation."""
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])})
    for split, n in (("train", rows), ("test", rows // 5)):
        ds = Dataset.from_dict(
            {
                "image": [{"bytes": png(i), "path": f"{split}/{i}.png"} for i in range(n)],
                "label": [i % 3 for i in range(n)],
            },
            features=features,
        )
        write(root / "data" / f"{split}-00000-of-00001.parquet", b"")
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"), batch_size=5)
