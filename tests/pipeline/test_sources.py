"""Sources as their own libraries write them: Hugging Face `datasets` Parquet, `webdataset`
tars and plain `tar`, image folders; opened on the driver, streamed on a real local Ray."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, describe_dataset
from pipeline.sources import split_of_path

from helpers import encode, photo

FRUIT = ["apple", "pear", "plum"]


def jpeg(i: int, size: tuple[int, int] = (96, 80)) -> bytes:
    return encode(PILImage.fromarray(photo(size, seed=i)), "JPEG")


def collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def hf_split(root: Path, split: str, n: int, shards: int = 1, **columns: str) -> None:
    """`n` rows of one split laid out as `push_to_hub` does (data/<split>-0000i-of-0000n),
    written by `datasets` with an Image and a ClassLabel feature; `columns` renames them
    (image=..., label=...)."""
    image, label = columns.get("image", "image"), columns.get("label", "label")
    features = Features({image: Image(), label: ClassLabel(names=FRUIT)})
    rows = {
        image: [{"bytes": jpeg(i), "path": f"{split}/{i}.jpg"} for i in range(n)],
        label: [i % len(FRUIT) for i in range(n)],
    }
    ds = Dataset.from_dict(rows, features=features)
    for i in range(shards):
        out = root / "data" / f"{split}-{i:05d}-of-{shards:05d}.parquet"
        ds.shard(shards, i, contiguous=True).to_parquet(str(out), batch_size=4)


def test_split_names_follow_hugging_face_datasets():
    names = {
        "data/train-00000-of-00002.parquet": "train",
        "data/validation-00001-of-00002.parquet": "val",
        "data/test-00000-of-00001.parquet": "test",
        "data/extra-00000-of-00001.parquet": "extra",  # push_to_hub names any split
        "valid/0.parquet": "val",
        "imagenet1k-validation-0001.tar": "val",  # a keyword between non-word characters
        "shards/dev_03.tar": "val",
        "train0.tar": "train",
        "interval-0001.tar": None,  # 'val' inside a word is no keyword
        "shard-000.tar": None,
    }
    assert {path: split_of_path(f"/r/{path}", "/r") for path in names} == names


def test_hugging_face_download_streams_without_prepare(ray_local, tmp_path, monkeypatch):
    """data/<split>-*.parquet as downloaded: split sizes from the footers alone."""
    for split, n, shards in (("train", 10, 2), ("validation", 5, 1), ("test", 3, 1)):
        hf_split(tmp_path, split, n, shards)
    cfg = DataConfig(dataset=str(tmp_path), image_size=32)

    def no_data(*args, **kwargs):
        raise AssertionError("describe_dataset read data pages")

    with monkeypatch.context() as m:
        m.setattr(pq.ParquetFile, "read_row_group", no_data)
        m.setattr(pq.ParquetFile, "read", no_data)
        info = describe_dataset(cfg)
    assert info.split_rows == {"train": 10, "val": 5, "test": 3}
    assert info.class_names == FRUIT
    val = collect(build_dataset(cfg, "val", 16, keep_ids=True))
    order = np.argsort(val["id"])
    assert val["id"][order].tolist() == [f"validation/{i}.jpg" for i in range(5)]
    assert val["ok"].all() and val["label"][order].tolist() == [i % 3 for i in range(5)]
    train = collect(build_dataset(cfg, "train", 16))
    assert len(train["label"]) == 10 and train["ok"].all()
