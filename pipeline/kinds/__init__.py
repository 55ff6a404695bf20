"""Every kind of source vitray reads, in detection order. Adding a kind is one module with
one `SourceKind` class, plus its line here."""

from __future__ import annotations

from pipeline.kinds.base import SourceKind
from pipeline.kinds.hf_disk import HfDisk
from pipeline.kinds.hf_imagefolder import HfImageFolder
from pipeline.kinds.hf_parquet import HfParquet
from pipeline.kinds.idx import Idx
from pipeline.kinds.image_folder import ImageFolder
from pipeline.kinds.vitray import VitrayShards
from pipeline.kinds.webdataset import WebDataset

KINDS: dict[str, SourceKind] = {
    kind.name: kind
    for kind in (
        VitrayShards(),
        HfDisk(),
        HfParquet(),
        WebDataset(),
        Idx(),
        HfImageFolder(),
        ImageFolder(),
    )
}
