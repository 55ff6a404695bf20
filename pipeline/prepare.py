"""`vitray prepare SRC OUT`: images into Parquet shards of their original bytes + manifest.json.

Every image is decoded once to check it (bad files are skipped and listed in the manifest,
or stop the run in strict mode); bytes are never re-encoded. Output is written to a
temporary directory and renamed into place, so OUT is either complete or absent; with
--overwrite the old output stays until the new one is complete, and only an earlier output
of prepare (or an empty directory) is ever replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.builtin import Item, builtin_items, fashion_mnist_dir, parse_builtin
from pipeline.console import ConsoleLine
from pipeline.decode import BadImage, image_bytes, load, open_image
from pipeline.kinds import KINDS
from pipeline.kinds.parquet import row_group_sizes
from pipeline.kinds.vitray import FORMAT, read_manifest
from pipeline.readers import count_rows, in_val, open_source, plan_units, read_unit
from pipeline.sources import MANIFEST, Source, SourceError

SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64())])
ROW_GROUP_BYTES = 8 * 2**20  # the unit of parallel reading and decoding (~250 photos)
UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "b": 1}


def parse_size(text: str | int) -> int:
    """'256MB' -> 268435456."""
    if isinstance(text, int):
        return text
    s = text.strip().lower()
    for unit, factor in UNITS.items():
        if s.endswith(unit) and s[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(s[: -len(unit)]) * factor)
    if s.isdigit():
        return int(s)
    raise ValueError(f"cannot read size {text!r}; use e.g. 256MB or 1GB")


class Progress:
    """Done/total, rate and skipped images on one stderr line: redrawn twice a second on a
    terminal, a plain line every 10 s in a log."""

    def __init__(self, desc: str, total: int | None, enabled: bool = True) -> None:
        self.desc, self.total, self.enabled = desc, total, enabled
        self.done = self.skipped = 0
        self.start = self.last = time.monotonic()
        self.line = ConsoleLine(sys.stderr, every_s=10)

    def update(self, done: int = 1, skipped: int = 0) -> None:
        self.done += done
        self.skipped += skipped
        now = time.monotonic()
        if self.enabled and now - self.last > 0.5:
            self.last = now
            self.line.show(self.text())

    def close(self) -> None:
        if self.enabled:
            self.line.show(self.text(), keep=True)

    def text(self) -> str:
        rate = self.done / max(time.monotonic() - self.start, 1e-9)
        total = f"/{self.total}" if self.total else ""
        return f"{self.desc}: {self.done}{total} images, {rate:.0f} img/s, {self.skipped} skipped"


class ShardWriter:
    """Writes one split as `{split}-NNNNN.parquet` files of about `shard_size` bytes."""

    def __init__(self, out: Path, split: str, shard_size: int) -> None:
        self.out, self.split, self.shard_size = out, split, shard_size
        self.shards: list[dict] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows: list[tuple[str, bytes, int]] = []
        self.buffered = self.file_bytes = self.file_rows = 0

    def add(self, item_id: str, data: bytes, label: int) -> None:
        self.rows.append((item_id, data, label))
        self.buffered += len(data)
        if self.buffered >= min(ROW_GROUP_BYTES, self.shard_size):
            self._flush_rows()
        if self.file_bytes >= self.shard_size:
            self._close_file()

    def _flush_rows(self) -> None:
        if not self.rows:
            return
        if self.writer is None:
            name = f"{self.split}-{len(self.shards):05d}.parquet"
            self.writer = pq.ParquetWriter(self.out / name, SCHEMA, compression="none")
            self.shards.append({"file": name})
        ids, images, labels = zip(*self.rows, strict=True)
        self.writer.write_table(pa.table([list(ids), list(images), list(labels)], schema=SCHEMA))
        self.file_bytes += self.buffered
        self.file_rows += len(self.rows)
        self.rows, self.buffered = [], 0

    def _close_file(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        shard = self.shards[-1]
        path = self.out / shard["file"]
        groups = row_group_sizes(pq.read_metadata(path))
        shard.update(
            rows=self.file_rows,
            row_groups=len(groups),
            # planning reads these instead of every footer (pipeline.readers.open_parquet)
            row_group_rows=[rows for rows, _ in groups],
            row_group_bytes=[size for _, size in groups],
            bytes=path.stat().st_size,
            sha256=_sha256(path),
        )
        self.file_bytes = self.file_rows = 0

    def close(self) -> dict:
        self._flush_rows()
        self._close_file()
        return {"rows": sum(s["rows"] for s in self.shards), "shards": self.shards}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_items(
    spec: str, seed: int, columns: dict[str, str]
) -> tuple[Iterable[Item], int | None, list[str] | None, str, list[str]]:
    """(items, their count if known, class names, kind, the source's splits). Sources are
    read unit by unit by `pipeline.readers`, as streaming reads them, with the `columns`
    given (image_column, label_column, label_field). Built-ins and image files come sorted
    by class: they are shuffled with `seed`, so that shards mix classes."""
    if spec.startswith("builtin:"):
        if columns:
            raise SourceError(f"{spec} has no columns to choose: {sorted(columns)} do not apply")
        if parse_builtin(spec)[0] == "fashion-mnist":
            items, count, classes, _, splits = source_items(fashion_mnist_dir(), seed, {})
            return items, count, classes, "builtin", splits
        items, classes = builtin_items(spec)
        random.Random(seed).shuffle(items)
        return items, len(items), classes, "builtin", sorted({i.split or "train" for i in items})
    source = open_source(spec, **columns)
    if source.kind == "vitray":
        raise SourceError(f"{spec} is already a vitray dataset; train on it directly")
    if source.class_names is None and source.kind == "folder":
        shown = [posixpath.relpath(f, source.root) for f in source.files[:8]]
        raise SourceError(
            f"{spec} holds images but no class subfolders (its files: {shown}); prepare one "
            "subfolder per class (`vitray predict` reads unlabelled images as they are)"
        )
    by_file = KINDS[source.kind].rows_are_files
    splits = {}
    for split, files in source.splits.items():
        splits[split] = list(files)
        if by_file:
            random.Random(seed).shuffle(splits[split])
    count = count_rows(source, source.files)
    return _unit_items(source, splits), count, source.class_names, source.kind, sorted(splits)


def _unit_items(source: Source, splits: dict[str, list[str]]) -> Iterator[Item]:
    for split, files in splits.items():
        for unit in plan_units(source, files):
            rows = read_unit(source, unit)
            for i, data in enumerate(rows["image"]):
                # Parquet rows without an id (or a Hugging Face path) are named FILE:ROW
                item_id = rows["id"][i] or f"{posixpath.basename(unit['path'])}:{rows['row'][i]}"
                yield Item(
                    str(item_id),
                    int(rows["label"][i]),
                    split,
                    read_or_raise(data, rows["error"][i]),
                )


def read_or_raise(data: bytes | None, error: str | None) -> Callable[[], bytes | None]:
    """An item's `read`: its bytes, or the reason its reader gave for a bad row."""

    def read() -> bytes | None:
        if error is not None:
            raise BadImage(error)
        return data

    return read


def assign_split(item: Item, val_fraction: float, seed: int, carve: bool) -> str:
    """The item's own split; when the source has no val split (`carve`), a `val_fraction`
    of train by a stable hash of the id: the same on every re-run."""
    split = item.split or "train"
    if carve and split == "train" and in_val(seed, item.id, val_fraction):
        return "val"
    return split


def check_image(item: Item) -> tuple[Item, bytes, str | None]:
    """Read and fully decode one image (at 1/8 scale for JPEG: the whole stream is parsed)."""
    try:
        data = image_bytes(item.read())
        load(open_image(data), min_size=(1, 1))
        return item, data, None
    except BadImage as e:
        return item, b"", str(e)
    except OSError as e:
        return item, b"", f"cannot read: {e}"


def _checked(items: Iterable[Item], workers: int) -> Iterable[tuple[Item, bytes, str | None]]:
    """Decode checks in a thread pool (PIL releases the GIL), in order, bounded memory."""
    it = iter(items)
    with ThreadPoolExecutor(workers) as pool:
        while chunk := list(islice(it, 256)):
            yield from pool.map(check_image, chunk)


def earlier_output(out: Path) -> dict | None:
    """The manifest of a directory `prepare` wrote, or None (no manifest, or not ours)."""
    return read_manifest(pafs.LocalFileSystem(), str(out / MANIFEST))


def written_by(manifest: dict) -> set[str]:
    """The names `prepare` put in its output: the manifest and the shards it lists."""
    shards = (s["file"] for split in manifest.get("splits", {}).values() for s in split["shards"])
    return {MANIFEST, *shards}


def check_out(out: Path, spec: str, options: dict, overwrite: bool) -> dict | None:
    """Whether `out` may be written: None when it may; its manifest when it already holds
    `spec` with these `options` (nothing to do). `overwrite` replaces an earlier output of
    prepare or an empty directory and nothing else: a folder of source images given as
    OUT by mistake stays as it is."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise SourceError(f"{out} is a file; OUT must be a directory")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return None
    manifest = earlier_output(out)
    if manifest is None:
        raise SourceError(
            f"{out} is not empty and not a vitray dataset (it holds {names[:5]}); prepare "
            "never replaces it, --overwrite included: choose another directory"
        )
    if not overwrite:
        if manifest.get("source") == spec and manifest.get("options") == options:
            return manifest
        raise SourceError(
            f"{out} already holds a different dataset ({manifest.get('source')}); "
            "refusing to mix them: choose another directory or pass --overwrite"
        )
    others = sorted(set(names) - written_by(manifest))
    if others:
        raise SourceError(
            f"{out} holds files prepare did not write ({others[:5]}); --overwrite replaces "
            "only an earlier output of prepare: move them or choose another directory"
        )
    return None


def swap_in(tmp: Path, out: Path) -> None:
    """The complete new output in place of the old, which is removed only after: renames
    within one directory, so OUT is at every moment the old output or the new one."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old)


def prepare(
    spec: str,
    out: str | Path,
    shard_size: str | int = "256MB",
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
    label_field: str | None = None,
) -> dict:
    """Write `spec` as shards under `out`; returns the manifest. `image_column`,
    `label_column` and `label_field` say where the images and labels are (DataConfig's
    fields of those names; default: detected)."""
    if "://" in str(out):
        raise SourceError("prepare writes to a local directory; copy it to object storage after")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    given = {
        "image_column": image_column,
        "label_column": label_column,
        "label_field": label_field,
    }
    columns = {key: value for key, value in given.items() if value is not None}
    options = {
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_size": parse_size(shard_size),
        **columns,
    }
    done = check_out(out, spec, options, overwrite)
    if done is not None:
        print(f"{out} already holds {spec} (same options); nothing to do", file=sys.stderr)
        return done
    items, count, class_names, kind, splits = source_items(spec, seed, columns)
    if class_names is not None and len(class_names) < 2:
        raise SourceError(f"{spec} has {len(class_names)} class {class_names}: training needs 2")
    carve = "val" not in splits and val_fraction > 0
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers: dict[str, ShardWriter] = {}
        skipped, max_label = [], -1
        bar = Progress(f"prepare {spec}", count, progress)
        for item, data, error in _checked(items, workers=max(2, os.cpu_count() or 2)):
            if error is None and item.label < 0:
                error = f"label {item.label} is negative"
            elif error is None and class_names is not None and item.label >= len(class_names):
                error = f"label {item.label} outside [0, {len(class_names)})"
            if error is not None:
                if strict:
                    raise BadImage(f"{item.id}: {error}")
                skipped.append({"id": item.id, "reason": error})
                bar.update(skipped=1)
                continue
            split = assign_split(item, val_fraction, seed, carve)
            if split not in writers:
                writers[split] = ShardWriter(tmp, split, options["shard_size"])
            writers[split].add(item.id, data, item.label)
            max_label = max(max_label, item.label)
            bar.update()
        bar.close()
        if not writers:
            reasons = Counter(s["reason"] for s in skipped).most_common(3)
            raise SourceError(f"{spec} holds no usable image: {len(skipped)} bad, {reasons}")
        if class_names is None:
            class_names = [str(i) for i in range(max_label + 1)]
            if len(class_names) < 2:
                raise SourceError(f"{spec}: every label is {max_label}; training needs 2 classes")
        manifest = {
            "format": FORMAT,
            "version": 1,
            "source": spec,
            "source_kind": kind,
            "options": options,
            "class_names": class_names,
            "num_classes": len(class_names),
            "splits": {name: w.close() for name, w in sorted(writers.items())},
            # which rows validate: the source's own val split, or a seeded share of train
            "val_from": f"train (val_fraction {val_fraction}, seed {seed})" if carve else "val",
            "skipped": skipped,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = ", ".join(f"{k} {v['rows']}" for k, v in manifest["splits"].items())
    print(f"wrote {out}: {counts}; {len(skipped)} skipped", file=sys.stderr)
    return manifest
