"""What every kind of source provides, and the row format its reader returns.

A kind recognises its layout in a listing (`claims`), resolves it to a `Source` (files,
splits, class names from the listing and small metadata files), opens it on the driver
(columns, counts, checks), plans read units, and reads one unit wherever its rows are needed,
as columns {image (encoded bytes, None when missing), label, id, error[, path, row]}:
`error` says why a row is bad where the reader knows it already (None: not known to be bad),
`path` and `row` where a bad row came from.
"""

from __future__ import annotations

from typing import ClassVar, TypedDict

import numpy as np

from pipeline.sources import Listing, Source, SourceError

Rows = dict[str, np.ndarray]


class Unit(TypedDict):
    """What is read at once, and what it costs. Every kind fills every key (unused: "", -1,
    []) so that units group into tasks alike."""

    path: str  # a Parquet, Arrow, IDX file or a tar
    row_group: int  # a Parquet row group, Arrow record batch, IDX chunk
    files: list[str]  # image files
    labels: list[int]  # the label of each image file
    rows: int  # the rows read: all of the unit's, or its first ones when cut; -1: unknown
    bytes: int  # what reading it fetches (Parquet: its compressed column chunks); -1: unknown


def unit(path: str = "", row_group: int = -1, rows: int = -1, size: int = -1) -> Unit:
    """A unit of a file (or a part of one)."""
    return Unit(path=path, row_group=row_group, files=[], labels=[], rows=rows, bytes=size)


def object_array(values: list) -> np.ndarray:
    """A 1-D object array, even of equal-length bytes (np.array would make a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def bad_rows(n: int, error: str, **where: np.ndarray) -> Rows:
    """`n` rows that could not be read, all for one reason."""
    return {
        "image": object_array([None] * n),
        "label": np.full(n, -1, dtype=np.int64),
        "id": object_array([None] * n),
        "error": object_array([error] * n),
        **where,
    }


class SourceKind:
    """One layout as its peer writes and reads it. Subclasses set `name` (the Source's
    kind) and `layout` (how messages name it) and implement what their layout needs."""

    name: ClassVar[str]
    layout: ClassVar[str]
    # what data.image_column / label_column / label_field mean here; None: they do not apply
    columns: ClassVar[str | None] = None
    # whether a row is a file of its own (image folders): val is then carved file by file
    rows_are_files: ClassVar[bool] = False

    def claims(self, listing: Listing) -> list[str]:
        """The files of `listing` that are this layout's (none: not this layout)."""
        raise NotImplementedError

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        """The source of the `files` this kind claimed: splits and class names."""
        raise NotImplementedError

    def open(self, source: Source) -> Source:
        """Driver-side: what reading needs (columns, counts), checked before any task."""
        given = [
            key
            for key in ("image_column", "label_column", "label_field")
            if getattr(source, key) is not None
        ]
        if given and self.columns is None:
            raise SourceError(
                f"{source.spec} is {self.layout}: data.{', data.'.join(given)} do not apply"
            )
        return source

    def rows(self, source: Source, files: list[str]) -> int | None:
        """The rows of `files` from metadata; None where that needs reading them."""
        return sum(source.rows[path] for path in files)

    def units(self, source: Source, files: list[str]) -> list[Unit]:
        """One unit per row group (or record batch, or chunk) recorded on opening."""
        return [
            unit(path, g, rows, size)
            for path in files
            for g, (rows, size) in enumerate(source.row_groups[path])
        ]

    def read(self, source: Source, unit: Unit) -> Rows:
        raise NotImplementedError
