"""`vitray pretrain` on each new layout, streamed as it is (no prepare): real local Ray,
two Train workers, 20 steps. The checkpoint's class names are the ones the layout's own
library gives. Slow: marked, still run in CI."""

from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from torchvision.datasets import FashionMNIST

from jobs.config import CONFIGS, load_config
from vit.checkpoint import read_checkpoint_meta

from helpers import tracked_fit
from layouts import hub_train_and_test, idx_folder, png, split_tree, write, write_metadata

pytestmark = pytest.mark.slow


def imagenet(root: Path) -> tuple[dict, list[str]]:
    split_tree(root, "validation", per_class=12)
    return {}, ["n0144", "n0151", "n0201"]


def imagefolder_metadata(root: Path) -> tuple[dict, list[str]]:
    rows = [{"file_name": f"img/{i}.png", "label": ["tee", "bag"][i % 2]} for i in range(48)]
    for row, i in zip(rows, range(48), strict=True):
        write(root / row["file_name"], png(i))
    write_metadata(root, rows, "csv")
    return {"data.val_fraction": 0.25}, ["bag", "tee"]


def save_to_disk(root: Path) -> tuple[dict, list[str]]:
    features = Features({"image": Image(), "label": ClassLabel(names=["x", "y"])})
    rows = {"image": [{"bytes": png(i), "path": None} for i in range(60)], "label": [0, 1] * 30}
    ds = Dataset.from_dict(rows, features=features)
    DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(
        str(root), max_shard_size="4KB"
    )
    return {"data.val_fraction": 0.2}, ["x", "y"]


def hub_parquet(root: Path) -> tuple[dict, list[str]]:
    hub_train_and_test(root, rows=80)
    return {"data.val_split": "test"}, ["a", "b", "c"]


def fashion_idx(root: Path) -> tuple[dict, list[str]]:
    idx_folder(root / "FashionMNIST" / "raw", gz=True, n={"train": 12_000, "t10k": 100})
    return {"data.val_fraction": 0.2, "data.dataset": str(root / "FashionMNIST")}, list(
        FashionMNIST.classes
    )


@pytest.mark.parametrize(
    "layout", [imagenet, imagefolder_metadata, save_to_disk, hub_parquet, fashion_idx]
)
def test_pretrain_streams_every_layout_with_its_class_names(ray_local, tmp_path, layout):
    root = tmp_path / "data"
    sets, classes = layout(root)
    overrides = {
        "data.dataset": str(root),
        "smoke": "true",
        "mlflow.enabled": "false",
        "train.batch_size": 16,
        "run.storage_path": str(tmp_path / "runs"),
        **sets,
    }
    cfg = load_config(CONFIGS / "demo-pretrain.yaml", [f"{k}={v}" for k, v in overrides.items()])
    outcome = tracked_fit(cfg)
    assert outcome.result.metrics["step"] == 20 and "val_top1" in outcome.result.metrics
    meta = read_checkpoint_meta(outcome.result.checkpoint.path)
    assert meta["class_names"] == classes
