"""WebDataset `.tar` shards (and plain tars of a directory), read as the webdataset library
reads them (webdataset.tariterators, .autodecode). A WebDataset names no classes and a tar
has no index: `vitray prepare` reads every sample and numbers the classes 0..largest label;
streaming one unprepared counts no rows and takes the number of classes from the model it
feeds (evaluate, predict), so training on it needs it prepared."""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Collection, Iterator
from typing import NamedTuple

import numpy as np

from pipeline.kinds.base import Rows, SourceKind, Unit, object_array, unit
from pipeline.sources import Listing, Source, SourceError, splits_by_name

TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")  # WebDataset shards, as webdataset reads them

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


class WebDataset(SourceKind):
    name = "webdataset"
    layout = "a WebDataset"
    columns = "WebDataset extensions"

    def claims(self, listing: Listing) -> list[str]:
        return [f for f in listing.files if f.endswith(TAR_SUFFIXES)]

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        splits = splits_by_name(listing.spec, listing.root, files)
        return Source(
            self.name, listing.root, listing.filesystem, None, files, splits, spec=listing.spec
        )

    def open(self, source: Source) -> Source:
        return open_tar(source)

    def rows(self, source: Source, files: list[str]) -> int | None:
        return None

    def units(self, source: Source, files: list[str]) -> list[Unit]:
        return [unit(path) for path in files]

    def read(self, source: Source, unit: Unit) -> Rows:
        """A row per sample with an image or a label member, a sample that cannot be used
        being a row with its reason; others (captions, metadata) are no images."""
        path = unit["path"]
        wanted = {*image_extensions(source), source.label_column}
        samples = [
            s for s in tar_samples(source, path, wanted) if s.error or wanted & s.fields.keys()
        ]
        rows = [tar_row(source, s) for s in samples]
        return {
            "image": object_array([image for image, _, _ in rows]),
            "label": np.array([label for _, label, _ in rows], dtype=np.int64),
            "id": object_array([s.key for s in samples]),
            "path": object_array([path] * len(samples)),
            "error": object_array([error for _, _, error in rows]),
        }
