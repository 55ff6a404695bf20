"""build_dataset on a real local Ray, over real shards of real image bytes."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, photo
from PIL import Image

from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, describe_dataset
from pipeline.prepare import prepare
from pipeline.sources import SourceError, resolve_source


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


def test_evaluation_batches_of_a_cached_split_come_from_one_pass(ray_local, digits):
    from jobs.train import CachedBatches

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


def test_hugging_face_parquet_as_downloaded(ray_local, tmp_path):
    names = ["apple", "pear", "plum"]
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
    data = tmp_path / "hf" / "data"
    data.mkdir(parents=True)
    for split, n in (("train", 9), ("test", 3)):
        rows = [{"bytes": jpeg(i), "path": f"{split}_{i}.jpg"} for i in range(n)]
        table = pa.table({"image": rows, "label": [i % 3 for i in range(n)]}, schema=schema)
        pq.write_table(table, data / f"{split}-00000-of-00001.parquet")
    cfg = DataConfig(dataset=str(tmp_path / "hf"), image_size=32)
    assert describe_dataset(cfg).class_names == names
    train = collect(build_dataset(cfg, "train", 16, keep_ids=True))
    assert len(train["label"]) == 9 and train["ok"].all()
    assert set(train["id"]) == {f"train_{i}.jpg" for i in range(9)}
    assert len(collect(build_dataset(cfg, "test", 16))["label"]) == 3


def test_webdataset_tars(ray_local, tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    for shard in range(2):
        with tarfile.open(root / f"train-{shard:06d}.tar", "w") as tar:
            for i in range(4):
                key = f"{shard}{i:05d}"
                for ext, payload in (("jpg", jpeg(i)), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    cfg = DataConfig(dataset=str(root), image_size=32)
    assert resolve_source(str(root)).kind == "webdataset"
    out = collect(build_dataset(cfg, "train", 16))
    assert len(out["label"]) == 8 and sorted(out["label"].tolist()) == [0] * 4 + [1] * 4


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
    with pytest.raises(SourceError, match=r"no column\(s\) \['image', 'label'\]"):
        build_dataset(DataConfig(dataset=str(renamed), image_size=32), "train", 16)
    with pytest.raises(SourceError, match="unknown built-in"):
        build_dataset(DataConfig(dataset="builtin:cifar", image_size=32), "train", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no"):
        resolve_source(str(tmp_path / "empty"))
