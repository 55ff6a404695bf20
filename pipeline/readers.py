"""One reader per kind of source, so that `vitray prepare`, the Ray tasks of `build_dataset`
and `vitray bench data`'s DataLoader all see the same rows of the same files.

A reader plans read units on the driver (`plan_units`: a Parquet row group, a WebDataset
tar, a chunk of folder files) and reads one unit wherever the rows are needed
(`read_unit`), as columns {image (encoded bytes, None when missing), label, id[, path,
row]}; `path` and `row` say where a bad image came from. Hugging Face's `{bytes, path}`
image struct is unpacked here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.sources import Source, SourceError, resolve_source

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


def footer(source: Source, path: str) -> pq.FileMetaData:
    """A Parquet file's footer (metadata only), its columns checked."""
    try:
        meta = pq.read_metadata(path, filesystem=source.filesystem)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot read Parquet file {path}: {e}") from e
    names = meta.schema.to_arrow_schema().names
    missing = [c for c in ("image", "label") if c not in names]
    if missing:
        raise SourceError(f"shard {path} has no column(s) {missing}; it has {names}")
    return meta


def open_parquet(source: Source) -> Source:
    """Rows and row groups of every file: from the manifest, else from the footers, read
    here, on the driver, before any task runs."""
    known = {}
    for split in (source.manifest or {"splits": {}})["splits"].values():
        for shard in split["shards"]:
            if "row_groups" in shard:
                path = posixpath.join(source.root, shard["file"])
                known[path] = (shard["rows"], shard["row_groups"])
    for path in source.split_files("all"):
        if path not in known:
            meta = footer(source, path)
            known[path] = (meta.num_rows, meta.num_row_groups)
    return dataclasses.replace(
        source,
        rows={path: rows for path, (rows, _) in known.items()},
        row_groups={path: groups for path, (_, groups) in known.items()},
    )


def parquet_units(source: Source, files: list[str]) -> list[Unit]:
    """One unit per row group."""
    return [
        Unit(path=path, row_group=g, files=[])
        for path in files
        for g in range(source.row_groups[path])
    ]


def parquet_rows(source: Source, files: list[str]) -> int:
    return sum(source.rows[path] for path in files)


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
    """How one kind of source is opened, counted, planned and read."""

    open: Callable[[Source], Source]
    rows: Callable[[Source, list[str]], int | None]  # None: unknown without reading
    units: Callable[[Source, list[str]], list[Unit]]
    read: Callable[[Source, Unit], Rows]


READERS = {
    "vitray": Reader(open_parquet, parquet_rows, parquet_units, read_parquet),
    "hf_parquet": Reader(open_parquet, parquet_rows, parquet_units, read_parquet),
    "webdataset": Reader(lambda s: s, lambda s, files: None, tar_units, read_tar),
    "folder": Reader(lambda s: s, lambda s, files: len(files), folder_units, read_folder),
}


def open_source(spec: str) -> Source:
    """`resolve_source`, then what the source's reader learns on the driver."""
    source = resolve_source(spec)
    return READERS[source.kind].open(source)


def count_rows(source: Source, files: list[str]) -> int | None:
    """The rows of `files`, from metadata only; None where that needs reading them."""
    return READERS[source.kind].rows(source, files)


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
