"""The plan the driver makes before any Ray work: sizes checked, steps counted."""

from __future__ import annotations

import pytest
from PIL import Image

from jobs.config import CONFIGS, load_config
from jobs.training.plan import make_plan
from pipeline.prepare import prepare

from helpers import encode, photo


def image_folder(root, per_class: int) -> None:
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(photo((64, 48), seed=c + i))
            (root / name / f"{i}.png").write_bytes(encode(img, "PNG"))


def config(dataset, *sets: str):
    return load_config(CONFIGS / "demo-pretrain.yaml", [f"data.dataset={dataset}", *sets])


def test_steps_come_from_the_train_rows_per_worker(tmp_path):
    image_folder(tmp_path / "src", per_class=40)
    prepare(str(tmp_path / "src"), tmp_path / "ds", val_fraction=0.25, progress=False)
    cfg = config(tmp_path / "ds", "train.batch_size=8", "train.epochs=3")
    plan, start = make_plan(cfg)
    assert start is None and plan.class_names == ("cat", "dog")
    assert plan.train_rows + plan.val_rows == 80
    assert plan.steps_per_epoch == plan.train_rows // 2 // 4  # 2 workers x 4 rows
    assert plan.total_steps == 3 * plan.steps_per_epoch


def test_too_few_rows_for_one_micro_batch_stop_at_plan_time_with_the_numbers(tmp_path):
    """17 training images with the demo config (2 workers x 64) used to wait forever."""
    image_folder(tmp_path / "src", per_class=10)
    prepare(str(tmp_path / "src"), tmp_path / "ds", val_fraction=0.15, progress=False)
    with pytest.raises(ValueError, match=r"17 train rows over 2 worker\(s\) make 8 per worker, "
                       r"fewer than one micro-batch of 64") as error:  # fmt: skip
        make_plan(config(tmp_path / "ds"))
    assert "train.batch_size" in str(error.value) and "scaling.num_workers" in str(error.value)


def test_a_fine_tune_feeds_images_as_its_weights_saw_them(tmp_path, capsys):
    from jobs.training.start import Start, data_for_start
    from vit import Preprocessing, ViTConfig

    start = Start(
        ViTConfig.from_preset("micro/4"), {}, tmp_path, {}, None,
        Preprocessing("bicubic", 0.9, "squash"),
    )  # fmt: skip
    cfg = load_config(CONFIGS / "demo-finetune.yaml", ["init.checkpoint=x"])
    assert cfg.data.eval_crop_fraction == 1.0  # the config's own choice: it stands
    fed = data_for_start(cfg, start).data
    assert fed.eval_transform == ("bicubic", 1.0, "squash")
    assert "bicubic resize, squash crop 1" in capsys.readouterr().out
