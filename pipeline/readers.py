"""One reader per kind of source, so that `vitray prepare`, the Ray tasks of `build_dataset`
and `vitray bench data`'s DataLoader all see the same rows of the same files.

A reader plans read units on the driver (`plan_units`: a Parquet row group, a WebDataset
tar, a chunk of folder files), which `plan_tasks` groups into the work of one task, and
reads one unit wherever the rows are needed (`read_unit`), as columns {image (encoded
bytes, None when missing), label, id, error[, path, row]}: `error` says why a row is bad
where the reader knows it already (None: not known to be bad), `path` and `row` where a bad
row came from. Hugging Face's features (which column is the Image, which the ClassLabel)
are read and its `{bytes, path}` image struct unpacked here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.sources import Source, SourceError, resolve_source

Rows = dict[str, np.ndarray]
FILES_PER_UNIT = 256  # image-folder files read at once
# Footers of Parquet files that no manifest describes, read at once: on object storage each
# costs a round trip or two, and 10,000 of them one after the other take minutes.
FOOTER_THREADS = 32


class Unit(TypedDict):
    """What is read at once, and what it costs. Every kind fills every key (unused: "", -1,
    []) so that units group into tasks alike."""

    path: str  # a Parquet file or a tar
    row_group: int
    files: list[str]  # folder files
    rows: int  # the rows read: all of the unit's, or its first ones when cut; -1: unknown
    bytes: int  # what reading it fetches (Parquet: its compressed column chunks); -1: unknown


def object_array(values: list) -> np.ndarray:
    """A 1-D object array, even of equal-length bytes (np.array would make a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# Parquet: vitray shards and Hugging Face downloads ------------------------------------------


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


def hf_features(schema: pa.Schema) -> dict[str, dict]:
    """Column -> Hugging Face feature, from the `huggingface` schema metadata that `datasets`
    writes ({} without it)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    return json.loads(meta).get("info", {}).get("features", {}) if meta else {}


def find_column(path: str, schema: pa.Schema, role: str, feature: str) -> str:
    """The one column that holds a Hugging Face `feature` (Image, ClassLabel), else the
    column named `role`."""
    typed = [name for name, f in hf_features(schema).items() if f.get("_type") == feature]
    choose = f"choose one with data.{role}_column (vitray prepare --{role}-column)"
    if len(typed) > 1:
        raise SourceError(f"{path} has {len(typed)} {feature} columns {typed}: {choose}")
    if typed:
        return typed[0]
    if role in schema.names:
        return role
    raise SourceError(
        f"{path} has no {role} column (no {feature} feature, no column named {role!r}); "
        f"its columns are {schema.names}: {choose}"
    )


def check_columns(source: Source, path: str, schema: pa.Schema) -> None:
    """The image column holds encoded bytes (binary, or Hugging Face's {bytes, path}
    struct), the label column integers."""
    for role, column in (("image", source.image_column), ("label", source.label_column)):
        if column not in schema.names:
            raise SourceError(
                f"{path} has no {role} column {column!r}; its columns are {schema.names}"
            )
    image = schema.field(source.image_column).type
    if pa.types.is_struct(image):
        image = image.field("bytes").type if image.get_field_index("bytes") >= 0 else image
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)):
        raise SourceError(
            f"{path}: image column {source.image_column!r} is {image}, not encoded image bytes"
        )
    label = schema.field(source.label_column).type
    if not pa.types.is_integer(label):
        raise SourceError(
            f"{path}: label column {source.label_column!r} is {label}; labels are class indices"
        )


def parquet_roles(source: Source, footers: dict[str, pq.FileMetaData]) -> Source:
    """The image and label columns: given, else the one Image and the one ClassLabel
    feature of the first file, else the columns named image and label; class names from
    the ClassLabel. A vitray dataset's are image and label."""
    if source.kind == "vitray":
        given = {"image": source.image_column, "label": source.label_column}
        wrong = {role: column for role, column in given.items() if column not in (None, role)}
        if wrong:
            raise SourceError(
                f"{source.spec} is a vitray dataset: its columns are image and label, not {wrong}"
            )
        return dataclasses.replace(source, image_column="image", label_column="label")
    path, meta = next(iter(footers.items()))
    schema = meta.schema.to_arrow_schema()
    image = source.image_column or find_column(path, schema, "image", "Image")
    label = source.label_column or find_column(path, schema, "label", "ClassLabel")
    feature = hf_features(schema).get(label, {})
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return dataclasses.replace(source, image_column=image, label_column=label, class_names=names)


def open_parquet(source: Source) -> Source:
    """Columns and the rows and bytes of each row group of every file: from the manifest,
    else from the footers (read in parallel; a manifest written before it recorded row
    groups' sizes too), checked here, on the driver, before any task runs."""
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
    source = parquet_roles(source, footers)
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
    return dataclasses.replace(source, rows=rows, row_groups=known)


def parquet_units(source: Source, files: list[str]) -> list[Unit]:
    """One unit per row group."""
    return [
        Unit(path=path, row_group=g, files=[], rows=rows, bytes=size)
        for path in files
        for g, (rows, size) in enumerate(source.row_groups[path])
    ]


def parquet_rows(source: Source, files: list[str]) -> int:
    return sum(source.rows[path] for path in files)


def read_parquet(source: Source, unit: Unit) -> Rows:
    """A row group; `row` counts from the start of the file. Ids come from an `id` column,
    else from Hugging Face's image paths, else are None. A row group that cannot be read
    is as many bad rows, a row without a label a bad row. A cut unit gives its first rows."""
    path, group = unit["path"], unit["row_group"]
    pf = pq.ParquetFile(path, filesystem=source.filesystem)
    n = min(pf.metadata.row_group(group).num_rows, unit["rows"])
    start = sum(pf.metadata.row_group(g).num_rows for g in range(group))
    where = {"path": object_array([path] * n), "row": np.arange(start, start + n)}
    roles = [source.image_column, source.label_column]
    columns = [*roles, *(["id"] if "id" in pf.schema_arrow.names else [])]
    try:
        table = pf.read_row_group(group, columns=list(dict.fromkeys(columns))).slice(0, n)
    except (OSError, pa.ArrowException) as e:
        return {
            "image": object_array([None] * n),
            "label": np.full(n, -1, dtype=np.int64),
            "id": object_array([None] * n),
            "error": object_array([f"row group {group} unreadable: {e}"] * n),
            **where,
        }
    image = table.column(source.image_column)
    ids = table.column("id") if "id" in columns else None
    if pa.types.is_struct(image.type):  # Hugging Face's Image feature: {bytes, path}
        if ids is None and "path" in [f.name for f in image.type]:
            ids = pc.struct_field(image, "path")
        image = pc.struct_field(image, "bytes")
    labels = table.column(source.label_column)
    missing = labels.is_null().to_numpy(zero_copy_only=False)
    return {
        "image": image.to_numpy(zero_copy_only=False),
        "label": labels.fill_null(-1).to_numpy().astype(np.int64),
        "id": object_array([None] * n) if ids is None else ids.to_numpy(zero_copy_only=False),
        "error": object_array(["no label" if m else None for m in missing]),
        **where,
    }


# WebDataset tars ------------------------------------------------------------------------------
# As webdataset reads them (webdataset.tariterators, .autodecode). A WebDataset names no
# classes and a tar has no index: `vitray prepare` reads every sample and numbers the
# classes 0..largest label; streaming one unprepared counts no rows and takes the number of
# classes from the model it feeds (evaluate, predict), so training on it needs it prepared.

# The key of a member is its path up to the first dot of its base name, directories
# included; the rest, lowercased, its extension (`base_plus_ext`). Members without a dot
# and __meta__ names are no sample members (`tar_file_iterator`).
WDS_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
WDS_META = re.compile(r"__[^/]*__($|/)")
# images: the extensions of the formats pipeline.decode opens
IMAGE_EXTENSIONS = tuple("jpg jpeg jpe jfif png apng webp gif bmp tif tiff".split())
INT_EXTENSIONS = ("cls", "cls2", "index", "inx", "id")  # webdataset decodes them with int()
JSON_EXTENSIONS = ("json", "jsn")


class Sample(NamedTuple):
    """Consecutive members that share a key (`group_by_keys`): extension -> bytes (None
    where not asked for), and why the sample cannot be used."""

    key: str
    fields: dict[str, bytes | None]
    error: str | None = None


def tar_members(source: Source, path: str, wanted: Collection[str]) -> Iterator[tuple]:
    """(name, key, extension, bytes if the extension is `wanted`) of each file in a tar;
    key and extension are None for files that are no sample members."""
    with (
        source.filesystem.open_input_stream(path) as stream,
        tarfile.open(fileobj=stream, mode="r|*") as tar,
    ):
        for info in tar:
            if not info.isreg():
                continue
            match = None if WDS_META.match(info.name) else WDS_MEMBER.match(info.name)
            if match is None:
                yield info.name, None, None, None
                continue
            ext = match[2].lower()
            data = tar.extractfile(info).read() if ext in wanted else None
            yield info.name, match[1], ext, data
        check_end(tar)


def check_end(tar: tarfile.TarFile) -> None:
    """Raise if the members ended before the archive: `tarfile` stops silently at a damaged
    or truncated header past the first. A proper end is zero blocks to the end of the file
    (a tar cut between two members cannot be told from a whole one)."""
    header = tar.fileobj.tell() - tar.offset  # bytes read of the header that ended them
    rest = iter(lambda: tar.fileobj.read(2**20), b"")
    if header % tarfile.BLOCKSIZE or any(chunk.strip(b"\0") for chunk in rest):
        raise tarfile.ReadError(f"damaged member header at byte {tar.offset}")


def tar_samples(source: Source, path: str, wanted: Collection[str]) -> Iterator[Sample]:
    """The samples of a tar in order. A member that repeats an extension of its sample
    makes the sample bad (webdataset: 'duplicate file name'). Damage ends the tar (tarfile
    cannot resume past it): the sample being read is bad, with where and why, and the rest
    is lost."""
    key, fields, error, last = None, {}, None, None
    try:
        for name, k, ext, data in tar_members(source, path, wanted):
            last = name
            if k is None:
                continue
            if k != key:
                if key is not None:
                    yield Sample(key, fields, error)
                key, fields, error = k, {}, None
            if ext in fields:
                error = f"member {name!r} repeats the extension {ext!r} of its sample"
            fields[ext] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        where = f"after member {last!r}" if last else "from its start"
        error = f"tar unreadable {where}: {e}; the rest of it is lost"
        key = key or posixpath.basename(path)
    if key is not None:
        yield Sample(key, fields, error)


def image_extensions(source: Source) -> tuple[str, ...]:
    return (source.image_column,) if source.image_column else IMAGE_EXTENSIONS


def tar_label(source: Source, fields: dict[str, bytes | None]) -> tuple[int, str | None]:
    """(label, None), or (-1, why there is none): the integer in the label member, or
    `label_field` of its json."""
    ext, data = source.label_column, fields.get(source.label_column)
    if data is None:
        return -1, f"no .{ext} label member (its members: {sorted(fields)})"
    try:
        value = json.loads(data)[source.label_field] if ext in JSON_EXTENSIONS else int(data)
    except (ValueError, KeyError, TypeError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool):
        what = f"{source.label_field!r} of " if ext in JSON_EXTENSIONS else ""
        return -1, f"the label ({what}.{ext}: {data[:60]!r}) is not an integer"
    return value, None


def tar_row(source: Source, sample: Sample) -> tuple[bytes | None, int, str | None]:
    """(image bytes, label, why the row is bad) of a sample."""
    if sample.error:
        return None, -1, sample.error
    images = [e for e in image_extensions(source) if e in sample.fields]
    if len(images) != 1:
        many = "several image members" if images else "no image member"
        return None, -1, f"{many} (its members: {sorted(sample.fields)})"
    label, error = tar_label(source, sample.fields)
    return sample.fields[images[0]], label, error


def open_tar(source: Source) -> Source:
    """The label extension: given, else the one of webdataset's integer extensions (with
    `label_field`: json) that the first image sample of the first tar has. Stops naming
    what the tar holds when it has no image sample or that sample no label or several."""
    path, images = source.files[0], image_extensions(source)
    for sample in tar_samples(source, path, wanted=()):
        if any(ext in sample.fields for ext in images):
            break
        if sample.error:
            raise SourceError(f"{path}: {sample.error}")
    else:
        names = [name for name, *_ in tar_members(source, path, wanted=())]
        raise SourceError(
            f"{path} holds no image sample (a member KEY.EXT, EXT one of {list(images)}); "
            f"its {len(names)} files: {names[:8]}"
        )
    if source.label_column:
        wanted = [source.label_column]
    else:
        wanted = list(JSON_EXTENSIONS if source.label_field else INT_EXTENSIONS)
    found = [ext for ext in wanted if ext in sample.fields]
    if len(found) != 1:
        what = f"several labels {found}" if found else f"no label member (.{', .'.join(wanted)})"
        raise SourceError(
            f"{path}: its first image sample {sample.key!r} has members {sorted(sample.fields)}, "
            f"{what}: a label is one of webdataset's integer extensions {list(INT_EXTENSIONS)}, "
            "or json with data.label_field; choose with data.label_column (vitray prepare "
            "--label-column). The members of a sample must be consecutive (tar --sort=name)"
        )
    label = found[0]
    if label in JSON_EXTENSIONS and not source.label_field:
        raise SourceError(f"{path}: a .{label} label needs data.label_field, its key")
    if source.label_field and label not in JSON_EXTENSIONS:
        raise SourceError(f"{source.spec}: data.label_field reads json labels, not .{label}")
    return dataclasses.replace(source, label_column=label)


def tar_units(source: Source, files: list[str]) -> list[Unit]:
    return [Unit(path=path, row_group=-1, files=[], rows=-1, bytes=-1) for path in files]


def read_tar(source: Source, unit: Unit) -> Rows:
    """A row per sample with an image or a label member, a sample that cannot be used
    being a row with its reason; others (captions, metadata) are no images."""
    path = unit["path"]
    wanted = {*image_extensions(source), source.label_column}
    samples = [s for s in tar_samples(source, path, wanted) if s.error or wanted & s.fields.keys()]
    rows = [tar_row(source, s) for s in samples]
    return {
        "image": object_array([image for image, _, _ in rows]),
        "label": np.array([label for _, label, _ in rows], dtype=np.int64),
        "id": object_array([s.key for s in samples]),
        "path": object_array([path] * len(samples)),
        "error": object_array([error for _, _, error in rows]),
    }


# Image folders: one subfolder per class ---------------------------------------------------------


def folder_units(source: Source, files: list[str]) -> list[Unit]:
    chunks = [files[i : i + FILES_PER_UNIT] for i in range(0, len(files), FILES_PER_UNIT)]
    return [Unit(path="", row_group=-1, files=chunk, rows=len(chunk), bytes=-1) for chunk in chunks]


def read_folder(source: Source, unit: Unit) -> Rows:
    """Ids are paths relative to the root; a file that cannot be read is a bad row. Images
    without class subfolders are unlabelled (label -1)."""
    index = {name: i for i, name in enumerate(source.class_names or [])}
    rel = [posixpath.relpath(f, source.root) for f in unit["files"]]
    images, errors = [], []
    for f in unit["files"]:
        try:
            with source.filesystem.open_input_stream(f) as stream:
                images.append(stream.read())
            errors.append(None)
        except OSError as e:
            images.append(None)
            errors.append(f"cannot read: {e}")
    return {
        "image": object_array(images),
        "label": np.array([index.get(r.split("/")[0], -1) for r in rel], dtype=np.int64),
        "id": object_array(rel),
        "error": object_array(errors),
    }


# Dispatch -----------------------------------------------------------------------------------------


class Reader(NamedTuple):
    """How one kind of source is opened, counted, planned and read."""

    open: Callable[[Source], Source]
    rows: Callable[[Source, list[str]], int | None]  # None: unknown without reading
    units: Callable[[Source, list[str]], list[Unit]]
    read: Callable[[Source, Unit], Rows]


READERS = {
    "vitray": Reader(open_parquet, parquet_rows, parquet_units, read_parquet),
    "hf_parquet": Reader(open_parquet, parquet_rows, parquet_units, read_parquet),
    "webdataset": Reader(open_tar, lambda s, files: None, tar_units, read_tar),
    "folder": Reader(lambda s: s, lambda s, files: len(files), folder_units, read_folder),
}


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
    if source.kind == "folder" and any(given.values()):
        raise SourceError(
            f"{spec} is an image folder, labelled by its subfolders: "
            f"data.{', '.join(key for key, value in given.items() if value)} do not apply"
        )
    return READERS[source.kind].open(dataclasses.replace(source, **given))


def task_source(source: Source) -> Source:
    """What a task needs to read its units: the source without its file list, manifest and
    counts, which grow with the shards and would otherwise travel to every task."""
    return dataclasses.replace(source, files=[], manifest=None, rows={}, row_groups={})


def count_rows(source: Source, files: list[str]) -> int | None:
    """The rows of `files`, from metadata only; None where that needs reading them."""
    return READERS[source.kind].rows(source, files)


def plan_units(source: Source, files: list[str]) -> list[Unit]:
    """The read units of `files`, on the driver."""
    return READERS[source.kind].units(source, files)


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
        rows=rows,
        bytes=size,
    )


def read_unit(source: Source, unit: Unit) -> Rows:
    """The rows of one unit, in file order."""
    return READERS[source.kind].read(source, unit)


def batches(rows: Rows, size: int) -> Iterator[Rows]:
    """`rows` `size` at a time."""
    for start in range(0, len(rows["label"]), size):
        yield {key: column[start : start + size] for key, column in rows.items()}
