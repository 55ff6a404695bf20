"""A Hugging Face `imagefolder` with metadata, as `datasets.load_dataset("imagefolder",
data_dir=...)` reads it: images (in split folders or not) and `metadata.csv`,
`metadata.jsonl` or `metadata.parquet` files whose `file_name` column names each image
relative to the metadata's folder and whose label column (string or integer) labels it.
The metadata's labels win over folder names, as in `datasets`. An image applies the
metadata file nearest above it."""

from __future__ import annotations

import dataclasses
import io
import posixpath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.kinds.columns import is_string
from pipeline.kinds.files import FilesKind, check_split_classes
from pipeline.sources import Listing, Source, SourceError, splits_by_name

METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# the image extensions of `datasets`' imagefolder that vitray decodes
IMAGE_SUFFIXES = tuple(
    "." + e for e in "jpg jpeg jpe jfif png apng webp gif bmp dib tif tiff ppm pgm pbm pnm".split()
)


def has_metadata(listing: Listing) -> bool:
    return any(posixpath.basename(f) in METADATA_FILES for f in listing.files)


def read_metadata(listing: Listing, path: str) -> pa.Table:
    with listing.filesystem.open_input_stream(path) as f:
        data = f.read()
    try:
        if path.endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(data))
        if path.endswith(".jsonl"):
            return pajson.read_json(io.BytesIO(data))
        return pq.read_table(io.BytesIO(data))
    except pa.ArrowException as e:
        raise SourceError(f"cannot read {path}: {e}") from e


class HfImageFolder(FilesKind):
    name = "hf_imagefolder"
    layout = "a Hugging Face imagefolder with metadata"
    columns = "the metadata's label column"

    def claims(self, listing: Listing) -> list[str]:
        if not has_metadata(listing):
            return []
        return [
            f
            for f in listing.files
            if f.lower().endswith(IMAGE_SUFFIXES) or posixpath.basename(f) in METADATA_FILES
        ]

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        metadata = [f for f in files if posixpath.basename(f) in METADATA_FILES]
        images = [f for f in files if f not in set(metadata)]
        by_dir: dict[str, list[str]] = {}
        for m in metadata:
            by_dir.setdefault(posixpath.dirname(m), []).append(m)
        two = {d: ms for d, ms in by_dir.items() if len(ms) > 1}
        if two:
            d, ms = next(iter(two.items()))
            raise SourceError(
                f"{listing.spec} could be read two ways: {[listing.rel(m) for m in ms]} are "
                "two metadata files of one folder; keep one"
            )
        if not images:
            raise SourceError(f"{listing.spec} has metadata files but no images beside them")
        splits = splits_by_name(listing.spec, listing.root, images)
        return Source(
            self.name,
            listing.root,
            listing.filesystem,
            None,
            images,
            splits,
            spec=listing.spec,
            file_labels={m: -1 for m in metadata},  # where the metadata is, until opened
        )

    def open(self, source: Source) -> Source:
        """Labels from the metadata: the label column (data.label_column, default label) of
        the metadata nearest above each image. Every image needs a row."""
        if source.image_column or source.label_field:
            raise SourceError(f"{source.spec} is {self.layout}: only data.label_column applies")
        listing = Listing(source.spec, source.filesystem, source.root, [])
        column = source.label_column or "label"
        values: dict[str, object] = {}
        kind: pa.DataType | None = None
        metadata = sorted(source.file_labels, key=lambda m: -m.count("/"))  # nearest first
        for m in metadata:
            table = read_metadata(listing, m)
            if "file_name" not in table.column_names or column not in table.column_names:
                raise SourceError(
                    f"{m} needs a file_name column and the label column {column!r} (name "
                    f"another with data.label_column); its columns are {table.column_names}"
                )
            labels = table.column(column)
            if not (pa.types.is_integer(labels.type) or is_string(labels.type)):
                raise SourceError(f"{m}: label column {column!r} is {labels.type}")
            if kind is not None and is_string(kind) != is_string(labels.type):
                raise SourceError(f"{m}: label column {column!r} is {labels.type}, not {kind}")
            kind = labels.type
            base = posixpath.dirname(m)
            for name, label in zip(
                table.column("file_name").to_pylist(), labels.to_pylist(), strict=True
            ):
                path = posixpath.normpath(posixpath.join(base, str(name)))
                values.setdefault(path, label)
        unlisted = [posixpath.relpath(f, source.root) for f in source.files if f not in values]
        if unlisted:
            raise SourceError(
                f"{source.spec} ({self.layout}): {len(unlisted)} images have no metadata "
                f"row, e.g. {unlisted[:4]}; `datasets` refuses them too: add their rows"
            )
        named = {f: values[f] for f in source.files if values[f] is not None}
        per_split = {
            split: {str(named[f]) for f in files if f in named}
            for split, files in source.splits.items()
        }
        check_split_classes(source.spec, self.layout, per_split)
        if kind is not None and is_string(kind):
            classes = sorted({str(v) for v in named.values()})
            index = {name: i for i, name in enumerate(classes)}
            labels = {f: index[str(v)] for f, v in named.items()}
        else:
            classes = [str(i) for i in range(max(named.values(), default=-1) + 1)]
            labels = {f: int(v) for f, v in named.items()}
        return dataclasses.replace(
            source, class_names=classes, file_labels=labels, label_column=column
        )
