"""One reader per kind of source, so that `vitray prepare`, the Ray tasks of `build_dataset`
and `vitray bench data`'s DataLoader all see the same rows of the same files.

A reader plans read units on the driver (`plan_units`: a Parquet row group, a WebDataset
tar, a chunk of folder files) and reads one unit wherever the rows are needed
(`read_unit`), as columns {image (encoded bytes, None when missing), label, id[, path,
row]}; `path` and `row` say where a bad image came from. Hugging Face's `{bytes, path}`
image struct is unpacked here and nowhere else.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.sources import Source, SourceError

Rows = dict[str, np.ndarray]
FILES_PER_UNIT = 256  # image-folder files read by one task
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
LABEL_EXTENSION = "cls"
# webdataset's `base_plus_ext`: the key is the member path up to the first dot of its base
# name, directories included; the rest is the extension. Members without a dot are skipped.
WDS_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class Unit(TypedDict):
    """What one task reads at once. Every kind fills every key (unused: "", -1, []) so that
    units are the rows of one Ray Dataset."""

    path: str  # a Parquet file or a tar
    row_group: int
    files: list[str]  # folder files


def object_array(values: list) -> np.ndarray:
    """A 1-D object array, even of equal-length bytes (np.array would make a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# Parquet: vitray shards and Hugging Face downloads ------------------------------------------


def parquet_units(source: Source, files: list[str]) -> list[Unit]:
    """One unit per row group; counts come from the manifest, else from the footers, whose
    columns are checked here, on the driver, before any task runs."""
    known = {}
    if source.manifest is not None:
        for split in source.manifest["splits"].values():
            for shard in split["shards"]:
                known[posixpath.join(source.root, shard["file"])] = shard.get("row_groups")
    units = []
    for path in files:
        groups = known.get(path)
        if not groups:
            try:
                pf = pq.ParquetFile(path, filesystem=source.filesystem)
            except OSError as e:
                raise SourceError(f"cannot read shard {path}: {e}") from e
            names = pf.schema_arrow.names
            missing = [c for c in ("image", "label") if c not in names]
            if missing:
                raise SourceError(f"shard {path} has no column(s) {missing}; it has {names}")
            groups = pf.metadata.num_row_groups
        units += [Unit(path=path, row_group=g, files=[]) for g in range(groups)]
    return units


def read_parquet(source: Source, unit: Unit) -> Rows:
    """A row group; `row` counts from the start of the file. Ids come from an `id` column,
    else from Hugging Face's image paths, else are None."""
    path, group = unit["path"], unit["row_group"]
    pf = pq.ParquetFile(path, filesystem=source.filesystem)
    columns = [c for c in ("id", "image", "label") if c in pf.schema_arrow.names]
    table = pf.read_row_group(group, columns=columns)
    image = table.column("image")
    ids = table.column("id") if "id" in columns else None
    if pa.types.is_struct(image.type):  # Hugging Face's Image feature: {bytes, path}
        if ids is None and "path" in [f.name for f in image.type]:
            ids = pc.struct_field(image, "path")
        image = pc.struct_field(image, "bytes")
    n = table.num_rows
    start = sum(pf.metadata.row_group(g).num_rows for g in range(group))
    return {
        "image": image.to_numpy(zero_copy_only=False),
        "label": table.column("label").to_numpy(),
        "id": object_array([None] * n) if ids is None else ids.to_numpy(zero_copy_only=False),
        "path": object_array([path] * n),
        "row": np.arange(start, start + n),
    }


# WebDataset tars ------------------------------------------------------------------------------


def tar_units(source: Source, files: list[str]) -> list[Unit]:
    return [Unit(path=path, row_group=-1, files=[]) for path in files]


def read_tar(source: Source, unit: Unit) -> Rows:
    """The samples of one tar, as webdataset groups them: consecutive members that share a
    key; a repeated extension starts a new sample, so two samples that share a key stay
    two. Samples without a label are skipped; a labelled one without an image is a row
    without bytes (counted as bad downstream)."""
    path = unit["path"]
    wanted = {*IMAGE_EXTENSIONS, LABEL_EXTENSION}
    samples: list[tuple[str, dict[str, bytes]]] = []
    with (
        source.filesystem.open_input_stream(path) as stream,
        tarfile.open(fileobj=stream, mode="r|*") as tar,
    ):
        for member in tar:
            match = WDS_MEMBER.match(member.name) if member.isfile() else None
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if not samples or samples[-1][0] != key or ext in samples[-1][1]:
                samples.append((key, {}))
            if ext in wanted:
                samples[-1][1][ext] = tar.extractfile(member).read()
    labelled = [(key, fields) for key, fields in samples if LABEL_EXTENSION in fields]
    images = [next((f[e] for e in IMAGE_EXTENSIONS if e in f), None) for _, f in labelled]
    return {
        "image": object_array(images),
        "label": np.array(
            [int(f[LABEL_EXTENSION].decode().strip()) for _, f in labelled], dtype=np.int64
        ),
        "id": object_array([key for key, _ in labelled]),
        "path": object_array([path] * len(labelled)),
    }


# Image folders: one subfolder per class ---------------------------------------------------------


def folder_units(source: Source, files: list[str]) -> list[Unit]:
    chunks = [files[i : i + FILES_PER_UNIT] for i in range(0, len(files), FILES_PER_UNIT)]
    return [Unit(path="", row_group=-1, files=chunk) for chunk in chunks]


def read_folder(source: Source, unit: Unit) -> Rows:
    """Ids are paths relative to the root; a file that cannot be read has no bytes."""
    index = {name: i for i, name in enumerate(source.class_names or [])}
    rel = [posixpath.relpath(f, source.root) for f in unit["files"]]
    images = []
    for f in unit["files"]:
        try:
            with source.filesystem.open_input_stream(f) as stream:
                images.append(stream.read())
        except OSError:
            images.append(None)  # counted as a bad image downstream
    return {
        "image": object_array(images),
        "label": np.array([index[r.split("/")[0]] for r in rel], dtype=np.int64),
        "id": object_array(rel),
    }


# Dispatch -----------------------------------------------------------------------------------------


class Reader(NamedTuple):
    """How one kind of source is planned and read."""

    units: Callable[[Source, list[str]], list[Unit]]
    read: Callable[[Source, Unit], Rows]


READERS = {
    "vitray": Reader(parquet_units, read_parquet),
    "hf_parquet": Reader(parquet_units, read_parquet),
    "webdataset": Reader(tar_units, read_tar),
    "folder": Reader(folder_units, read_folder),
}


def plan_units(source: Source, files: list[str]) -> list[Unit]:
    """The read units of `files`, on the driver."""
    return READERS[source.kind].units(source, files)


def read_unit(source: Source, unit: Unit) -> Rows:
    """The rows of one unit, in file order."""
    return READERS[source.kind].read(source, unit)


def batches(rows: Rows, size: int) -> Iterator[Rows]:
    """`rows` `size` at a time."""
    for start in range(0, len(rows["label"]), size):
        yield {key: column[start : start + size] for key, column in rows.items()}
