"""Hugging Face's columnar datasets (Parquet downloads, `save_to_disk` Arrow files): which
column is the Image and which the ClassLabel (from the `huggingface` schema metadata that
`datasets` writes), its `{bytes, path}` image struct unpacked, and labels of any integer
type or strings turned into class indices. Here and nowhere else."""

from __future__ import annotations

import dataclasses
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.kinds.base import Rows, object_array
from pipeline.sources import Source, SourceError

INT64_MAX = np.iinfo(np.int64).max


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


def value_type(kind: pa.DataType) -> pa.DataType:
    """The type of the values a column holds (a dictionary column's value type)."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def label_type(schema: pa.Schema, column: str) -> pa.DataType:
    return value_type(schema.field(column).type)


def is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def check_columns(source: Source, path: str, schema: pa.Schema) -> None:
    """The image column holds encoded bytes (binary, or Hugging Face's {bytes, path}
    struct), the label column integers of any width or strings (class names)."""
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
    label = label_type(schema, source.label_column)
    if not (pa.types.is_integer(label) or is_string(label)):
        raise SourceError(
            f"{path}: label column {source.label_column!r} is {label}; labels are class "
            "indices (integers) or class names (strings)"
        )


def roles(source: Source, path: str, schema: pa.Schema) -> Source:
    """The image and label columns: given, else the one Image and the one ClassLabel
    feature, else the columns named image and label; class names from the ClassLabel."""
    image = source.image_column or find_column(path, schema, "image", "Image")
    label = source.label_column or find_column(path, schema, "label", "ClassLabel")
    feature = hf_features(schema).get(label, {})
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return dataclasses.replace(source, image_column=image, label_column=label, class_names=names)


def roles_of_files(source: Source, schemas: dict[str, pa.Schema]) -> Source:
    """`roles` from a train file's schema, and the same ClassLabel names in every file: a
    DatasetDict encoded split by split (`class_encode_column` on each) gives one index
    different classes in different splits, which is refused rather than read wrongly."""
    train = [f for f in source.splits.get("train", []) if f in schemas]
    first = train[0] if train else next(iter(schemas))
    source = roles(source, first, schemas[first])
    for path, schema in schemas.items():
        feature = hf_features(schema).get(source.label_column, {})
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
        if names != source.class_names:
            raise SourceError(
                f"{source.spec}: the class names of {source.label_column!r} differ between "
                f"files: {first} has {source.class_names}, {path} has {names}; one label "
                "index would mean two classes (re-encode the splits with one ClassLabel)"
            )
    return source


def class_names_of(columns: list[pa.ChunkedArray]) -> list[str]:
    """Class names of label columns without a ClassLabel: strings sorted as `datasets`'
    `class_encode_column` sorts them, integers numbered 0..largest (nulls are no class)."""
    values: set = set()
    for column in columns:
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        values.update(v for v in pc.unique(column).to_pylist() if v is not None)
    if columns and is_string(value_type(columns[0].type)):
        return sorted(values)
    return [str(i) for i in range(max(values, default=-1) + 1)]


def label_indices(
    labels: pa.ChunkedArray, class_names: list[str] | None
) -> tuple[np.ndarray, list]:
    """(int64 labels, why each is bad or None): string labels by their index in
    `class_names`, integers of any width as they are; null (and an unsigned value past
    int64) is a bad row."""
    if pa.types.is_dictionary(labels.type):
        labels = labels.cast(labels.type.value_type)
    valid = labels.is_valid().to_numpy(zero_copy_only=False)
    if is_string(labels.type):
        index = pc.index_in(labels, value_set=pa.array(class_names or [], labels.type))
        values = index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        unknown = valid & (values < 0)
        errors = [
            "no label" if not ok else f"label {v!r} is not a class" if bad else None
            for ok, bad, v in zip(valid, unknown, labels.to_pylist(), strict=True)
        ]
        return values, errors
    raw = labels.fill_null(0).to_numpy(zero_copy_only=False)
    too_big = raw > INT64_MAX if raw.dtype.kind == "u" else np.zeros(len(raw), bool)
    values = np.where(valid & ~too_big, raw.astype(np.int64), -1)
    errors = [
        "no label" if not ok else f"label {int(v)} is out of range" if big else None
        for ok, big, v in zip(valid, too_big, raw, strict=True)
    ]
    return values, errors


def table_rows(source: Source, table: pa.Table, where: Rows) -> Rows:
    """Rows of a table of the source's image and label columns (and maybe `id`). Ids come
    from an `id` column, else from Hugging Face's image paths, else are None."""
    n = table.num_rows
    image = table.column(source.image_column)
    ids = table.column("id") if "id" in table.column_names else None
    paths = None
    if pa.types.is_struct(image.type):  # Hugging Face's Image feature: {bytes, path}
        if "path" in [f.name for f in image.type]:
            paths = pc.struct_field(image, "path")
        image = pc.struct_field(image, "bytes")
    if ids is None:
        ids = paths
    labels, errors = label_indices(table.column(source.label_column), source.class_names)
    images = image.to_numpy(zero_copy_only=False)
    if paths is not None:  # `datasets` keeps a local image as its path alone: read it
        images = object_array(
            [
                b if b is not None or p is None else read_path(source, p)
                for b, p in zip(images, paths.to_pylist(), strict=True)
            ]
        )
    return {
        "image": images,
        "label": labels,
        "id": object_array([None] * n) if ids is None else ids.to_numpy(zero_copy_only=False),
        "error": object_array(errors),
        **where,
    }


def read_path(source: Source, path: str) -> bytes | None:
    """The bytes of an image `datasets` stored by its absolute path alone (None: missing or
    relative, a bad row)."""
    if not posixpath.isabs(path):
        return None
    try:
        with source.filesystem.open_input_stream(path) as f:
            return f.read()
    except (OSError, pa.ArrowException):
        return None
