"""One reader per kind of source, so that `vitray prepare`, the Ray tasks of `build_dataset`
and `vitray bench data`'s DataLoader all see the same rows of the same files.

A reader plans read units on the driver (`plan_units`: a Parquet row group, a WebDataset
tar, a chunk of folder files) and reads one unit wherever the rows are needed
(`read_unit`), as columns {image (encoded bytes, None when missing), label, id[, path,
row]}; `path` and `row` say where a bad image came from. Hugging Face's features (which
column is the Image, which the ClassLabel) are read and its `{bytes, path}` image struct
unpacked here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
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
    """A Parquet file's footer: metadata only."""
    try:
        return pq.read_metadata(path, filesystem=source.filesystem)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot read Parquet file {path}: {e}") from e


def hf_features(schema: pa.Schema) -> dict[str, dict]:
    """Column -> Hugging Face feature, from the `huggingface` schema metadata that `datasets`
    writes ({} without it)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    return json.loads(meta).get("info", {}).get("features", {}) if meta else {}


def find_column(path: str, schema: pa.Schema, role: str, feature: str) -> str:
    """The one column that holds a Hugging Face `feature` (Image, ClassLabel), else the
    column named `role`."""
    typed = [name for name, f in hf_features(schema).items() if f.get("_type") == feature]
    choose = f"choose one with data.{role}_column (vitray prepare --{role}-column)"
    if len(typed) > 1:
        raise SourceError(f"{path} has {len(typed)} {feature} columns {typed}: {choose}")
    if typed:
        return typed[0]
    if role in schema.names:
        return role
    raise SourceError(
        f"{path} has no {role} column (no {feature} feature, no column named {role!r}); "
        f"its columns are {schema.names}: {choose}"
    )


def check_columns(source: Source, path: str, schema: pa.Schema) -> None:
    """The image column holds encoded bytes (binary, or Hugging Face's {bytes, path}
    struct), the label column integers."""
    for role, column in (("image", source.image_column), ("label", source.label_column)):
        if column not in schema.names:
            raise SourceError(
                f"{path} has no {role} column {column!r}; its columns are {schema.names}"
            )
    image = schema.field(source.image_column).type
    if pa.types.is_struct(image):
        image = image.field("bytes").type if image.get_field_index("bytes") >= 0 else image
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)):
        raise SourceError(
            f"{path}: image column {source.image_column!r} is {image}, not encoded image bytes"
        )
    label = schema.field(source.label_column).type
    if not pa.types.is_integer(label):
        raise SourceError(
            f"{path}: label column {source.label_column!r} is {label}; labels are class indices"
        )


def parquet_roles(source: Source, footers: dict[str, pq.FileMetaData]) -> Source:
    """The image and label columns: given, else the one Image and the one ClassLabel
    feature of the first file, else the columns named image and label; class names from
    the ClassLabel. A vitray dataset's are image and label."""
    if source.kind == "vitray":
        given = {"image": source.image_column, "label": source.label_column}
        wrong = {role: column for role, column in given.items() if column not in (None, role)}
        if wrong:
            raise SourceError(
                f"{source.spec} is a vitray dataset: its columns are image and label, not {wrong}"
            )
        return dataclasses.replace(source, image_column="image", label_column="label")
    path, meta = next(iter(footers.items()))
    schema = meta.schema.to_arrow_schema()
    image = source.image_column or find_column(path, schema, "image", "Image")
    label = source.label_column or find_column(path, schema, "label", "ClassLabel")
    feature = hf_features(schema).get(label, {})
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return dataclasses.replace(source, image_column=image, label_column=label, class_names=names)


def open_parquet(source: Source) -> Source:
    """Columns, rows and row groups of every file: from the manifest, else from the
    footers, checked here, on the driver, before any task runs."""
    known = {}
    for split in (source.manifest or {"splits": {}})["splits"].values():
        for shard in split["shards"]:
            if "row_groups" in shard:
                known[posixpath.join(source.root, shard["file"])] = (
                    shard["rows"],
                    shard["row_groups"],
                )
    files = source.split_files("all")
    footers = {path: footer(source, path) for path in files if path not in known}
    source = parquet_roles(source, footers)
    for path, meta in footers.items():
        check_columns(source, path, meta.schema.to_arrow_schema())
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
    roles = [source.image_column, source.label_column]
    columns = [*roles, *(["id"] if "id" in pf.schema_arrow.names else [])]
    table = pf.read_row_group(group, columns=list(dict.fromkeys(columns)))
    image = table.column(source.image_column)
    ids = table.column("id") if "id" in columns else None
    if pa.types.is_struct(image.type):  # Hugging Face's Image feature: {bytes, path}
        if ids is None and "path" in [f.name for f in image.type]:
            ids = pc.struct_field(image, "path")
        image = pc.struct_field(image, "bytes")
    n = table.num_rows
    start = sum(pf.metadata.row_group(g).num_rows for g in range(group))
    return {
        "image": image.to_numpy(zero_copy_only=False),
        "label": table.column(source.label_column).to_numpy(),
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


def open_source(
    spec: str, image_column: str | None = None, label_column: str | None = None
) -> Source:
    """`resolve_source`, then what its reader learns on the driver: where the images and
    labels are (given, else detected), class names, counts."""
    source = resolve_source(spec)
    if source.kind == "folder" and (image_column or label_column):
        raise SourceError(
            f"{spec} is an image folder: its labels are its subfolders; "
            "data.image_column and data.label_column do not apply"
        )
    source = dataclasses.replace(source, image_column=image_column, label_column=label_column)
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
