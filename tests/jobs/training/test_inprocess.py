"""The in-process runner (the `pretrained` fixture's, a one-worker Tune trial's loop) with
the datasets the Ray Train path gets."""

from jobs.config import CONFIGS, load_config
from jobs.training.inprocess import train_in_process


def test_a_val_subset_is_evaluated_each_epoch_and_the_whole_split_at_the_end(ray_local, digits_dir):
    cfg = load_config(
        CONFIGS / "demo-pretrain.yaml",
        [
            f"data.dataset={digits_dir / 'digits'}",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=1",
            "train.epochs=2",
            "data.val_subset=60",
            "mlflow.enabled=false",
        ],
    )
    reports = train_in_process(cfg)
    assert [m["val_images"] for m in reports if "val_top1" in m] == [60, 180]  # val: 180
