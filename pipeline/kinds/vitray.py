"""vitray shards: what `vitray prepare` writes (Parquet of id, image bytes, label, and a
manifest.json that lists every shard with its splits, rows and row-group sizes, so that
planning opens no shard)."""

from __future__ import annotations

import dataclasses
import json
import posixpath

import pyarrow.parquet as pq

from pipeline.kinds.parquet import ParquetKind
from pipeline.sources import MANIFEST, Listing, Source, SourceError


class VitrayShards(ParquetKind):
    name = "vitray"
    layout = "a vitray dataset (vitray prepare's output)"

    def claims(self, listing: Listing) -> list[str]:
        manifest = posixpath.join(listing.root, MANIFEST)
        return [manifest] if manifest in listing.files else []

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        with listing.filesystem.open_input_stream(files[0]) as f:
            manifest = json.loads(f.read())
        splits = {
            name: [
                posixpath.join(listing.root, shard["file"])
                for shard in split["shards"]
                if shard["rows"] > 0
            ]
            for name, split in manifest["splits"].items()
        }
        return Source(
            self.name,
            listing.root,
            listing.filesystem,
            manifest["class_names"],
            sorted(f for shards in splits.values() for f in shards),
            splits,
            manifest,
            listing.spec,
        )

    def roles(self, source: Source, footers: dict[str, pq.FileMetaData]) -> Source:
        given = {"image": source.image_column, "label": source.label_column}
        wrong = {role: column for role, column in given.items() if column not in (None, role)}
        if wrong:
            raise SourceError(
                f"{source.spec} is a vitray dataset: its columns are image and label, not {wrong}"
            )
        return dataclasses.replace(source, image_column="image", label_column="label")
