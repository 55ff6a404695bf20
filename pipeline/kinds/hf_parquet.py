"""Hugging Face image Parquet as the Hub serves it (`data/<split>-00000-of-00002.parquet`,
or any Parquet files named for their splits): columns found by their features, splits by
their names, as `datasets.load_dataset("parquet")` finds them."""

from __future__ import annotations

import posixpath

import pyarrow.parquet as pq

from pipeline.kinds.columns import roles_of_files
from pipeline.kinds.parquet import ParquetKind
from pipeline.sources import Listing, Source, splits_by_name

METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")  # an imagefolder's


class HfParquet(ParquetKind):
    name = "hf_parquet"
    layout = "Hugging Face image Parquet"

    def claims(self, listing: Listing) -> list[str]:
        return [
            f
            for f in listing.files
            if f.endswith(".parquet") and posixpath.basename(f) not in METADATA_FILES
        ]

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        splits = splits_by_name(listing.spec, listing.root, files)
        return Source(
            self.name, listing.root, listing.filesystem, None, files, splits, spec=listing.spec
        )

    def roles(self, source: Source, footers: dict[str, pq.FileMetaData]) -> Source:
        schemas = {path: meta.schema.to_arrow_schema() for path, meta in footers.items()}
        return roles_of_files(source, schemas)
