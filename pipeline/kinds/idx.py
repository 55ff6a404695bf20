"""MNIST-format IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`) as
torchvision's MNIST, FashionMNIST and KMNIST keep them in their raw folders: a train and a
test split, the class names torchvision gives the known datasets (named by a folder above
the files), `0`..`9` otherwise. Each image becomes PNG bytes, so that it travels and
decodes as any other image."""

from __future__ import annotations

import dataclasses
import gzip
import io
import posixpath
import re
import struct
import zlib

import numpy as np
from PIL import Image

from pipeline.kinds.base import Rows, SourceKind, Unit, object_array
from pipeline.sources import Listing, Source, SourceError

IDX_FILE = re.compile(r"^(train|t10k)-(images-idx3|labels-idx1)-ubyte(\.gz)?$")
SPLITS = {"train": "train", "t10k": "test"}
ROWS_PER_UNIT = 5_000  # rows read at once; also the grain of a carved val split
# torchvision.datasets.{MNIST,FashionMNIST,KMNIST}.classes, by the folder that names them
KNOWN = {
    "mnist": [
        f"{i} - {w}"
        for i, w in enumerate("zero one two three four five six seven eight nine".split())
    ],
    "fashionmnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}


def dataset_name(path: str) -> str | None:
    """The known dataset that the folder of `path` names (fashion-mnist/...), or the folder
    above it when that is torchvision's raw/ (FashionMNIST/raw/...)."""
    folder = posixpath.dirname(path)
    if posixpath.basename(folder) == "raw":
        folder = posixpath.dirname(folder)
    key = re.sub(r"[-_ ]", "", posixpath.basename(folder).lower())
    return key if key in KNOWN else None


def labels_path(images: str) -> str:
    return images.replace("images-idx3", "labels-idx1")


def read_idx(source: Source, path: str) -> np.ndarray:
    """An IDX file's array (its header gives dtype and shape: uint8 only, as MNIST's)."""
    try:
        with source.filesystem.open_input_stream(path, compression=None) as f:
            data = f.read()
        if path.endswith(".gz"):  # decompressed here: pyarrow detects by extension alone
            data = gzip.decompress(data)
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    except (OSError, EOFError, struct.error, zlib.error) as e:
        raise SourceError(f"cannot read IDX file {path}: {e}") from e
    if zero != 0 or dtype != 0x08:
        raise SourceError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r})")
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path} holds {body.size} bytes, its header says {shape}")
    return body.reshape(shape)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Idx(SourceKind):
    name = "idx"
    layout = "MNIST-format IDX files"

    def claims(self, listing: Listing) -> list[str]:
        return [f for f in listing.files if IDX_FILE.match(posixpath.basename(f))]

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        folders = sorted({posixpath.dirname(f) for f in files})
        if len(folders) > 1:
            raise SourceError(
                f"{listing.spec} holds IDX files in {len(folders)} folders "
                f"{[listing.rel(d) for d in folders]}: point at one of them"
            )
        names = {posixpath.basename(f) for f in files}
        splits = {}
        for prefix, split in SPLITS.items():
            images = [f for f in files if posixpath.basename(f).startswith(f"{prefix}-images")]
            if not images:
                continue
            if posixpath.basename(labels_path(images[0])) not in names:
                raise SourceError(f"{images[0]} has no labels file beside it")
            splits[split] = images[:1]
        if not splits:
            raise SourceError(f"{listing.spec} holds IDX labels but no images: {sorted(names)}")
        known = dataset_name(files[0])
        data = sorted(f for fs in splits.values() for f in fs)
        return Source(
            self.name,
            listing.root,
            listing.filesystem,
            KNOWN.get(known),
            data,
            splits,
            spec=listing.spec,
        )

    def open(self, source: Source) -> Source:
        source = super().open(source)
        rows, groups, top = {}, {}, -1
        for path in source.files:
            images, labels = read_idx(source, path), read_idx(source, labels_path(path))
            if images.ndim != 3 or labels.shape != images.shape[:1]:
                raise SourceError(
                    f"{path}: images {images.shape} and labels {labels.shape} do not pair"
                )
            n, size = len(images), images[0].size
            rows[path] = n
            groups[path] = [
                (min(ROWS_PER_UNIT, n - s), min(ROWS_PER_UNIT, n - s) * size)
                for s in range(0, n, ROWS_PER_UNIT)
            ]
            top = max(top, int(labels.max()) if labels.size else -1)
        classes = source.class_names or [str(i) for i in range(max(top + 1, 10))]
        if top >= len(classes):
            raise SourceError(f"{source.spec}: label {top} is past its {len(classes)} classes")
        return dataclasses.replace(source, class_names=classes, rows=rows, row_groups=groups)

    def read(self, source: Source, unit: Unit) -> Rows:
        path, start = unit["path"], unit["row_group"] * ROWS_PER_UNIT
        stop = start + unit["rows"]
        images = read_idx(source, path)[start:stop]
        labels = read_idx(source, labels_path(path))[start:stop]
        split = SPLITS[posixpath.basename(path).split("-")[0]]
        n = len(images)
        return {
            "image": object_array([png(x) for x in images]),
            "label": labels.astype(np.int64),
            "id": object_array([f"{split}/{i}" for i in range(start, start + n)]),
            "error": object_array([None] * n),
            "path": object_array([path] * n),
            "row": np.arange(start, start + n),
        }
