"""The in-process runner (the `pretrained` fixture's, a one-worker Tune trial's loop) with
the datasets the Ray Train path gets."""

from jobs.config import CONFIGS, load_config
from jobs.training.inprocess import train_in_process

from helpers import ended_pid


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


def test_a_starting_run_removes_the_checkpoint_a_killed_worker_left_on_its_node(
    ray_local, digits_dir, tmp_path, monkeypatch
):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = tmp_path / f"vitray-checkpoint-{ended_pid()}-k1ll"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half a checkpoint")
    cfg = load_config(
        CONFIGS / "demo-pretrain.yaml",
        [
            f"data.dataset={digits_dir / 'digits'}",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=1",
            "train.max_steps=1",
            "mlflow.enabled=false",
        ],
    )
    train_in_process(cfg)
    assert not left.exists()
