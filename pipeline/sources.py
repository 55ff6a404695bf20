"""Where images come from: one spec string resolves to a kind of source and its files.

Kinds: `vitray` (shards + manifest.json from `vitray prepare`), `hf_parquet` (Hugging Face
image Parquet as downloaded), `webdataset` (.tar shards), `folder` (one subfolder per
class) and `builtin:NAME`. Paths may be local or any URI pyarrow knows (s3://, gs://).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import pyarrow.fs as pafs

from pipeline.builtin import DIGIT_CLASSES, PHOTO_CLASSES, Item, digits_items, photos_items

MANIFEST = "manifest.json"
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")  # WebDataset shards, as webdataset reads them
# Hugging Face `datasets`' split keywords (datasets.data_files.SPLIT_KEYWORDS) -> our names
SPLIT_ALIASES = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("validation", "valid", "dev", "val"), "val"),
    **dict.fromkeys(("test", "testing", "eval", "evaluation"), "test"),
}
# `push_to_hub`'s shard names, data/<split>-00000-of-00002.parquet: any split name
HF_SHARD = re.compile(r"^(\w+(?:\.\w+)*)-\d{5}-of-\d{5}")
NON_WORD = re.compile(r"[-._ 0-9]+")  # what separates a split keyword in a name (datasets)


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
    # Parquet only, filled when the source is opened (pipeline.readers.open_source): rows of
    # each file and (rows, compressed bytes) of each of its row groups, from the manifest or
    # the footers
    rows: dict[str, int] = field(default_factory=dict)
    row_groups: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # where images and labels are, given by the user or found on opening: Parquet columns,
    # or WebDataset extensions (None: any image extension) and the key of a json label
    image_column: str | None = None
    label_column: str | None = None
    label_field: str | None = None

    def split_of(self, path: str) -> str | None:
        """The split a data file is named for (an image folder's subfolders are classes)."""
        return None if self.kind == "folder" else split_of_path(path, self.root)

    def split_names(self) -> list[str]:
        """The manifest's splits, else those named in file paths (untagged files: train)."""
        if self.manifest is not None:
            return sorted(self.manifest["splits"])
        return sorted({self.split_of(f) or "train" for f in self.files})

    def split_files(self, split: str) -> list[str]:
        """The files of one split (`all`: every file): from the manifest, else those named for
        it; untagged files are `train` when no file is named for train."""
        if self.manifest is not None:
            splits = self.manifest["splits"]
            if split != "all" and split not in splits:
                raise SourceError(f"{self.spec} has no split {split!r}; it has {sorted(splits)}")
            shards = [
                s for name, v in splits.items() if split in ("all", name) for s in v["shards"]
            ]
            return [posixpath.join(self.root, s["file"]) for s in shards if s["rows"] > 0]
        if split == "all":
            return list(self.files)
        tags = [self.split_of(f) for f in self.files]
        matching = [f for f, tag in zip(self.files, tags, strict=True) if tag == split]
        if not matching and split == "train":
            matching = [f for f, tag in zip(self.files, tags, strict=True) if tag is None]
        if not matching:
            raise SourceError(
                f"{self.spec} has no files for split {split!r}; it has {self.split_names()}"
            )
        return matching


def split_of_path(path: str, root: str) -> str | None:
    """The split of a file as Hugging Face `datasets` infers it: the split of a
    `<split>-00000-of-00004` shard name (any name: `extra` stays `extra`), else a split
    keyword between non-word characters in a directory or file name (`.../train/...`,
    `imagenet-val-0001.tar`); None if untagged."""
    parts = posixpath.relpath(path, root).split("/")
    shard = HF_SHARD.match(parts[-1])
    if shard:
        return SPLIT_ALIASES.get(shard[1].lower(), shard[1])
    for part in parts:
        for token in NON_WORD.split(part.lower()):
            if token in SPLIT_ALIASES:
                return SPLIT_ALIASES[token]
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
    elif fs.get_file_info(posixpath.join(root, MANIFEST)).type == pafs.FileType.File:
        # a prepared dataset: its manifest lists the shards (listing 10,000 objects on S3
        # took seconds)
        files = [posixpath.join(root, MANIFEST)]
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
    tars = [f for f in files if f.endswith(TAR_SUFFIXES)]
    if parquet and tars:
        raise SourceError(f"{spec} holds both Parquet files and tars: point at one or the other")
    if parquet:
        return Source("hf_parquet", root, fs, None, parquet, spec=spec)
    if tars:
        return Source("webdataset", root, fs, None, tars, spec=spec)
    rel = [posixpath.relpath(f, root) for f in files]
    in_classes = [f for f, r in zip(files, rel, strict=True) if "/" in r]
    if in_classes:
        classes = sorted({r.split("/")[0] for r in rel if "/" in r})
        return Source("folder", root, fs, classes, in_classes, spec=spec)
    images = [f for f in files if f.lower().endswith(LOOSE_IMAGE_SUFFIXES)]
    if images:  # unlabelled: `vitray predict` reads them; training needs class subfolders
        return Source("folder", root, fs, None, images, spec=spec)
    raise SourceError(
        f"{spec} holds no manifest.json, .parquet or .tar files and no class subfolders; "
        f"its {len(rel)} files: {rel[:8]}"
    )


LOOSE_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def data_home() -> Path:
    """Where built-in datasets are prepared on first use: $VITRAY_DATA or ./data."""
    return Path(os.environ.get("VITRAY_DATA", "data")).resolve()
