"""Sources whose rows are image files, each labelled on the driver (image folders): what
the torchvision and Hugging Face image-folder kinds share."""

from __future__ import annotations

import posixpath

import numpy as np

from pipeline.kinds.base import Rows, SourceKind, Unit, object_array
from pipeline.sources import Source, SourceError

FILES_PER_UNIT = 256  # image files read at once


def check_split_classes(spec: str, layout: str, labels: dict[str, set[str]]) -> None:
    """Refuse a val or test split (any but train) whose classes train does not have: its
    rows would be scored against classes the model never saw."""
    if "train" not in labels:
        return
    for split, names in sorted(labels.items()):
        extra = sorted(names - labels["train"])
        if extra:
            raise SourceError(
                f"{spec} ({layout}): split {split!r} has classes that train does not have: "
                f"{extra[:8]}; a model trained on train cannot score them"
            )


class FilesKind(SourceKind):
    rows_are_files = True

    def rows(self, source: Source, files: list[str]) -> int | None:
        return len(files)

    def units(self, source: Source, files: list[str]) -> list[Unit]:
        chunks = [files[i : i + FILES_PER_UNIT] for i in range(0, len(files), FILES_PER_UNIT)]
        return [
            Unit(
                path="",
                row_group=-1,
                files=chunk,
                labels=[source.file_labels.get(f, -1) for f in chunk],
                rows=len(chunk),
                bytes=-1,
            )
            for chunk in chunks
        ]

    def read(self, source: Source, unit: Unit) -> Rows:
        """Ids are paths relative to the root; a file that cannot be read is a bad row.
        Unlabelled images (no class) are label -1."""
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
            "label": np.array(unit["labels"], dtype=np.int64),
            "id": object_array([posixpath.relpath(f, source.root) for f in unit["files"]]),
            "error": object_array(errors),
        }
