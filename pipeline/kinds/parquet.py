"""Parquet files of images and labels, read row group by row group: what vitray shards and
Hugging Face Parquet downloads share."""

from __future__ import annotations

import dataclasses
import posixpath
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.kinds.base import Rows, SourceKind, Unit, bad_rows, object_array
from pipeline.kinds.columns import check_columns, class_names_of, table_rows
from pipeline.sources import Source, SourceError

# Footers of Parquet files that no manifest describes, read at once: on object storage each
# costs a round trip or two, and 10,000 of them one after the other take minutes.
FOOTER_THREADS = 32


def footer(source: Source, path: str) -> pq.FileMetaData:
    """A Parquet file's footer: metadata only."""
    try:
        return pq.read_metadata(path, filesystem=source.filesystem)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot read Parquet file {path}: {e}") from e


def read_footers(source: Source, paths: list[str]) -> dict[str, pq.FileMetaData]:
    """The footers of `paths`, `FOOTER_THREADS` at once, in order."""
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return dict(zip(paths, pool.map(partial(footer, source), paths), strict=True))


def row_group_sizes(meta: pq.FileMetaData) -> list[tuple[int, int]]:
    """(rows, compressed bytes) of each row group of a file: what `vitray prepare` records in
    the manifest, so that planning opens no file."""
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    return [
        (g.num_rows, sum(g.column(c).total_compressed_size for c in range(g.num_columns)))
        for g in groups
    ]


class ParquetKind(SourceKind):
    """Opening reads the footers the manifest does not describe (in parallel) and checks
    them, on the driver; a unit is a row group."""

    columns = "Parquet columns"

    def roles(self, source: Source, footers: dict[str, pq.FileMetaData]) -> Source:
        """The image and label columns and the class names."""
        raise NotImplementedError

    def open(self, source: Source) -> Source:
        if source.label_field is not None:
            raise SourceError(
                f"{source.spec} is Parquet: data.label_field is for WebDataset json "
                "labels; name the label column with data.label_column"
            )
        known = {
            posixpath.join(source.root, shard["file"]): list(
                zip(shard["row_group_rows"], shard["row_group_bytes"], strict=True)
            )
            for split in (source.manifest or {"splits": {}})["splits"].values()
            for shard in split["shards"]
            if "row_group_bytes" in shard
        }
        files = source.split_files("all")
        footers = read_footers(source, [path for path in files if path not in known])
        source = self.roles(source, footers)
        for path, meta in footers.items():
            check_columns(source, path, meta.schema.to_arrow_schema())
            known[path] = row_group_sizes(meta)
        rows = {path: sum(n for n, _ in groups) for path, groups in known.items()}
        if not any(rows.values()):
            columns = {
                posixpath.basename(path): meta.schema.to_arrow_schema().names
                for path, meta in list(footers.items())[:3]
            }
            raise SourceError(
                f"{source.spec} holds no rows: its {len(files)} Parquet file(s) are empty "
                f"(columns: {columns})"
            )
        if source.class_names is None:
            source = dataclasses.replace(source, class_names=self.label_names(source, files))
        return dataclasses.replace(source, rows=rows, row_groups=known)

    def label_names(self, source: Source, files: list[str]) -> list[str]:
        """Class names where no ClassLabel gives them, from the label column of every file
        (a few bytes a row): strings sorted as `datasets`' `class_encode_column` sorts them,
        integers numbered 0..largest as `vitray prepare` numbers them."""

        def column(path: str) -> pa.ChunkedArray:
            table = pq.read_table(path, columns=[source.label_column], filesystem=source.filesystem)
            return table.column(0)

        with ThreadPoolExecutor(FOOTER_THREADS) as pool:
            return class_names_of(list(pool.map(column, files)))

    def read(self, source: Source, unit: Unit) -> Rows:
        """A row group; `row` counts from the start of the file. A row group that cannot be
        read is as many bad rows, a row without a label a bad row. A cut unit gives its
        first rows."""
        path, group = unit["path"], unit["row_group"]
        pf = pq.ParquetFile(path, filesystem=source.filesystem)
        n = min(pf.metadata.row_group(group).num_rows, unit["rows"])
        start = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        where = {"path": object_array([path] * n), "row": np.arange(start, start + n)}
        columns = [source.image_column, source.label_column]
        columns += ["id"] if "id" in pf.schema_arrow.names else []
        try:
            table = pf.read_row_group(group, columns=list(dict.fromkeys(columns))).slice(0, n)
        except (OSError, pa.ArrowException) as e:
            return bad_rows(n, f"row group {group} unreadable: {e}", **where)
        return table_rows(source, table, where)
