"""Sources as their own libraries write them: Hugging Face `datasets` Parquet, `webdataset`
tars and plain `tar`, image folders; opened on the driver, streamed on a real local Ray."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from jobs.cli import main
from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, describe_dataset
from pipeline.prepare import prepare
from pipeline.sources import SourceError, split_of_path

from helpers import encode, photo

FRUIT = ["apple", "pear", "plum"]


def jpeg(i: int, size: tuple[int, int] = (96, 80)) -> bytes:
    return encode(PILImage.fromarray(photo(size, seed=i)), "JPEG")


def collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def cell(feature, split: str, i: int):
    """Row `i`'s value of a feature: a JPEG (an Image: with a path), a class index, a name."""
    if isinstance(feature, Image):
        return {"bytes": jpeg(i), "path": f"{split}/{i}.jpg"}
    if isinstance(feature, ClassLabel):
        return i % feature.num_classes
    return {"binary": jpeg(i), "string": FRUIT[i % 3]}.get(feature.dtype, i % 3)


def hf_split(root: Path, split: str, n: int, shards: int = 1, features: dict | None = None) -> None:
    """`n` rows of one split laid out as `push_to_hub` does (data/<split>-0000i-of-0000n),
    written by `datasets`; `features`: column -> feature (default: image, an Image, and
    label, a ClassLabel of FRUIT)."""
    features = features or {"image": Image(), "label": ClassLabel(names=FRUIT)}
    rows = {name: [cell(f, split, i) for i in range(n)] for name, f in features.items()}
    ds = Dataset.from_dict(rows, features=Features(features))
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


def test_columns_are_found_by_their_hugging_face_features(ray_local, tmp_path, capsys):
    """Whatever their names, the Image and the ClassLabel column; two ClassLabels (CIFAR-100's
    fine and coarse labels) need data.label_column, which also picks the class names."""
    coarse = ["fruit", "veg"]
    features = {
        "img": Image(),
        "fine_label": ClassLabel(names=FRUIT),
        "coarse_label": ClassLabel(names=coarse),
    }
    hf_split(tmp_path / "cifar", "train", 6, features=features)
    cfg = DataConfig(dataset=str(tmp_path / "cifar"), image_size=32)
    ambiguous = r"train-00000-of-00001\.parquet has 2 ClassLabel columns \['fine_label', 'coarse"
    with pytest.raises(SourceError, match=ambiguous + r".*data\.label_column"):
        describe_dataset(cfg)
    fine = cfg.model_copy(update={"label_column": "fine_label"})
    assert describe_dataset(fine).class_names == FRUIT
    out = collect(build_dataset(fine, "train", 16, keep_ids=True))
    order = np.argsort(out["id"])
    assert out["ok"].all() and out["label"][order].tolist() == [0, 1, 2, 0, 1, 2]

    with pytest.raises(SystemExit) as stop:
        main(["prepare", str(tmp_path / "cifar"), str(tmp_path / "out")])
    assert stop.value.code == 2 and "--label-column" in capsys.readouterr().err
    main(
        [
            "prepare",
            str(tmp_path / "cifar"),
            str(tmp_path / "out"),
            "--label-column",
            "coarse_label",
        ]
    )
    manifest = describe_dataset(DataConfig(dataset=str(tmp_path / "out"))).source.manifest
    assert manifest["class_names"] == coarse and manifest["splits"]["train"]["rows"] == 6


def test_columns_without_features_are_named_or_chosen(tmp_path):
    """Without Image/ClassLabel features: columns named image and label, else an exit-2
    error naming the file and its columns; given columns are checked for what they hold."""
    features = {"img": Value("binary"), "lbl": Value("int64"), "name": Value("string")}
    hf_split(tmp_path / "plain", "train", 5, features=features)
    cfg = DataConfig(dataset=str(tmp_path / "plain"), image_size=32)
    columns = r"its columns are \['img', 'lbl', 'name'\]"
    with pytest.raises(SourceError, match=r"00001\.parquet has no image column .*" + columns):
        describe_dataset(cfg)
    chosen = cfg.model_copy(update={"image_column": "img", "label_column": "lbl"})
    assert describe_dataset(chosen).class_names is None  # no ClassLabel: names unknown
    manifest = prepare(
        str(tmp_path / "plain"),
        tmp_path / "out",
        progress=False,
        **dict(image_column="img", label_column="lbl"),
    )
    assert manifest["class_names"] == ["0", "1", "2"]  # prepare: the largest label + 1
    with pytest.raises(SourceError, match=r"has no label column 'nope'; " + columns):
        describe_dataset(chosen.model_copy(update={"label_column": "nope"}))
    with pytest.raises(SourceError, match=r"label column 'name' is string; labels are class"):
        describe_dataset(chosen.model_copy(update={"label_column": "name"}))
    with pytest.raises(SourceError, match=r"image column 'lbl' is int64, not encoded image"):
        describe_dataset(chosen.model_copy(update={"image_column": "lbl"}))
    prepared = DataConfig(dataset=str(tmp_path / "out"), label_column="lbl")
    with pytest.raises(SourceError, match=r"vitray dataset: its columns are image and label"):
        describe_dataset(prepared)
