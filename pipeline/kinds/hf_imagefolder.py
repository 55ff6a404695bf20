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
import warnings

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.kinds.columns import is_string
from pipeline.kinds.files import FilesKind, check_split_classes
from pipeline.sources import Listing, Source, SourceError, split_of_path, splits_by_name

METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# the image extensions of `datasets`' imagefolder that vitray decodes
IMAGE_SUFFIXES = tuple(
    "." + e for e in "jpg jpeg jpe jfif png apng webp gif bmp dib tif tiff ppm pgm pbm pnm".split()
)


def has_metadata(listing: Listing) -> bool:
    return any(posixpath.basename(f) in METADATA_FILES for f in listing.files)


# what pandas reads as missing in a CSV (`datasets` reads metadata.csv with pandas)
CSV_NULLS = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
]  # fmt: skip


def read_metadata(source: Source, path: str) -> pa.Table:
    with source.filesystem.open_input_stream(path) as f:
        data = f.read()
    try:
        if path.endswith(".csv"):
            convert = pacsv.ConvertOptions(null_values=CSV_NULLS, strings_can_be_null=True)
            return pacsv.read_csv(io.BytesIO(data), convert_options=convert)
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
        """Splits of the metadata files, by their paths as `datasets` matches them; the
        rows (and so the images) come from the metadata on opening."""
        metadata = [f for f in files if posixpath.basename(f) in METADATA_FILES]
        by_dir: dict[str, list[str]] = {}
        for m in metadata:
            by_dir.setdefault(posixpath.dirname(m), []).append(m)
        for ms in by_dir.values():
            if len(ms) > 1:
                raise SourceError(
                    f"{listing.spec} could be read two ways: {[listing.rel(m) for m in ms]} "
                    "are two metadata files of one folder; keep one"
                )
        images = [f for f in files if f not in set(metadata)]
        outside = [listing.rel(m) for m in metadata if split_of_path(m, listing.root) is None]
        if outside and any(split_of_path(f, listing.root) for f in images):
            raise SourceError(
                f"{listing.spec} could be read two ways: its images sit in split folders, but "
                f"{outside} is in none (`datasets` drops it and labels by folder): put a "
                "metadata file in each split folder"
            )
        splits = splits_by_name(listing.spec, listing.root, metadata)
        bare = sorted({split_of_path(f, listing.root) for f in images} - {None, *splits})
        if bare:
            raise SourceError(
                f"{listing.spec}: split folders {bare} hold images but no metadata file, as "
                f"{sorted(splits)} do (`datasets` stops on it): put a metadata file in each"
            )
        return Source(
            self.name, listing.root, listing.filesystem, None, images, splits, spec=listing.spec
        )

    def open(self, source: Source) -> Source:
        """A row per metadata row, as `datasets` makes them: `file_name` relative to the
        metadata's folder, the label from the label column (data.label_column, default
        label), the split of the metadata file. A row naming a missing file, or a file named
        twice, is refused; images no row names are left out, as `datasets` leaves them."""
        if source.image_column or source.label_field:
            raise SourceError(f"{source.spec} is {self.layout}: only data.label_column applies")
        column = source.label_column or "label"
        present = set(source.files)
        rows: dict[str, tuple[str, object]] = {}  # image -> (split, label)
        kinds: set[bool] = set()
        for split, metadata in source.splits.items():
            for m in metadata:
                for path, label, is_str in self.metadata_rows(source, m, column):
                    if path in rows:
                        raise SourceError(
                            f"{source.spec} ({self.layout}): {posixpath.relpath(path, source.root)}"
                            " has two metadata rows; `datasets` would read it twice: keep one"
                        )
                    if path not in present:
                        raise not_an_image(source, m, path)
                    rows[path] = (split, label)
                    kinds.add(is_str)
        if len(kinds) > 1:
            raise SourceError(
                f"{source.spec}: label column {column!r} is strings in one "
                "metadata file and integers in another"
            )
        unlisted = len(present) - len(rows)
        if unlisted:
            warnings.warn(
                f"{source.spec}: {unlisted} images have no metadata row and are left out, as "
                "`datasets` leaves them out",
                stacklevel=2,
            )
        named = {f: label for f, (_, label) in rows.items() if label is not None}
        per_split: dict[str, set[str]] = {split: set() for split in source.splits}
        for split, label in rows.values():
            if label is not None:
                per_split[split].add(str(label))
        check_split_classes(source.spec, self.layout, per_split)
        if kinds == {True}:
            classes = sorted({str(v) for v in named.values()})
            index = {name: i for i, name in enumerate(classes)}
            labels = {f: index[str(v)] for f, v in named.items()}
        else:
            classes = [str(i) for i in range(max(named.values(), default=-1) + 1)]
            labels = {f: int(v) for f, v in named.items()}
        files = sorted(rows)
        splits = {split: [f for f in files if rows[f][0] == split] for split in source.splits}
        return dataclasses.replace(
            source,
            class_names=classes,
            files=files,
            splits={split: fs for split, fs in splits.items() if fs},
            file_labels=labels,
            label_column=column,
        )

    def metadata_rows(self, source: Source, path: str, column: str):
        """(image path, label or None, whether labels are strings) of each row of one
        metadata file."""
        table = read_metadata(source, path)
        if "file_name" not in table.column_names or column not in table.column_names:
            raise SourceError(
                f"{path} needs a file_name column and the label column {column!r} (name "
                f"another with data.label_column); its columns are {table.column_names}"
            )
        labels = table.column(column)
        if pa.types.is_null(labels.type):
            labels = labels.cast(pa.string())  # every label empty
        if not (pa.types.is_integer(labels.type) or is_string(labels.type)):
            raise SourceError(f"{path}: label column {column!r} is {labels.type}")
        base = posixpath.dirname(path)
        for name, label in zip(
            table.column("file_name").to_pylist(), labels.to_pylist(), strict=True
        ):
            name = str(name).replace("\\", "/")  # as `datasets` reads Windows paths
            yield posixpath.normpath(posixpath.join(base, name)), label, is_string(labels.type)


def not_an_image(source: Source, metadata: str, path: str) -> SourceError:
    """A metadata row naming a file that is missing, or of a format vitray does not read."""
    name = posixpath.relpath(path, source.root)
    if source.filesystem.get_file_info(path).type == pafs.FileType.File:
        return SourceError(
            f"{metadata} names {name}, whose format vitray does not read (it reads "
            f"{', '.join(IMAGE_SUFFIXES)}): convert it or remove its row"
        )
    return SourceError(f"{metadata} names {name}, which is not an image in the folder")
