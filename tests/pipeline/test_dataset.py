"""build_dataset on a real local Ray, over real shards of real image bytes."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, describe_dataset, first_rows
from pipeline.prepare import prepare
from pipeline.readers import open_source, plan_units, read_unit, resolve_source
from pipeline.sources import SourceError

from helpers import encode, photo
from layouts import hub_train_and_test, split_tree


def collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def jpeg(i: int, size=(96, 80)) -> bytes:
    return encode(Image.fromarray(photo(size, seed=i)), "JPEG")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    prepare("builtin:digits", out, progress=False)
    return out


def test_digits_train_and_eval_stream_patches(ray_local, digits):
    cfg = DataConfig(dataset=str(digits), image_size=16, hflip=False, crop_scale=(0.6, 1.0))
    out = collect(build_dataset(cfg, "train", patch_size=4))
    assert out["patches"].shape == (1257, 16, 48) and out["patches"].dtype == np.uint8
    assert out["ok"].all() and sorted(set(out["label"].tolist())) == list(range(10))
    test = DataConfig(dataset=str(digits), image_size=16, eval_crop_fraction=1.0)
    a = collect(build_dataset(test, "test", 4, keep_ids=True))
    b = collect(build_dataset(test, "test", 4, keep_ids=True))
    order_a, order_b = np.argsort(a["id"]), np.argsort(b["id"])
    np.testing.assert_array_equal(a["patches"][order_a], b["patches"][order_b])  # deterministic
    assert describe_dataset(test).split_rows == {"train": 1257, "val": 180, "test": 360}


def test_each_training_epoch_reads_a_unit_in_a_new_row_order(ray_local, digits):
    # digits' train split is one row group: a new unit order alone would not reshuffle it
    cfg = DataConfig(dataset=str(digits), image_size=16, hflip=False)
    epochs = build_dataset(cfg, "train", 4, keep_ids=True)
    first, second = collect(epochs)["id"], collect(epochs)["id"]
    assert sorted(first) == sorted(second) and list(first) != list(second)


def test_decode_tasks_stream_blocks_of_decode_batch_size_rows(ray_local, digits):
    # val is one Parquet row group, i.e. one task: it still yields 64-row blocks as it goes
    cfg = DataConfig(dataset=str(digits), image_size=16, decode_batch_size=64)
    blocks = build_dataset(cfg, "val", 4).iter_batches(batch_size=None, batch_format="numpy")
    assert [len(b["label"]) for b in blocks] == [64, 64, 52]


def digits_shards(root):  # 4 KB shards: val is many small row groups, 100 rows span them
    prepare("builtin:digits", root, shard_size="4kb", progress=False)
    return {}, 100


def imagenet_folders(root):  # one folder unit of 24 files, cut to the 10 asked
    split_tree(root, "val", per_class=12)
    return {}, 10


def hub_parquet(root):  # val from the test split, row groups of 5 rows
    hub_train_and_test(root, rows=80)
    return {"val_split": "test"}, 12


@pytest.mark.parametrize("layout", [digits_shards, imagenet_folders, hub_parquet])
def test_first_rows_read_here_are_the_eval_pipelines_first_rows(ray_local, tmp_path, layout):
    # what a run's figures are drawn from, read without Ray Data: the same rows, the same
    # bytes, in plan order
    sets, n = layout(tmp_path / "d")
    cfg = DataConfig(dataset=str(tmp_path / "d"), image_size=16, **sets)
    ds = build_dataset(cfg, "val", 4)
    ds.context.execution_options.preserve_order = True
    streamed = collect(ds)
    here = first_rows(cfg, "val", 4, n)
    assert here["patches"].shape == (n, 16, 48) and len(streamed["label"]) > n
    for key in ("patches", "label", "ok"):
        np.testing.assert_array_equal(here[key], streamed[key][:n])


def test_evaluation_batches_of_a_cached_split_come_from_one_pass(ray_local, digits):
    from jobs.training.loop import CachedBatches

    cfg = DataConfig(dataset=str(digits), image_size=16, eval_crop_fraction=1.0)
    val = build_dataset(cfg, "val", 4).materialize()
    passes = []

    class CountingShard:
        def iter_torch_batches(self, **kwargs):
            passes.append(kwargs)
            return val.iter_torch_batches(**kwargs)

    cached = CachedBatches(CountingShard())
    first = list(cached.iter_torch_batches(batch_size=64))
    second = list(cached.iter_torch_batches(batch_size=64))
    assert len(passes) == 1 and sum(len(b["label"]) for b in second) == 180
    for a, b in zip(first, second, strict=True):
        assert (a["patches"] == b["patches"]).all() and (a["label"] == b["label"]).all()


def test_bad_rows_in_a_shard_are_counted_not_fatal(ray_local, tmp_path, awkward_images):
    table = pa.table(
        {
            "id": [f"img{i}" for i in range(len(awkward_images))],
            "image": [data for data, _ in awkward_images.values()],
            "label": [i % 3 for i in range(len(awkward_images))],
        }
    )
    root = tmp_path / "mixed"
    root.mkdir()
    pq.write_table(table, root / "train-00000.parquet")
    pq.write_table(table.slice(0, 0), root / "train-00001.parquet")  # an empty shard
    out = collect(build_dataset(DataConfig(dataset=str(root), image_size=32), "train", 16))
    usable = sum(ok for _, ok in awkward_images.values())
    assert len(out["ok"]) == len(awkward_images) and out["ok"].sum() == usable
    strict = DataConfig(dataset=str(root), image_size=32, strict=True)
    with pytest.raises(Exception, match=r"train-00000\.parquet, row \d+"):
        collect(build_dataset(strict, "train", 16))


def write_hf_parquet(path, images: list[dict], names: list[str], **kwargs) -> None:
    """A Parquet file as Hugging Face `datasets` writes one: {bytes, path} image structs,
    a ClassLabel label and the features in the schema metadata."""
    meta = {
        "info": {
            "features": {
                "image": {"_type": "Image"},
                "label": {"_type": "ClassLabel", "names": names},
            }
        }
    }
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.int64()),
        ],
        metadata={"huggingface": json.dumps(meta)},
    )
    labels = [i % len(names) for i in range(len(images))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "label": labels}, schema=schema), path, **kwargs)


def by_id(out: dict[str, np.ndarray]) -> dict[str, tuple]:
    """id -> (label, ok, patches as bytes)."""
    rows = zip(out["id"], out["label"], out["ok"], out["patches"], strict=True)
    return {i: (label, ok, patches.tobytes()) for i, label, ok, patches in rows}


def test_hugging_face_rows_are_the_same_for_prepare_and_streaming(ray_local, tmp_path):
    """One reader unpacks the {bytes, path} struct for both: ids are the paths, else
    FILE:ROW with rows counted from the start of the file across row groups; a row without
    bytes is a bad image, named by that row in strict mode."""
    rows = [{"bytes": jpeg(i, (64 + 8 * i, 80)), "path": None} for i in range(6)]
    rows.append({"bytes": None, "path": "gone.jpg"})
    write_hf_parquet(tmp_path / "hf" / "val.parquet", rows, ["a", "b"], row_group_size=3)
    source = open_source(str(tmp_path / "hf"))
    units = plan_units(source, source.files)
    read = [read_unit(source, unit) for unit in units]
    assert [unit["row_group"] for unit in units] == [0, 1, 2]
    assert [r["row"].tolist() for r in read] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [image for r in read for image in r["image"]] == [r["bytes"] for r in rows]
    assert [i for r in read for i in r["id"]] == [None] * 6 + ["gone.jpg"]

    manifest = prepare(str(tmp_path / "hf"), tmp_path / "out", progress=False)
    assert manifest["skipped"] == [{"id": "gone.jpg", "reason": "no image bytes"}]
    cfg = DataConfig(dataset=str(tmp_path / "hf"), image_size=32)
    streamed = collect(build_dataset(cfg, "val", 16))
    assert len(streamed["ok"]) == 7 and streamed["ok"].sum() == 6
    prepared = cfg.model_copy(update={"dataset": str(tmp_path / "out")})
    good = {f"val.parquet:{i}" for i in range(6)}
    assert set(by_id(collect(build_dataset(prepared, "val", 16, keep_ids=True)))) == good
    with pytest.raises(Exception, match=r"val\.parquet, row 6, id 'gone\.jpg'"):
        collect(build_dataset(cfg.model_copy(update={"strict": True}), "val", 16))


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_webdataset_keys_follow_webdataset_and_prepare_reads_as_streaming(ray_local, tmp_path):
    """Key: the member path up to the first dot of its base name, directories included; a
    sample: consecutive members with that key. Prepare and streaming read the same rows."""
    images = [jpeg(i, (64 + 8 * i, 80)) for i in range(5)]
    (tmp_path / "wds").mkdir()
    write_tar(
        tmp_path / "wds" / "val-000000.tar",
        [
            ("./cat/0.jpg", images[0]),
            ("./cat/0.cls", b"0"),
            ("./dog/0.jpg", images[1]),  # the same base name in another directory
            ("./dog/0.meta.json", b"{}"),  # extension meta.json: not read
            ("./dog/0.cls", b"1"),
            ("./v1.0/cat/1.JPG", images[2]),  # a dot in a directory; extensions lowercased
            ("./v1.0/cat/1.cls", b"0"),
            ("./README", b"no dot: not a sample member"),
            ("./cat/2.jpg", images[3]),  # not consecutive: a sample without a label ...
            ("./cat/5.jpg", images[4]),
            ("./cat/5.cls", b"1"),
            ("./cat/2.cls", b"0"),  # ... and one without an image: two bad rows
        ],
    )
    source = open_source(str(tmp_path / "wds"))
    [unit] = plan_units(source, source.files)
    rows = read_unit(source, unit)
    ids = ["./cat/0", "./dog/0", "./v1.0/cat/1", "./cat/2", "./cat/5", "./cat/2"]
    assert rows["id"].tolist() == ids and rows["label"].tolist() == [0, 1, 0, -1, 1, -1]
    assert rows["image"].tolist() == [*images, None]
    reasons = [
        "no .cls label member (its members: ['jpg'])",
        "no image member (its members: ['cls'])",
    ]
    assert rows["error"].tolist() == [None] * 3 + reasons[:1] + [None] + reasons[1:]

    manifest = prepare(str(tmp_path / "wds"), tmp_path / "out", progress=False)
    assert manifest["skipped"] == [{"id": "./cat/2", "reason": reason} for reason in reasons]
    cfg = DataConfig(dataset=str(tmp_path / "wds"), image_size=32)
    streamed = by_id(collect(build_dataset(cfg, "val", 16, keep_ids=True)))
    prepared = cfg.model_copy(update={"dataset": str(tmp_path / "out")})
    assert by_id(collect(build_dataset(prepared, "val", 16, keep_ids=True))) == {
        key: row for key, row in streamed.items() if key != "./cat/2"
    }
    assert set(streamed) == set(ids) and not streamed["./cat/2"][1]


def test_image_folder(ray_local, tmp_path, awkward_images):
    for c, cls in enumerate(["a", "b"]):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "f" / cls / f"{i}.jpg").write_bytes(jpeg(c))
    (tmp_path / "f" / "b" / "bad.jpg").write_bytes(awkward_images["zero_bytes"][0])
    out = collect(
        build_dataset(DataConfig(dataset=str(tmp_path / "f"), image_size=32), "train", 16)
    )
    assert len(out["ok"]) == 7 and out["ok"].sum() == 6
    assert out["label"][out["ok"]].tolist().count(1) == 3


def test_bad_configuration_fails_before_ray_work(tmp_path, digits):
    with pytest.raises(ValueError, match="not a multiple of patch size 16"):
        build_dataset(DataConfig(dataset=str(digits), image_size=20), "train", 16)
    with pytest.raises(SourceError, match="does not exist"):
        build_dataset(DataConfig(dataset=str(tmp_path / "nope"), image_size=32), "train", 16)
    with pytest.raises(SourceError, match="no split 'holdout'"):
        build_dataset(DataConfig(dataset=str(digits), image_size=16), "holdout", 4)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    pq.write_table(pa.table({"img": [b"x"], "lbl": [0]}), renamed / "train.parquet")
    with pytest.raises(SourceError, match=r"no image column .* columns are \['img', 'lbl'\]"):
        build_dataset(DataConfig(dataset=str(renamed), image_size=32), "train", 16)
    with pytest.raises(SourceError, match="unknown built-in"):
        build_dataset(DataConfig(dataset="builtin:cifar", image_size=32), "train", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no"):
        resolve_source(str(tmp_path / "empty"))


def test_a_task_reads_and_yields_one_row_group_at_a_time(tmp_path, monkeypatch):
    """A task of several row groups yields each before it reads the next."""
    from pipeline.dataset import load_tasks, plan_split
    from pipeline.readers import task_source

    prepare("builtin:digits", tmp_path / "d", shard_size="4kb", progress=False)
    cfg = DataConfig(dataset=str(tmp_path / "d"), image_size=16, task_bytes=20_000)
    info = describe_dataset(cfg)
    tasks = plan_split(cfg, info, "train")
    assert max(len(task) for task in tasks) > 1
    task = max(tasks, key=len)
    reads = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, **kw: reads.append(i) or read_row_group(self, i, **kw),
    )
    out = load_tasks(
        {"units": np.array([json.dumps(task)])},
        source=task_source(info.source),
        chunk_rows=10_000,
        cfg=cfg,
        patch_size=4,
        train=False,
        num_classes=10,
        keep_ids=False,
    )
    first = next(out)
    assert len(reads) == 1 and len(first["label"]) == task[0]["rows"]
    rest = list(out)
    assert len(reads) == len(task)
    assert [len(b["label"]) for b in [first, *rest]] == [u["rows"] for u in task]


def test_a_val_subset_is_the_same_rows_every_time_and_of_the_size_asked(ray_local, tmp_path):
    prepare("builtin:digits", tmp_path / "d", shard_size="4kb", progress=False)
    cfg = DataConfig(dataset=str(tmp_path / "d"), image_size=16)
    first = collect(build_dataset(cfg, "val", 4, keep_ids=True, subset=70))
    again = collect(build_dataset(cfg, "val", 4, keep_ids=True, subset=70))
    assert len(first["id"]) == 70 and len(set(first["id"])) == 70
    assert sorted(first["id"]) == sorted(again["id"])
    everything = collect(build_dataset(cfg, "val", 4, keep_ids=True))
    assert set(first["id"]) < set(everything["id"]) and len(everything["id"]) == 180
