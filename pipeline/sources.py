"""Where images come from: one spec string resolves to a kind of source and its files.

Kinds: `vitray` (shards + manifest.json from `vitray prepare`), `hf_parquet` (Hugging Face
image Parquet as downloaded), `webdataset` (.tar shards), `folder` (one subfolder per
class) and `builtin:NAME`. Paths may be local or any URI pyarrow knows (s3://, gs://).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.builtin import DIGIT_CLASSES, PHOTO_CLASSES, Item, digits_items, photos_items

MANIFEST = "manifest.json"
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "validation": "val",
    "valid": "val",
    "test": "test",
}


class SourceError(ValueError):
    """A dataset spec that cannot be read; raised on the driver before any Ray work."""


@dataclass
class Source:
    kind: str
    root: str  # path inside `filesystem`
    filesystem: pafs.FileSystem
    class_names: list[str] | None = None
    files: list[str] = field(default_factory=list)  # data files under root, sorted
    manifest: dict | None = None
    spec: str = ""

    def split_files(self, split: str) -> list[str]:
        """The files of one split: from the manifest, or by split name in path or file name;
        `all`: every file."""
        if split == "all":
            if self.manifest is None:
                return list(self.files)
            shards = [s for v in self.manifest["splits"].values() for s in v["shards"]]
            return [posixpath.join(self.root, s["file"]) for s in shards if s["rows"] > 0]
        if self.manifest is not None:
            if split not in self.manifest["splits"]:
                raise SourceError(
                    f"{self.spec} has no split {split!r}; it has {sorted(self.manifest['splits'])}"
                )
            shards = self.manifest["splits"][split]["shards"]
            return [posixpath.join(self.root, s["file"]) for s in shards if s["rows"] > 0]
        matching = [f for f in self.files if split_of_path(f, self.root) == split]
        if not matching and split == "train":
            untagged = [f for f in self.files if split_of_path(f, self.root) is None]
            if untagged:
                return untagged
        if not matching:
            raise SourceError(f"{self.spec} has no files for split {split!r}")
        return matching


def split_of_path(path: str, root: str) -> str | None:
    """'train' for .../train/..., .../train-00001-of-00004.parquet, etc.; None if untagged."""
    rel = posixpath.relpath(path, root)
    for part in rel.split("/"):
        stem = part.split(".")[0]
        for token in (stem, stem.split("-")[0], stem.split("_")[0]):
            if token.lower() in SPLIT_ALIASES:
                return SPLIT_ALIASES[token.lower()]
    return None


def parse_builtin(spec: str) -> tuple[str, dict[str, int]]:
    name, _, query = spec.removeprefix("builtin:").partition("?")
    if name not in ("digits", "photos"):
        raise SourceError(f"unknown built-in dataset {name!r}; choose digits or photos")
    try:
        options = {k: int(v) for k, v in parse_qsl(query, strict_parsing=bool(query))}
    except ValueError as e:
        raise SourceError(f"bad options in {spec!r}: use builtin:photos?n=2000&seed=0") from e
    unknown = set(options) - ({"seed"} | ({"n"} if name == "photos" else set()))
    if unknown:
        raise SourceError(f"unknown options for builtin:{name}: {sorted(unknown)}")
    return name, options


def builtin_items(spec: str) -> tuple[list[Item], list[str]]:
    name, options = parse_builtin(spec)
    if name == "digits":
        return digits_items(**options), DIGIT_CLASSES
    return photos_items(**options), PHOTO_CLASSES


def filesystem_for(spec: str) -> tuple[pafs.FileSystem, str]:
    if "://" in spec:
        try:
            return pafs.FileSystem.from_uri(spec)
        except Exception as e:
            raise SourceError(f"cannot open {spec}: {e}") from e
    return pafs.LocalFileSystem(), str(Path(spec).expanduser().resolve())


def _hf_class_names(fs: pafs.FileSystem, path: str) -> list[str] | None:
    """ClassLabel names from the `huggingface` schema metadata that `datasets` writes."""
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    if b"huggingface" not in meta:
        return None
    features = json.loads(meta[b"huggingface"]).get("info", {}).get("features", {})
    label = features.get("label", {})
    return label.get("names") if label.get("_type") == "ClassLabel" else None


def resolve_source(spec: str) -> Source:
    """Find out what `spec` holds, reading only listings and metadata."""
    if spec.startswith("builtin:"):
        raise SourceError(f"{spec} must be prepared first (pipeline.dataset does it for you)")
    fs, root = filesystem_for(spec)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"dataset path does not exist: {spec}")
    if info.type == pafs.FileType.File:
        files, root = [root], posixpath.dirname(root)
    else:
        try:
            listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except OSError as e:
            raise SourceError(f"cannot list {spec}: {e}") from e
        files = sorted(
            f.path
            for f in listing
            if f.type == pafs.FileType.File and not f.base_name.startswith(".")
        )
    if posixpath.join(root, MANIFEST) in files:
        with fs.open_input_stream(posixpath.join(root, MANIFEST)) as f:
            manifest = json.loads(f.read())
        return Source("vitray", root, fs, manifest["class_names"], files, manifest, spec)
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        return Source("hf_parquet", root, fs, _hf_class_names(fs, parquet[0]), parquet, spec=spec)
    tars = [f for f in files if f.endswith(".tar")]
    if tars:
        return Source("webdataset", root, fs, None, tars, spec=spec)
    classes = sorted(
        {
            posixpath.relpath(f, root).split("/")[0]
            for f in files
            if "/" in posixpath.relpath(f, root)
        }
    )
    if classes:
        in_classes = [f for f in files if "/" in posixpath.relpath(f, root)]
        return Source("folder", root, fs, classes, in_classes, spec=spec)
    raise SourceError(
        f"{spec} holds no manifest.json, .parquet, .tar or class subfolders of images"
    )


def data_home() -> Path:
    """Where built-in datasets are prepared on first use: $VITRAY_DATA or ./data."""
    return Path(os.environ.get("VITRAY_DATA", "data")).resolve()
