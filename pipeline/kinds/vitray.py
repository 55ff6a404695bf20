"""vitray shards: what `vitray prepare` writes (Parquet of id, image bytes, label, and a
manifest.json that lists every shard with its splits, rows and row-group sizes, so that
planning opens no shard)."""

from __future__ import annotations

import dataclasses
import json
import posixpath

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.kinds.parquet import ParquetKind
from pipeline.sources import MANIFEST, Listing, Source, SourceError

FORMAT = "vitray-shards"  # manifest.json's mark: a directory `vitray prepare` wrote


def read_manifest(fs: pafs.FileSystem, path: str) -> dict | None:
    """A manifest `vitray prepare` wrote, or None (none there, or another tool's)."""
    try:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_prepared(fs: pafs.FileSystem, root: str) -> bool:
    path = posixpath.join(root, MANIFEST)
    return fs.get_file_info(path).type == pafs.FileType.File and bool(read_manifest(fs, path))


class VitrayShards(ParquetKind):
    name = "vitray"
    layout = "a vitray dataset (vitray prepare's output)"

    def claims(self, listing: Listing) -> list[str]:
        path = posixpath.join(listing.root, MANIFEST)
        found = path in listing.files and read_manifest(listing.filesystem, path)
        return [path] if found else []

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        manifest = read_manifest(listing.filesystem, files[0])
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
