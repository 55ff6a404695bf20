"""Every layout a peer documents, read differentially: the peer's own writer makes the data
(`datasets`, plain files in torchvision's layout, IDX bytes as published), the peer's own
reader is the reference (torchvision's ImageFolder and FashionMNIST, `datasets`'
load_dataset and load_from_disk), and vitray's direct reading (the code each Ray decode task
runs) and its prepared manifest must give every file or row the same split and class name.
Mismatches are counted; the expected count is zero. Cases outside what vitray reads are
refusals with exit 2 that name the layout."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torchvision
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    Value,
    load_dataset,
    load_from_disk,
)
from PIL import Image as PILImage

from jobs.cli import main
from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, describe_dataset
from pipeline.prepare import prepare
from pipeline.readers import open_source, plan_units, read_unit
from pipeline.sources import SourceError

from layouts import (
    class_tree,
    hub_train_and_test,
    idx_folder,
    png,
    split_tree,
    write,
    write_metadata,
)

HF_SPLIT = {"train": "train", "validation": "val", "test": "test"}  # `datasets` -> vitray


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def streamed(root: Path, **columns: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """id -> (split, class name) of every row as vitray's readers give it, and the classes."""
    source = open_source(str(root), **columns)
    names, out = source.class_names, {}
    for split in source.split_names():
        for unit in plan_units(source, source.split_files(split)):
            rows = read_unit(source, unit)
            for row_id, label, error in zip(rows["id"], rows["label"], rows["error"], strict=True):
                out[row_id] = (split, names[label] if error is None and label >= 0 else None)
    return out, names


def prepared(root: Path, out: Path, **columns: str) -> tuple[dict[str, tuple[str, str]], list]:
    """id -> (split, class name) of every row `vitray prepare` wrote (no val carved)."""
    manifest = prepare(str(root), out, val_fraction=0, progress=False, **columns)
    names, rows = manifest["class_names"], {}
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            table = pq.read_table(out / shard["file"], columns=["id", "label"])
            for row_id, label in zip(*table.to_pydict().values(), strict=True):
                rows[row_id] = (split, names[label])
    return rows, names


def mismatches(reference: dict, got: dict) -> list:
    """The keys where `got` differs from `reference`, missing and extra ones included."""
    return [k for k in reference.keys() | got.keys() if reference.get(k) != got.get(k)]


def check_both(root: Path, tmp: Path, reference: dict, classes: list[str], **columns) -> None:
    """vitray's stream and its prepared manifest agree with the reference, row for row."""
    got, names = streamed(root, **columns)
    assert names == classes and mismatches(reference, got) == []
    got, names = prepared(root, tmp / f"prepared-{root.name}", **columns)
    assert names == classes and mismatches(reference, got) == []


# torchvision ImageFolder ---------------------------------------------------------------------


def test_one_root_of_class_folders_reads_as_torchvision_imagefolder(tmp_path):
    root = tmp_path / "pets"
    class_tree(root, ["tabby", "beagle", "Zebra", "ant"], per_class=7)
    (root / ".thumbnails").rename(tmp_path / "thumbs")  # torchvision would take it as a class
    ds = torchvision.datasets.ImageFolder(str(root))
    reference = {
        Path(path).relative_to(root).as_posix(): ("train", ds.classes[target])
        for path, target in ds.samples
    }
    assert len(reference) == 28  # nested and upper-case images counted, .txt/.csv ignored
    check_both(root, tmp_path, reference, ds.classes)


def test_hidden_files_are_skipped_as_datasets_skips_them(tmp_path):
    root = tmp_path / "pets"
    class_tree(root, ["cat", "dog"], per_class=3)
    write(root / "cat" / ".hidden.png", png(5))
    write(root / "dog" / ".ipynb_checkpoints" / "0-checkpoint.png", png(6))
    ds = load_dataset("imagefolder", data_dir=str(root), split="train")
    ds = ds.cast_column("image", Image(decode=False))
    names = ds.features["label"].names
    reference = {
        Path(row["image"]["path"]).relative_to(root).as_posix(): ("train", names[row["label"]])
        for row in ds
    }
    with pytest.warns(UserWarning, match=r"2 hidden images are skipped, as `datasets` skips"):
        got, classes = streamed(root)
    assert classes == names and mismatches(reference, got) == []


@pytest.mark.parametrize("val_name", ["val", "validation", "valid"])
def test_one_root_per_split_reads_as_torchvision_per_split_and_datasets(tmp_path, val_name):
    root = tmp_path / "imagenet"
    split_tree(root, val_name)
    reference, train_classes = {}, None
    for split in ("train", val_name, "test"):
        ds = torchvision.datasets.ImageFolder(str(root / split))
        train_classes = train_classes or ds.classes
        for path, target in ds.samples:
            ours = "val" if split == val_name else split
            reference[Path(path).relative_to(root).as_posix()] = (ours, ds.classes[target])
    check_both(root, tmp_path, reference, train_classes)
    # `datasets` reads the same tree as the same splits and labels
    hf = load_dataset("imagefolder", data_dir=str(root)).cast_column("image", Image(decode=False))
    from_hf = {
        Path(row["image"]["path"]).relative_to(root).as_posix(): (
            HF_SPLIT[split],
            hf[split].features["label"].names[row["label"]],
        )
        for split in hf
        for row in hf[split]
    }
    assert mismatches(from_hf, reference) == []


# Hugging Face imagefolder with metadata ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("labels", ["strings", "integers"])
def test_imagefolder_metadata_labels_win_as_in_datasets(tmp_path, fmt, labels):
    """Split folders of images in misleading class folders; the metadata's labels count."""
    root = tmp_path / "hf"
    kinds = ["shirt", "boot", "bag"] if labels == "strings" else [0, 1, 2]
    for s, split in enumerate(("train", "test")):
        rows = []
        for i in range(9 if split == "train" else 4):
            name = f"{'misc' if i % 2 else 'other'}/{i}.png"
            write(root / split / name, png(100 * s + i))
            rows.append({"file_name": name, "label": kinds[(i * 2 + s) % 3]})
        write_metadata(root / split, rows, fmt)
    hf = load_dataset("imagefolder", data_dir=str(root)).cast_column("image", Image(decode=False))
    values = {
        (split, Path(row["image"]["path"]).relative_to(root).as_posix()): row["label"]
        for split in hf
        for row in hf[split]
    }
    classes = sorted({str(v) for v in values.values()})
    if labels == "integers":
        classes = [str(i) for i in range(max(values.values()) + 1)]
    reference = {path: (HF_SPLIT[split], str(v)) for (split, path), v in values.items()}
    check_both(root, tmp_path, reference, classes)


# datasets save_to_disk -------------------------------------------------------------------------


def hf_rows(n: int, seed: int, names: list[str] | None) -> dict:
    return {
        "image": [{"bytes": png(seed + i), "path": None} for i in range(n)],
        "label": [(i * 7) % 3 if names else ["plum", "fig", "apple"][i % 3] for i in range(n)],
    }


def row_reference(ds) -> list[tuple[str, str]]:
    """(image digest, class name) of each row as `datasets` gives it."""
    ds = ds.cast_column("image", Image(decode=False))
    feature = ds.features["label"]
    return [
        (
            digest(row["image"]["bytes"]),
            feature.names[row["label"]] if isinstance(feature, ClassLabel) else row["label"],
        )
        for row in ds
    ]


def vitray_rows(root: Path, split: str) -> tuple[list[tuple[str, str]], list[str]]:
    source = open_source(str(root))
    rows = [read_unit(source, u) for u in plan_units(source, source.split_files(split))]
    return [
        (digest(image), source.class_names[label])
        for r in rows
        for image, label in zip(r["image"], r["label"], strict=True)
    ], source.class_names


@pytest.mark.parametrize("labels", ["classlabel", "strings"])
def test_save_to_disk_reads_as_load_from_disk(tmp_path, labels):
    names = ["cat", "dog", "eel"] if labels == "classlabel" else None
    label = ClassLabel(names=names) if names else Value("string")
    features = Features({"image": Image(), "label": label})
    dd = DatasetDict(
        {
            split: Dataset.from_dict(hf_rows(n, 100 * s, names), features=features)
            for s, (split, n) in enumerate({"train": 23, "validation": 7, "test": 5}.items())
        }
    )
    dd.save_to_disk(str(tmp_path / "dict"), max_shard_size="2KB")  # several Arrow files
    dd["train"].save_to_disk(str(tmp_path / "one"))
    loaded = load_from_disk(str(tmp_path / "dict"))
    classes = names or sorted({"plum", "fig", "apple"})
    for split in loaded:
        got, got_classes = vitray_rows(tmp_path / "dict", HF_SPLIT[split])
        assert got_classes == classes and got == row_reference(loaded[split])
    got, _ = vitray_rows(tmp_path / "one", "train")
    assert got == row_reference(load_from_disk(str(tmp_path / "one")))
    manifest = prepare(str(tmp_path / "dict"), tmp_path / "out", val_fraction=0, progress=False)
    assert manifest["class_names"] == classes
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {
        "train": 23,
        "val": 7,
        "test": 5,
    }
    prepared_rows = []
    for shard in manifest["splits"]["test"]["shards"]:
        table = pq.read_table(tmp_path / "out" / shard["file"]).to_pydict()
        prepared_rows += [
            (digest(b), classes[x]) for b, x in zip(table["image"], table["label"], strict=True)
        ]
    assert sorted(prepared_rows) == sorted(row_reference(loaded["test"]))


def test_save_to_disk_of_an_imagefolder_reads_the_images_it_points_at(tmp_path):
    """`datasets` keeps a local image file as its path alone, and so does save_to_disk."""
    root = tmp_path / "pets"
    class_tree(root, ["cat", "dog"], per_class=3)  # no nested image: `datasets` labels them
    ds = load_dataset("imagefolder", data_dir=str(root), split="train")
    ds.save_to_disk(str(tmp_path / "saved"))
    got, classes = vitray_rows(tmp_path / "saved", "train")
    assert classes == ["cat", "dog"] and got == row_reference(
        load_from_disk(str(tmp_path / "saved"))
    )


# Parquet label columns -------------------------------------------------------------------------

INTEGER_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("dtype", [*INTEGER_TYPES, "string"])
def test_parquet_labels_of_every_integer_width_and_strings(tmp_path, dtype):
    """Written by `datasets` (to_parquet), read back by `datasets`: a null label is a bad
    row, counted; strings become class names sorted as `class_encode_column` sorts them."""
    words = ["trouser", "bag", "coat", "Sandal"]
    values = [
        None if i % 5 == 4 else (words[i % 4] if dtype == "string" else i % 4) for i in range(20)
    ]
    features = Features({"image": Image(), "label": Value(dtype)})
    ds = Dataset.from_dict(
        {"image": [{"bytes": png(i), "path": f"{i}.png"} for i in range(20)], "label": values},
        features=features,
    )
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"), batch_size=6)
    reference = load_dataset("parquet", data_dir=str(tmp_path / "hub"), split="train")
    if dtype == "string":
        reference = reference.filter(lambda r: r["label"] is not None).class_encode_column("label")
        classes = reference.features["label"].names
        expected = {
            r["image"]["path"]: ("train", classes[r["label"]])
            for r in reference.cast_column("image", Image(decode=False))
        }
    else:
        classes = [str(i) for i in range(4)]
        expected = {
            r["image"]["path"]: ("train", str(r["label"]))
            for r in reference.cast_column("image", Image(decode=False))
            if r["label"] is not None
        }
    got, names = streamed(tmp_path / "hub")
    assert sum(label is None for _, label in got.values()) == 4  # the null labels
    got = {k: v for k, v in got.items() if v[1] is not None}
    if dtype == "string":
        assert names == classes
    assert mismatches(expected, got) == []
    manifest = prepare(str(tmp_path / "hub"), tmp_path / "out", val_fraction=0, progress=False)
    assert manifest["class_names"] == classes and len(manifest["skipped"]) == 4
    assert all(s["reason"] == "no label" for s in manifest["skipped"])


SHARD = "-00000-of-00001.parquet"
HUB_LAYOUTS = {  # the files of each layout, two splits or one
    "push_to_hub": [f"data/train{SHARD}", f"data/validation{SHARD}"],
    "split folders of shards": [f"train/data{SHARD}", f"test/data{SHARD}"],
    "folder over file name": [f"data/test/train{SHARD}", f"data/train/train{SHARD}"],
    "shards of no split": ["shard-00000-of-00002.parquet", "shard-00001-of-00002.parquet"],
}


@pytest.mark.parametrize("layout", sorted(HUB_LAYOUTS))
def test_hub_parquet_splits_are_the_ones_datasets_reads(tmp_path, layout):
    """`datasets` takes data/<split>-00000-of-00001 shards' split from their names, and
    otherwise a split keyword in a folder name before one in a file name."""
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])})
    root = tmp_path / "hub"
    for i, name in enumerate(HUB_LAYOUTS[layout]):
        rows = {"image": [{"bytes": png(i), "path": f"{i}-{k}.png"} for k in range(3 + i)]}
        part = Dataset.from_dict(
            {**rows, "label": [k % 3 for k in range(3 + i)]}, features=features
        )
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        part.to_parquet(str(root / name))
    reference = {
        row["image"]["path"]: (HF_SPLIT[split], "abc"[row["label"]])
        for split, ds in load_dataset(str(root)).items()
        for row in ds.cast_column("image", Image(decode=False))
    }
    assert len(reference) == 7  # every row in a split
    check_both(root, tmp_path, reference, ["a", "b", "c"])


def test_a_readme_that_maps_files_to_splits_is_refused(tmp_path, capsys):
    """`datasets` reads the splits a Hub README.md's `configs` give, over the files' names."""
    root = tmp_path / "hub"
    hub_train_and_test(root)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/test-*\n  - split: test\n    path: data/train-*\n---\n# a card\n"
    )
    assert len(load_dataset(str(root))["train"]) != len(
        load_dataset("parquet", data_dir=str(root / "data"))["train"]
    )
    err = refused(capsys, "prepare", str(root), str(tmp_path / "out"))
    assert "README.md maps files to splits (configs ['default'])" in err and "save_to_disk" in err
    (root / "README.md").write_text("---\nlicense: mit\n---\n# no configs: read by names\n")
    assert streamed(root)[1] == ["a", "b", "c"]


# MNIST-format IDX --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset",
    [torchvision.datasets.FashionMNIST, torchvision.datasets.MNIST, torchvision.datasets.KMNIST],
)
def test_idx_files_read_as_torchvision_reads_them(tmp_path, dataset):
    raw = tmp_path / dataset.__name__ / "raw"
    idx_folder(raw, gz=False, n={"train": 120, "t10k": 30})
    idx_folder(tmp_path / "gz" / dataset.__name__, gz=True, n={"train": 120, "t10k": 30})
    source = open_source(str(raw))
    assert source.class_names == dataset.classes
    for train, split in ((True, "train"), (False, "test")):
        ref = dataset(str(tmp_path), train=train, download=False)
        for folder in (raw, tmp_path / "gz" / dataset.__name__):
            source = open_source(str(folder))
            rows = [read_unit(source, u) for u in plan_units(source, source.split_files(split))]
            pixels = [np.asarray(PILImage.open(io.BytesIO(b))) for r in rows for b in r["image"]]
            labels = [source.class_names[x] for r in rows for x in r["label"]]
            assert np.array_equal(np.stack(pixels), ref.data.numpy())
            assert labels == [ref.classes[t] for t in ref.targets.tolist()]
    manifest = prepare(str(raw), tmp_path / "out", val_fraction=0.1, progress=False)
    rows = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert rows["test"] == 30 and rows["train"] + rows["val"] == 120 and rows["val"] > 0


def test_an_unknown_idx_dataset_is_numbered(tmp_path):
    idx_folder(tmp_path / "digits-idx", gz=True, n={"train": 20, "t10k": 5})
    assert open_source(str(tmp_path / "digits-idx")).class_names == [str(i) for i in range(10)]


# No validation split ---------------------------------------------------------------------------


def ids_of(cfg: DataConfig, split: str) -> list[str]:
    from pipeline.dataset import split_units

    info = describe_dataset(cfg)
    return [
        i for u in split_units(cfg, info.source, split) for i in read_unit(info.source, u)["id"]
    ]


def test_a_source_without_val_carves_it_from_train_or_names_a_split(tmp_path, recwarn):
    hub_train_and_test(tmp_path / "hub")
    plain = DataConfig(dataset=str(tmp_path / "hub"), image_size=16)
    with pytest.raises(SourceError, match=r"no split 'val'.*data\.val_fraction"):
        ids_of(plain, "val")
    carved = plain.model_copy(update={"val_fraction": 0.2})
    info = describe_dataset(carved)
    assert info.split_rows == {"train": 50, "val": 10, "test": 12}  # whole 5-row units
    assert "carved" in info.val_from
    train, val = ids_of(carved, "train"), ids_of(carved, "val")
    assert not set(train) & set(val) and len(set(train) | set(val)) == 60
    assert val == ids_of(carved, "val")  # the same rows every time
    other_seed = carved.model_copy(update={"val_seed": 1})
    assert ids_of(other_seed, "val") != val
    on_test = plain.model_copy(update={"val_split": "test"})
    assert ids_of(on_test, "val") == ids_of(plain, "test")
    assert any("validating on the test split" in str(w.message) for w in recwarn)
    manifest = prepare(str(tmp_path / "hub"), tmp_path / "out", val_fraction=0.1, progress=False)
    rows = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert rows["test"] == 12 and rows["train"] + rows["val"] == 60 and rows["val"] > 0
    assert manifest["val_from"].startswith("train")


@pytest.mark.usefixtures("ray_local")
def test_an_imagenet_tree_streams_on_ray_with_the_labels_torchvision_gives(tmp_path):
    root = tmp_path / "imagenet"
    split_tree(root, "val")
    cfg = DataConfig(dataset=str(root), image_size=16)
    rows = build_dataset(cfg, "val", 8, keep_ids=True).take_all()
    ref = torchvision.datasets.ImageFolder(str(root / "val"))
    expected = {Path(p).relative_to(root).as_posix(): ref.classes[t] for p, t in ref.samples}
    classes = describe_dataset(cfg).class_names
    assert {r["id"]: classes[r["label"]] for r in rows} == expected


# Refusals --------------------------------------------------------------------------------------


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_refusals_exit_2_naming_what_was_found(tmp_path, capsys):
    out = str(tmp_path / "out")
    one = tmp_path / "one"
    write(one / "cat" / "0.png", png(0))
    assert "1 class ['cat']: training needs 2" in refused(capsys, "prepare", str(one), out)

    mixed = tmp_path / "mixed"  # split folders beside class folders
    for name in ("train/cat", "train/dog", "cat", "dog"):
        write(mixed / name / "0.png", png(1))
    err = refused(capsys, "prepare", str(mixed), out)
    assert "could be read two ways: ['train'] are split names and ['cat', 'dog']" in err

    unseen = tmp_path / "unseen"  # val has a class train lacks
    for name in ("train/cat", "train/dog", "val/cat", "val/emu"):
        write(unseen / name / "0.png", png(2))
    err = refused(capsys, "prepare", str(unseen), out)
    assert "split 'val' has classes that train does not have: ['emu']" in err

    both = tmp_path / "both"  # Parquet and image folders at once
    hub_train_and_test(both)
    for name in ("cat", "dog"):
        write(both / "images" / name / "0.png", png(3))
    err = refused(capsys, "prepare", str(both), out)
    assert "holds two layouts at once: Hugging Face image Parquet" in err
    assert "an image folder (torchvision ImageFolder)" in err

    missing = tmp_path / "meta"  # a metadata row names a file that is not there
    write(missing / "a.png", png(4))
    (missing / "metadata.csv").write_text("file_name,label\na.png,cat\ngone.png,dog\n")
    assert "names gone.png, which is not an image" in refused(capsys, "prepare", str(missing), out)

    tga = tmp_path / "tga"  # a format `datasets` reads and vitray does not
    write(tga / "a.png", png(4))
    write(tga / "b.tga", b"TGA")
    (tga / "metadata.csv").write_text("file_name,label\na.png,cat\nb.tga,dog\n")
    assert "names b.tga, whose format vitray does not read" in refused(
        capsys, "prepare", str(tga), out
    )

    bare = tmp_path / "bare"  # metadata in train/ only: `datasets` finds no test data
    write(bare / "train" / "a.png", png(4))
    (bare / "train" / "metadata.csv").write_text("file_name,label\na.png,cat\n")
    write(bare / "test" / "cat" / "b.png", png(4))
    with pytest.raises(ValueError, match='"test" corresponds to no data'):
        load_dataset("imagefolder", data_dir=str(bare))
    err = refused(capsys, "prepare", str(bare), out)
    assert "split folders ['test'] hold images but no metadata file, as ['train'] do" in err

    twice = tmp_path / "twice"  # `datasets` would read one image as two rows
    write(twice / "a.png", png(4))
    (twice / "metadata.csv").write_text("file_name,label\na.png,cat\na.png,dog\n")
    assert "a.png has two metadata rows" in refused(capsys, "prepare", str(twice), out)

    above = tmp_path / "above"  # metadata above the split folders: `datasets` drops it
    for name in ("train/a.png", "test/b.png"):
        write(above / name, png(4))
    (above / "metadata.csv").write_text("file_name,label\ntrain/a.png,cat\ntest/b.png,dog\n")
    assert "['metadata.csv'] is in none" in refused(capsys, "prepare", str(above), out)

    cased = tmp_path / "cased"  # classes to torchvision, no split to `datasets`
    for name in ("Train/cat", "Train/dog", "Val/cat"):
        write(cased / name / "0.png", png(5))
    assert "['Train', 'Val'] name splits in another case" in refused(
        capsys, "prepare", str(cased), out
    )

    for tops in (["train_set", "test_set"], ["train2017", "val2017"]):  # splits to `datasets`
        named = tmp_path / tops[0]
        for top in tops:
            for name in ("cat", "dog"):
                write(named / top / name / "0.png", png(5))
        err = refused(capsys, "prepare", str(named), out)
        assert "could be read two ways: its folders name splits to `datasets`" in err
        assert f"'{tops[0]}': 'train'" in err

    versions = tmp_path / "versions"  # two copies of a dataset, each with its splits
    for name in ("v160/train/cat", "v160/val/cat", "v320/train/cat", "v320/val/cat"):
        write(versions / name / "0.png", png(5))
    err = refused(capsys, "prepare", str(versions), out)
    assert "its folders ['v160', 'v320'] each hold split folders (v160/train/...)" in err

    empty = tmp_path / "empty"  # a class folder without images inside a split folder
    for name in ("train/cat", "train/dog", "val/cat"):
        write(empty / name / "0.png", png(5))
    (empty / "train" / "emu").mkdir()
    assert "folders ['train/emu'] hold no image" in refused(capsys, "prepare", str(empty), out)

    macos = tmp_path / "macos"  # a zip from macOS: torchvision takes __MACOSX for a class
    for name in ("cat", "dog"):
        write(macos / name / "0.png", png(6))
    write(macos / "__MACOSX" / "cat" / "._0.png", b"resource fork")
    assert "folders ['__MACOSX'] hold no image" in refused(capsys, "prepare", str(macos), out)

    features = Features({"image": Image(), "label": Value("string")})
    parts = {
        split: Dataset.from_dict(
            {"image": [{"bytes": png(i), "path": None} for i in range(4)], "label": words},
            features=features,
        ).class_encode_column("label")  # each split encoded on its own: different lists
        for split, words in (("train", ["fig", "plum", "kiwi", "fig"]), ("test", ["fig"] * 4))
    }
    DatasetDict(parts).save_to_disk(str(tmp_path / "encoded"))
    err = refused(capsys, "prepare", str(tmp_path / "encoded"), out)
    assert "class names of 'label' differ between files" in err


def test_imagefolder_metadata_rows_are_the_rows_as_in_datasets(tmp_path):
    """Images without a row are left out and empty or NA labels are no labels, as
    `datasets` reads metadata.csv (with pandas)."""
    root = tmp_path / "hf"
    for i in range(6):
        write(root / f"{i}.png", png(i))
    (root / "metadata.csv").write_text(
        "file_name,label\n0.png,cat\n1.png,\n2.png,NA\n3.png,dog\n4.png,cat\n"
    )
    ds = load_dataset("imagefolder", data_dir=str(root), split="train")
    ds = ds.cast_column("image", Image(decode=False))
    reference = {
        Path(r["image"]["path"]).relative_to(root).as_posix(): ("train", r["label"]) for r in ds
    }
    with pytest.warns(UserWarning, match="1 images have no metadata row"):
        got, classes = streamed(root)
    assert classes == ["cat", "dog"] and mismatches(reference, got) == []


def test_a_foreign_manifest_json_is_no_vitray_dataset(tmp_path):
    for name in ("cat", "dog"):
        write(tmp_path / "pets" / name / "0.png", png(7))
    (tmp_path / "pets" / "manifest.json").write_text('{"images": 2}')
    assert open_source(str(tmp_path / "pets")).class_names == ["cat", "dog"]


def test_validating_on_train_is_refused(tmp_path):
    hub_train_and_test(tmp_path / "hub")
    with pytest.raises(SourceError, match="val_split: train would validate on the training"):
        describe_dataset(DataConfig(dataset=str(tmp_path / "hub"), val_split="train"))


def test_builtin_fashion_mnist_reads_debians_files_or_says_how_to_get_them(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("VITRAY_FASHION_MNIST", str(tmp_path / "absent"))
    err = refused(capsys, "prepare", "builtin:fashion-mnist", str(tmp_path / "out"))
    assert "apt-get install dataset-fashion-mnist" in err
    idx_folder(tmp_path / "fashion-mnist", gz=True, n={"train": 40, "t10k": 10})
    monkeypatch.setenv("VITRAY_FASHION_MNIST", str(tmp_path / "fashion-mnist"))
    manifest = prepare("builtin:fashion-mnist", tmp_path / "out", progress=False)
    assert manifest["class_names"] == torchvision.datasets.FashionMNIST.classes
    rows = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert rows["test"] == 10 and rows["train"] + rows["val"] == 40
