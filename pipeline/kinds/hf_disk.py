"""A `datasets` `save_to_disk` directory, a `Dataset` (state.json, dataset_info.json,
data-*.arrow) or a `DatasetDict` (dataset_dict.json naming a folder per split), read in
place with pyarrow: Arrow stream files, a unit per record batch, columns and class names
from the Image and ClassLabel features, as `datasets.load_from_disk` gives them."""

from __future__ import annotations

import dataclasses
import json
import posixpath

import numpy as np
import pyarrow as pa

from pipeline.kinds.base import Rows, SourceKind, Unit, bad_rows, object_array
from pipeline.kinds.columns import check_columns, class_names_of, roles_of_files, table_rows
from pipeline.sources import SPLIT_ALIASES, Listing, Source, SourceError

STATE, DICT = "state.json", "dataset_dict.json"


def read_json(fs, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def open_stream(source: Source, path: str) -> pa.ipc.RecordBatchStreamReader:
    """An Arrow stream file: memory-mapped when local (reading batch g skips the ones
    before it without copying them)."""
    if isinstance(source.filesystem, pa.fs.LocalFileSystem):
        return pa.ipc.open_stream(pa.memory_map(path))
    return pa.ipc.open_stream(source.filesystem.open_input_file(path))


class HfDisk(SourceKind):
    name = "hf_disk"
    layout = "a Hugging Face save_to_disk directory"
    columns = "Arrow columns"

    def claims(self, listing: Listing) -> list[str]:
        marks = [f for f in listing.files if posixpath.basename(f) in (STATE, DICT)]
        if not marks:
            return []
        return marks + [f for f in listing.files if f.endswith(".arrow")]

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        fs, root = listing.filesystem, listing.root
        top = posixpath.join(root, DICT)
        if top in files:
            names = read_json(fs, top)["splits"]
            folders = {SPLIT_ALIASES.get(n.lower(), n): posixpath.join(root, n) for n in names}
            if len(folders) < len(names):
                raise SourceError(f"{listing.spec} could be read two ways: splits {names}")
        elif posixpath.join(root, STATE) in files:
            folders = {"train": root}
        else:
            raise SourceError(
                f"{listing.spec} holds save_to_disk output below its root "
                f"({[listing.rel(f) for f in files if f.endswith('.json')][:4]}): point at "
                "the folder with dataset_dict.json or state.json"
            )
        splits = {}
        for split, folder in folders.items():
            state = read_json(fs, posixpath.join(folder, STATE))
            splits[split] = [posixpath.join(folder, d["filename"]) for d in state["_data_files"]]
        data = sorted(f for fs_ in splits.values() for f in fs_)
        return Source(self.name, root, fs, None, data, splits, spec=listing.spec)

    def open(self, source: Source) -> Source:
        if source.label_field is not None:
            raise SourceError(f"{source.spec} is {self.layout}: data.label_field does not apply")
        counts, schemas = {}, {}
        for path in source.files:
            try:
                reader = open_stream(source, path)
                schemas[path] = reader.schema
                counts[path] = [(b.num_rows, b.nbytes) for b in reader]
            except (OSError, pa.ArrowException) as e:
                raise SourceError(f"cannot read Arrow file {path}: {e}") from e
        if not schemas:
            raise SourceError(f"{source.spec} lists no Arrow files")
        source = roles_of_files(source, schemas)
        for path, schema in schemas.items():
            check_columns(source, path, schema)
        if source.class_names is None:
            columns = [self.read_column(source, path) for path in source.files]
            source = dataclasses.replace(source, class_names=class_names_of(columns))
        rows = {path: sum(n for n, _ in groups) for path, groups in counts.items()}
        return dataclasses.replace(source, rows=rows, row_groups=counts)

    def read_column(self, source: Source, path: str) -> pa.ChunkedArray:
        return open_stream(source, path).read_all().column(source.label_column)

    def read(self, source: Source, unit: Unit) -> Rows:
        path, group = unit["path"], unit["row_group"]
        start = 0
        try:
            for g, batch in enumerate(open_stream(source, path)):
                if g == group:
                    break
                start += batch.num_rows
            else:
                raise pa.ArrowInvalid(f"record batch {group} missing")
        except (OSError, pa.ArrowException) as e:
            n = max(unit["rows"], 0)
            where = {"path": object_array([path] * n), "row": np.arange(start, start + n)}
            return bad_rows(n, f"record batch {group} unreadable: {e}", **where)
        n = min(batch.num_rows, unit["rows"])
        where = {"path": object_array([path] * n), "row": np.arange(start, start + n)}
        columns = list(dict.fromkeys([source.image_column, source.label_column]))
        columns += ["id"] if "id" in batch.schema.names else []
        table = pa.Table.from_batches([batch.select(columns)]).slice(0, n)
        return table_rows(source, table, where)
