"""What a dataset spec points at: `Source` (a kind of layout, its files and splits), the
listing every kind's detection reads, split names as Hugging Face `datasets` infers them,
and the built-in datasets. The kinds themselves live in `pipeline.kinds`, one module each.
Paths may be local or any URI pyarrow knows (s3://, gs://).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
# Hugging Face `datasets`' split keywords (datasets.data_files.SPLIT_KEYWORDS) -> our names
SPLIT_ALIASES = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("validation", "valid", "dev", "val"), "val"),
    **dict.fromkeys(("test", "testing", "eval", "evaluation"), "test"),
}
# `push_to_hub`'s shard names, data/<split>-00000-of-00002.parquet: any split name, and
# only right under data/ (datasets.data_files.SPLIT_PATTERN_SHARDED)
HF_SHARD = re.compile(r"^(\w+(?:\.\w+)*)-\d{5}-of-\d{5}")
NON_WORD = re.compile(r"[-._ 0-9]+")  # what separates a split keyword in a name (datasets)


class SourceError(ValueError):
    """A dataset spec that cannot be read; raised on the driver before any Ray work."""


@dataclass
class Listing:
    """What detection looks at: the spec, its filesystem and root, the files under the
    root (full paths, sorted; hidden files and folders left out, as `datasets` does), and
    the folders one and two levels under the root, relative to it (hidden ones too:
    torchvision sees them)."""

    spec: str
    filesystem: pafs.FileSystem
    root: str
    files: list[str]
    folders: list[str] = field(default_factory=list)  # `train`
    subfolders: list[str] = field(default_factory=list)  # `train/cat`
    hidden_files: list[str] = field(default_factory=list)  # `cat/.ipynb_checkpoints/a.png`

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.root)


@dataclass
class Source:
    """An opened layout. `splits` maps each split to its data files (a subset of `files`);
    what a kind learns on opening (row counts, per-file labels) rides along and is dropped
    from the copy each Ray task gets (`pipeline.readers.task_source`)."""

    kind: str  # the name of its reader in pipeline.kinds.KINDS
    root: str  # path inside `filesystem`
    filesystem: pafs.FileSystem
    class_names: list[str] | None = None
    files: list[str] = field(default_factory=list)  # data files under root, sorted
    splits: dict[str, list[str]] = field(default_factory=dict)
    manifest: dict | None = None
    spec: str = ""
    # filled on opening: rows of each file and (rows, bytes) of each of its read units
    # (Parquet row groups, Arrow record batches), and the label of each image file
    rows: dict[str, int] = field(default_factory=dict)
    row_groups: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    file_labels: dict[str, int] = field(default_factory=dict)
    # where images and labels are, given by the user or found on opening: Parquet columns,
    # or WebDataset extensions (None: any image extension) and the key of a json label
    image_column: str | None = None
    label_column: str | None = None
    label_field: str | None = None

    def split_names(self) -> list[str]:
        return sorted(self.splits)

    def split_files(self, split: str) -> list[str]:
        """The files of one split (`all`: every file)."""
        if split == "all":
            return list(self.files)
        if split not in self.splits:
            raise SourceError(
                f"{self.spec} has no split {split!r}; it has {self.split_names()} (without a "
                "val split, set data.val_fraction to carve one from train, or data.val_split)"
            )
        return self.splits[split]


def split_keyword(name: str) -> str | None:
    """The split a file or folder name gives as `datasets` reads it: a split keyword between
    non-word characters (`train`, `imagenet-val-0001.tar`, `train_set`, `val2017`)."""
    for token in NON_WORD.split(name):  # case-sensitive: `datasets` takes Train/ for no split
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return None


def split_of_path(path: str, root: str) -> str | None:
    """The split of a file as Hugging Face `datasets` infers it: the split of a
    `data/<split>-00000-of-00004` shard (any name: `extra` stays `extra`), else a split
    keyword in a folder name, else in the file name (`datasets` tries folder names first:
    `test/train-00000-of-00001.parquet` is test); None if untagged."""
    parts = posixpath.relpath(path, root).split("/")
    shard = HF_SHARD.match(parts[-1]) if parts[:-1] == ["data"] else None
    if shard:
        return SPLIT_ALIASES.get(shard[1], shard[1])
    for part in parts[:-1]:
        if split := split_keyword(part):
            return split
    return split_keyword(parts[-1])


def splits_by_name(spec: str, root: str, files: list[str]) -> dict[str, list[str]]:
    """Files grouped by the split their names give (`split_of_path`); with no file named for
    a split, all are train. Some named and some not is refused: `datasets` would drop the
    unnamed ones, and which split they belong to cannot be told."""
    tags = {f: split_of_path(f, root) for f in files}
    untagged = [posixpath.relpath(f, root) for f, tag in tags.items() if tag is None]
    if len(untagged) == len(files):
        return {"train": list(files)}
    if untagged:
        named = sorted({tag for tag in tags.values() if tag})
        raise SourceError(
            f"{spec} could be read two ways: some files are named for splits {named}, "
            f"others for none ({untagged[:4]}); name every file for its split or move them"
        )
    out: dict[str, list[str]] = {}
    for f, tag in tags.items():
        out.setdefault(tag, []).append(f)
    return out


def filesystem_for(spec: str) -> tuple[pafs.FileSystem, str]:
    if "://" in spec:
        try:
            return pafs.FileSystem.from_uri(spec)
        except Exception as e:
            raise SourceError(f"cannot open {spec}: {e}") from e
    return pafs.LocalFileSystem(), str(Path(spec).expanduser().resolve())


def hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def list_files(spec: str, fs: pafs.FileSystem, root: str) -> Listing:
    """Every file under `root`, sorted, hidden files and folders left out, and the folders
    one and two levels under it."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise SourceError(f"cannot list {spec}: {e}") from e
    every = {f.path: posixpath.relpath(f.path, root) for f in infos if f.type == pafs.FileType.File}
    files = sorted(f for f, rel in every.items() if not hidden(rel))
    skipped = sorted(rel for rel in every.values() if hidden(rel))
    folders = sorted(
        posixpath.relpath(f.path, root) for f in infos if f.type == pafs.FileType.Directory
    )
    return Listing(
        spec,
        fs,
        root,
        files,
        [d for d in folders if d.count("/") == 0],
        [d for d in folders if d.count("/") == 1],
        skipped,
    )


def data_home() -> Path:
    """Where built-in datasets are prepared on first use: $VITRAY_DATA or ./data."""
    return Path(os.environ.get("VITRAY_DATA", "data")).resolve()
