"""Sources as their own libraries write them: Hugging Face `datasets` Parquet, `webdataset`
tars and plain `tar`, image folders; opened on the driver, streamed on a real local Ray."""

import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from jobs.cli import main
from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, describe_dataset
from pipeline.prepare import prepare
from pipeline.readers import INT_EXTENSIONS, open_source, plan_units, read_unit
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


def test_split_names_follow_hugging_face_datasets(tmp_path):
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
    for cls in ("test", "val"):  # classes to torchvision, splits to `datasets`: refused
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "0.jpg").write_bytes(jpeg(0))
    with pytest.raises(
        SourceError, match=r"split folders \['test', 'val'\], but .* not in a class"
    ):
        open_source(str(tmp_path))


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
    assert manifest["class_names"] == coarse
    # a source without val: prepare carves one from train (--val-fraction 0.1)
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 4, "val": 2}


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
    assert describe_dataset(chosen).class_names == ["0", "1", "2"]  # numbered 0..largest
    manifest = prepare(
        str(tmp_path / "plain"),
        tmp_path / "out",
        progress=False,
        **dict(image_column="img", label_column="lbl"),
    )
    assert manifest["class_names"] == ["0", "1", "2"]  # prepare: the largest label + 1
    with pytest.raises(SourceError, match=r"has no label column 'nope'; " + columns):
        describe_dataset(chosen.model_copy(update={"label_column": "nope"}))
    by_name = describe_dataset(chosen.model_copy(update={"label_column": "name"}))
    assert by_name.class_names == sorted(FRUIT)  # string labels: names, sorted as `datasets`
    with pytest.raises(SourceError, match=r"image column 'lbl' is int64, not encoded image"):
        describe_dataset(chosen.model_copy(update={"image_column": "lbl"}))
    prepared = DataConfig(dataset=str(tmp_path / "out"), label_column="lbl")
    with pytest.raises(SourceError, match=r"vitray dataset: its columns are image and label"):
        describe_dataset(prepared)


def png(i: int) -> bytes:
    return encode(PILImage.fromarray(photo((72, 64), seed=i)), "PNG")


def source_rows(root: Path, **roles: str) -> dict[str, list]:
    """Every row of a source, as prepare, streaming and the benchmark read it."""
    source = open_source(str(root), **roles)
    units = [read_unit(source, unit) for unit in plan_units(source, source.files)]
    return {key: [v for rows in units for v in rows[key]] for key in units[0]}


def webdataset_reads(tars: list[Path]) -> list[dict]:
    """The samples as the webdataset library itself reads them (default decoders)."""
    return list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode())


def test_webdataset_tars_read_as_the_webdataset_library_reads_them(ray_local, tmp_path):
    """Keys are member paths with their directories (dots in them too), images any image
    extension, labels .cls; other members (.meta.json) are not read; .tgz shards too."""
    tars = [tmp_path / "wds" / f"shard-{k:06d}.{ext}" for k, ext in enumerate(["tar", "tgz"])]
    tars[0].parent.mkdir()
    for k, tar in enumerate(tars):
        with wds.TarWriter(str(tar)) as sink:
            for i in range(3):
                image = {"png": png(i)} if i == 2 else {"jpg": jpeg(i)}
                key = f"v1.{k}/{'cat' if i % 2 else 'dog'}/{i:04d}"
                sink.write({"__key__": key, **image, "cls": i % 2, "meta.json": {"i": i}})
    rows = source_rows(tmp_path / "wds")
    theirs = webdataset_reads(tars)
    expected = [(s["__key__"], s.get("jpg", s.get("png")), s["cls"]) for s in theirs]
    assert list(zip(rows["id"], rows["image"], rows["label"], strict=True)) == expected
    assert rows["id"][:2] == ["v1.0/dog/0000", "v1.0/cat/0001"] and not any(rows["error"])

    cfg = DataConfig(dataset=str(tmp_path / "wds"), image_size=32)
    streamed = collect(build_dataset(cfg, "train", 16, keep_ids=True))
    assert sorted(streamed["id"]) == sorted(rows["id"]) and streamed["ok"].all()
    manifest = prepare(str(tmp_path / "wds"), tmp_path / "out", val_fraction=0, progress=False)
    assert manifest["class_names"] == ["0", "1"] and manifest["splits"]["train"]["rows"] == 6


def test_a_plain_tar_of_a_directory(tmp_path):
    """`tar` of a directory: members ./a/0001.jpg, directory entries; a sample is
    consecutive members, so a tar not sorted by name stops naming the cause."""
    src = tmp_path / "src"
    for i in range(4):
        (src / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (src / "ab"[i % 2] / f"{i:04d}.jpg").write_bytes(jpeg(i))
        (src / "ab"[i % 2] / f"{i:04d}.cls").write_text(f"{i % 2}\n")
    (tmp_path / "sorted").mkdir()
    tar = tmp_path / "sorted" / "train.tar"
    subprocess.run(["tar", "--sort=name", "-cf", tar, "-C", src, "."], check=True)
    rows = source_rows(tmp_path / "sorted")
    expected = [(s["__key__"], s["jpg"], s["cls"]) for s in webdataset_reads([tar])]
    assert list(zip(rows["id"], rows["image"], rows["label"], strict=True)) == expected
    assert rows["id"] == ["./a/0000", "./a/0002", "./b/0001", "./b/0003"]

    (tmp_path / "unsorted").mkdir()
    members = ["a/0000.jpg", "a/0002.jpg", "a/0000.cls", "a/0002.cls"]
    subprocess.run(["tar", "-cf", tmp_path / "unsorted" / "x.tar", *members], cwd=src, check=True)
    with pytest.raises(
        SourceError,
        match=r"x\.tar: its first image sample 'a/0000' has members "
        r"\['jpg'\], no label member .* must be consecutive \(tar --sort=name\)",
    ):
        open_source(str(tmp_path / "unsorted"))


def test_webdataset_labels_by_extension_or_json_field(ray_local, tmp_path):
    """Labels: whichever of webdataset's integer extensions the samples have, or a json
    field; a label that is no integer costs only its sample, named in strict mode."""

    def shard(name: str, labels: list) -> Path:
        root = tmp_path / name
        root.mkdir()
        with wds.TarWriter(str(root / "train-0.tar")) as sink:
            for i, label in enumerate(labels):
                sink.write({"__key__": f"s{i}", "jpg": jpeg(i), **label})
        return root

    for ext in INT_EXTENSIONS:
        root = shard(ext, [{ext: i} for i in range(3)])
        theirs = [s[ext] for s in webdataset_reads([root / "train-0.tar"])]
        assert source_rows(root)["label"] == theirs == [0, 1, 2], ext
    both = shard("both", [{"cls": 1, "id": 900 + i} for i in range(2)])
    with pytest.raises(SourceError, match=r"several labels \['cls', 'id'\].*data\.label_column"):
        open_source(str(both))
    assert source_rows(both, label_column="id")["label"] == [900, 901]

    meta = shard("json", [{"json": {"label": 2, "w": 3}}, {"json": {"label": "pear"}}])
    with pytest.raises(SourceError, match=r"has members \['jpg', 'json'\], no label member"):
        open_source(str(meta))
    with pytest.raises(SourceError, match=r"label_field reads json labels, not \.cls"):
        open_source(str(both), label_column="cls", label_field="label")
    rows = source_rows(meta, label_field="label")
    assert rows["label"] == [2, -1] and rows["error"][0] is None
    assert (
        rows["error"][1]
        == "the label ('label' of .json: b'{\"label\": \"pear\"}') is not an integer"
    )
    bad_cls = shard("bad_cls", [{"cls": "1"}, {"cls": "cat"}, {"cls": "2.5"}])
    assert source_rows(bad_cls)["label"] == [1, -1, -1]

    cfg = DataConfig(dataset=str(meta), image_size=32, label_field="label")
    out = collect(build_dataset(cfg, "train", 16))
    assert out["ok"].tolist().count(True) == 1 and len(out["ok"]) == 2
    with pytest.raises(Exception, match=r"train-0\.tar, id 's1': the label .* not an integer"):
        collect(build_dataset(cfg.model_copy(update={"strict": True}), "train", 16))
    manifest = prepare(str(meta), tmp_path / "out", label_field="label", progress=False)
    assert [s["id"] for s in manifest["skipped"]] == ["s1"]


def test_a_source_without_images_stops_naming_what_it_holds(tmp_path, capsys):
    """Exit 2 before any Ray work, never an empty dataset: a tar of captions, of files
    without extensions or without labels, empty Parquet, loose files; a split without rows
    (0 in split_rows); a source none of whose images is usable, in prepare."""
    for name in ("captions", "bare", "unlabelled", "hf", "loose"):
        (tmp_path / name).mkdir()
    with wds.TarWriter(str(tmp_path / "captions" / "a.tar")) as sink:
        sink.write({"__key__": "x", "txt": "a cat"})
    with pytest.raises(SystemExit) as stop:
        main(["prepare", str(tmp_path / "captions"), str(tmp_path / "out")])
    message = r"a\.tar holds no image sample \(a member KEY\.EXT, EXT one of \['jpg'.* \['x\.txt'\]"
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)
    (tmp_path / "bare" / "img0001").write_bytes(jpeg(0))
    subprocess.run(["tar", "-cf", "b.tar", "img0001"], cwd=tmp_path / "bare", check=True)
    with pytest.raises(SourceError, match=r"b\.tar holds no image sample .* \['img0001'\]"):
        open_source(str(tmp_path / "bare"))
    with wds.TarWriter(str(tmp_path / "unlabelled" / "u.tar")) as sink:
        sink.write({"__key__": "x", "jpg": jpeg(0), "txt": "a cat"})
    with pytest.raises(SourceError, match=r"has members \['jpg', 'txt'\], no label member"):
        open_source(str(tmp_path / "unlabelled"))

    hf_split(tmp_path / "hf", "train", 0)
    with pytest.raises(SourceError, match=r"hf holds no rows: .*'image', 'label'"):
        open_source(str(tmp_path / "hf"))
    hf_split(tmp_path / "hf", "test", 2)
    cfg = DataConfig(dataset=str(tmp_path / "hf"), image_size=32)
    assert describe_dataset(cfg).split_rows == {"train": 0, "test": 2}
    with pytest.raises(SourceError, match=r"split 'train' has no rows: \[.*train-00000"):
        build_dataset(cfg, "train", 16)

    for i in range(2):
        (tmp_path / "loose" / f"{i}.txt").write_bytes(b"not an image")
    with pytest.raises(
        SourceError, match=r"holds no layout vitray reads .* its 2 files: \['0\.txt', '1"
    ):
        open_source(str(tmp_path / "loose"))
    for i in range(2):
        (tmp_path / "loose" / f"{i}.jpg").write_bytes(b"not a jpeg")
    assert open_source(str(tmp_path / "loose")).class_names is None  # unlabelled images
    with pytest.raises(SourceError, match=r"images but no class subfolders .*'0\.jpg'"):
        prepare(str(tmp_path / "loose"), tmp_path / "out", progress=False)
    (tmp_path / "loose" / "cat").mkdir()
    (tmp_path / "loose" / "0.jpg").rename(tmp_path / "loose" / "cat" / "0.jpg")
    with pytest.raises(SourceError, match=r"loose has 1 class \['cat'\]: training needs 2"):
        prepare(str(tmp_path / "loose"), tmp_path / "out", progress=False)
    (tmp_path / "loose" / "dog").mkdir()
    (tmp_path / "loose" / "1.jpg").rename(tmp_path / "loose" / "dog" / "1.jpg")
    with pytest.raises(SourceError, match=r"no usable image: 2 bad, \[\('not a readable image"):
        prepare(str(tmp_path / "loose"), tmp_path / "out", progress=False)


def corrupt(path: Path, offset: int, size: int) -> None:
    """Overwrite `size` bytes at `offset` with 0xff: no Parquet page header, no tar header."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


def test_corruption_inside_a_unit_costs_only_its_rows(ray_local, tmp_path):
    """A corrupt Parquet row group, a tar with a damaged header or cut short, a row without
    a label: those rows are bad (counted; named with data.strict), the rest is read."""
    hf_split(tmp_path / "hf", "train", 12)  # row groups of 4 rows
    [parquet] = (tmp_path / "hf" / "data").iterdir()
    corrupt(parquet, pq.read_metadata(parquet).row_group(1).column(0).data_page_offset, 64)
    rows = source_rows(tmp_path / "hf")
    assert [e is None for e in rows["error"]] == [True] * 4 + [False] * 4 + [True] * 4
    assert rows["error"][4].startswith("row group 1 unreadable: Couldn't deserialize thrift")
    cfg = DataConfig(dataset=str(tmp_path / "hf"), image_size=32)
    out = collect(build_dataset(cfg, "train", 16))
    assert len(out["ok"]) == 12 and out["ok"].sum() == 8
    strict = r"train-00000-of-00001\.parquet, row [4-7], id None: row group 1 unreadable"
    with pytest.raises(Exception, match=strict):
        collect(build_dataset(cfg.model_copy(update={"strict": True}), "train", 16))
    manifest = prepare(str(tmp_path / "hf"), tmp_path / "out", val_fraction=0, progress=False)
    assert [s["id"] for s in manifest["skipped"]] == [f"{parquet.name}:{i}" for i in range(4, 8)]

    (tmp_path / "wds").mkdir()
    for name in ("cut", "damaged"):
        with wds.TarWriter(str(tmp_path / "wds" / f"{name}.tar")) as sink:
            for i in range(4):
                sink.write({"__key__": f"{name}{i}", "jpg": jpeg(i), "cls": i % 2})
    cut, damaged = tmp_path / "wds" / "cut.tar", tmp_path / "wds" / "damaged.tar"
    cut.write_bytes(cut.read_bytes()[: tarfile.open(cut).getmember("cut1.jpg").offset_data + 99])
    header = tarfile.open(damaged).getmember("damaged2.cls").offset  # tarfile stops there
    corrupt(damaged, header, 512)
    rows = source_rows(tmp_path / "wds")
    assert rows["id"] == ["cut0", "cut1", "damaged0", "damaged1"]
    assert rows["error"][::2] == [None, None] and rows["label"] == [0, -1, 0, -1]
    assert rows["error"][1:] == [
        "tar unreadable after member 'cut1.cls': unexpected end of data; the rest of it is lost",
        None,
        f"tar unreadable after member 'damaged1.jpg': damaged member header at byte {header}; "
        "the rest of it is lost",
    ]
    cfg = DataConfig(dataset=str(tmp_path / "wds"), image_size=32)
    assert collect(build_dataset(cfg, "train", 16))["ok"].tolist().count(True) == 2
    with pytest.raises(Exception, match=r"(cut|damaged)\.tar, id '\w+1': tar unreadable after"):
        collect(build_dataset(cfg.model_copy(update={"strict": True}), "train", 16))

    labels = Dataset.from_dict(
        {"image": [{"bytes": jpeg(i), "path": None} for i in range(3)], "label": [0, None, 2]},
        features=Features({"image": Image(), "label": ClassLabel(names=FRUIT)}),
    )
    labels.to_parquet(str(tmp_path / "labels" / "train.parquet"))
    rows = source_rows(tmp_path / "labels")
    assert rows["label"] == [0, -1, 2] and rows["error"] == [None, "no label", None]
