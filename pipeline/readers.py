"""One reader per kind of source (`pipeline.kinds`), so that `vitray prepare`, the Ray tasks
of `build_dataset` and `vitray bench data`'s DataLoader all see the same rows of the same
files: a spec resolves to the one kind whose layout it holds, which plans read units on the
driver (`plan_units`: a Parquet row group, an Arrow record batch, a tar, a chunk of image
files), grouped by `plan_tasks` into the work of one task, and reads one unit wherever the
rows are needed (`read_unit`). A val split that a source lacks is carved from train here,
the same rows on every run and node.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow.fs as pafs
import yaml

from pipeline.kinds import KINDS
from pipeline.kinds.base import Rows, Unit
from pipeline.kinds.vitray import is_prepared
from pipeline.kinds.webdataset import INT_EXTENSIONS
from pipeline.sources import MANIFEST, Listing, Source, SourceError, filesystem_for, list_files

__all__ = ["INT_EXTENSIONS", "Rows", "Unit"]


def resolve_source(spec: str) -> Source:
    """The one layout `spec` holds, from listings and small metadata files only. A source
    that holds two layouts at once is refused, naming both."""
    if spec.startswith("builtin:"):
        raise SourceError(f"{spec} must be prepared first (pipeline.dataset does it for you)")
    fs, root = filesystem_for(spec)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"dataset path does not exist: {spec}")
    if info.type == pafs.FileType.File:
        listing = Listing(spec, fs, posixpath.dirname(root), [root])
    elif is_prepared(fs, root):
        # a prepared dataset: its manifest lists the shards (listing 10,000 objects on S3
        # took seconds)
        listing = Listing(spec, fs, root, [posixpath.join(root, MANIFEST)])
    else:
        listing = list_files(spec, fs, root)
        refuse_readme_configs(listing)
    claims = {name: kind.claims(listing) for name, kind in KINDS.items()}
    found = {name: files for name, files in claims.items() if files}
    if len(found) > 1:
        layouts = "; ".join(
            f"{KINDS[name].layout} ({[listing.rel(f) for f in files[:3]]})"
            for name, files in found.items()
        )
        raise SourceError(f"{spec} holds two layouts at once: {layouts}; point at one of them")
    if not found:
        rel = [listing.rel(f) for f in listing.files]
        raise SourceError(
            f"{spec} holds no layout vitray reads (a manifest.json, Parquet, Arrow, .tar or "
            f"IDX files, images in class subfolders); its {len(rel)} files: {rel[:8]}"
        )
    ((name, files),) = found.items()
    return KINDS[name].resolve(listing, files)


def refuse_readme_configs(listing: Listing) -> None:
    """A Hub dataset's README.md may map files to splits (`configs:` with `data_files` in its
    YAML header), overriding the names that `datasets` goes by otherwise. vitray reads
    splits from names only, so such a dataset is refused rather than read with other splits."""
    readme = posixpath.join(listing.root, "README.md")
    if readme not in listing.files:
        return
    with listing.filesystem.open_input_stream(readme) as stream:
        text = stream.read(1 << 20).decode("utf-8", errors="replace")
    header = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    try:
        meta = yaml.safe_load(header[1]) if header else None
    except yaml.YAMLError:
        return  # `datasets` fails on it too; the files are read by their names
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if configs:
        names = [c.get("config_name", "default") for c in configs if isinstance(c, dict)]
        raise SourceError(
            f"{listing.spec}: its README.md maps files to splits (configs {names}), which "
            "vitray does not read; `datasets.load_dataset` does: save the config you want "
            "with `load_dataset(...).save_to_disk(DIR)` and point data.dataset at DIR"
        )


def open_source(
    spec: str,
    image_column: str | None = None,
    label_column: str | None = None,
    label_field: str | None = None,
) -> Source:
    """`resolve_source`, then what its reader learns on the driver: where the images and
    labels are (given, else detected), class names, counts."""
    source = resolve_source(spec)
    given = {
        "image_column": image_column,
        "label_column": label_column,
        "label_field": label_field,
    }
    return KINDS[source.kind].open(dataclasses.replace(source, **given))


def task_source(source: Source) -> Source:
    """What a task needs to read its units: the source without its file lists, manifest,
    counts and labels, which grow with the data and would otherwise travel to every task."""
    return dataclasses.replace(
        source, files=[], splits={}, manifest=None, rows={}, row_groups={}, file_labels={}
    )


def count_rows(source: Source, files: list[str]) -> int | None:
    """The rows of `files`, from metadata only; None where that needs reading them."""
    return KINDS[source.kind].rows(source, files)


def plan_units(source: Source, files: list[str]) -> list[Unit]:
    """The read units of `files`, on the driver."""
    return KINDS[source.kind].units(source, files)


def in_val(seed: int, key: str, fraction: float) -> bool:
    """Whether a row (or file) of this key is carved into val: a stable hash, the same on
    every run and every node, and the one `vitray prepare` uses."""
    return zlib.crc32(f"{seed}:{key}".encode()) % 1_000_000 < fraction * 1_000_000


def carve_units(source: Source, fraction: float, seed: int) -> dict[str, list[Unit]]:
    """Train's units split into train and a carved val of about `fraction` of its rows:
    image files one by one (by the hash `prepare` uses, so both pick the same files), other
    kinds by whole units in a `seed`ed order (nothing is read twice); each side keeps one
    unit at least."""
    files = source.split_files("train")
    if KINDS[source.kind].rows_are_files:
        root = source.root
        val = [f for f in files if in_val(seed, posixpath.relpath(f, root), fraction)]
        carved = set(val)
        rest = [f for f in files if f not in carved]
        return {"train": plan_units(source, rest), "val": plan_units(source, val)}
    units = plan_units(source, files)
    if any(u["rows"] < 0 for u in units):
        raise SourceError(
            f"{source.spec}: carving a val split needs the rows of every unit; prepare it "
            "(vitray prepare --val-fraction) or name a split with data.val_split"
        )
    if len(units) < 2:
        raise SourceError(
            f"{source.spec}: train is one read unit, too few to carve val from whole units; "
            "prepare it (vitray prepare --val-fraction carves by row)"
        )
    want = fraction * sum(u["rows"] for u in units)
    chosen: set[int] = set()
    taken = 0
    for i in np.random.default_rng(seed).permutation(len(units)).tolist():
        # the nearest whole-unit total to the share asked, one unit at least
        if chosen and (taken + units[i]["rows"] / 2 > want or len(chosen) == len(units) - 1):
            break
        chosen.add(i)
        taken += units[i]["rows"]
    return {
        "train": [u for i, u in enumerate(units) if i not in chosen],
        "val": [u for i, u in enumerate(units) if i in chosen],
    }


def plan_tasks(units: list[Unit], target_bytes: int) -> list[list[Unit]]:
    """Consecutive units grouped into the work of one task, up to `target_bytes` each (a
    larger unit alone): thousands of small shards make few tasks, and a task still yields
    unit by unit. A unit of unknown size is a task of its own."""
    tasks: list[list[Unit]] = []
    size = 0
    for unit in units:
        fits = tasks and min(unit["bytes"], tasks[-1][-1]["bytes"]) >= 0
        if fits and size + unit["bytes"] <= target_bytes:
            tasks[-1].append(unit)
            size += unit["bytes"]
        else:
            tasks.append([unit])
            size = unit["bytes"]
    return tasks


def sample_units(units: list[Unit], rows: int, seed: int) -> list[Unit]:
    """`rows` rows (all, if fewer) from whole units taken in a `seed`ed random order, the
    last one cut, in plan order: the same rows on every call. Whole units rather than
    scattered rows, because a row costs reading its whole row group."""
    if any(unit["rows"] < 0 for unit in units):
        raise SourceError("a sample of rows needs the row count of every unit: prepare it")
    taken: dict[int, int] = {}  # unit -> its first rows taken
    left = rows
    for i in np.random.default_rng(seed).permutation(len(units)).tolist():
        if left <= 0:
            break
        if units[i]["rows"]:
            taken[i] = min(units[i]["rows"], left)
            left -= taken[i]
    return [cut(units[i], taken[i]) for i in sorted(taken)]


def cut(unit: Unit, rows: int) -> Unit:
    """The unit's first `rows` rows (a folder unit's first files)."""
    if rows >= unit["rows"]:
        return unit
    size = unit["bytes"] * rows // unit["rows"] if unit["bytes"] >= 0 else -1
    return Unit(
        path=unit["path"],
        row_group=unit["row_group"],
        files=unit["files"][:rows],
        labels=unit["labels"][:rows],
        rows=rows,
        bytes=size,
    )


def read_unit(source: Source, unit: Unit) -> Rows:
    """The rows of one unit, in file order."""
    return KINDS[source.kind].read(source, unit)


def batches(rows: Rows, size: int) -> Iterator[Rows]:
    """`rows` `size` at a time."""
    for start in range(0, len(rows["label"]), size):
        yield {key: column[start : start + size] for key, column in rows.items()}
