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


def test_a_dinov2_with_registers_tower_fine_tunes_at_another_resolution(
    ray_local, digits_dir, tmp_path
):
    """The Hub tower people start from, end to end: `init.checkpoint=hf:DIR` converts it
    (registers, layer scale, class position folded in), resizes its patch grid alone from
    4x4 to 3x3, adds a zero head for digits' 10 classes, and trains."""
    import transformers as T

    from jobs.tracking.checkpoints import fetch_checkpoint
    from jobs.training.start import resized_start
    from pipeline.dataset import describe_dataset
    from vit import load_checkpoint

    tower = T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, num_register_tokens=4,
        )
    )  # fmt: skip
    tower.save_pretrained(tmp_path / "hub")
    processor = T.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )  # fmt: skip
    processor.save_pretrained(tmp_path / "hub")
    cfg = load_config(
        CONFIGS / "demo-finetune.yaml",
        [
            f"data.dataset={digits_dir / 'digits'}",
            f"init.checkpoint=hf:{tmp_path / 'hub'}",
            "data.image_size=24",
            "train.max_steps=4",
            "mlflow.enabled=false",
        ],
    )
    classes = describe_dataset(cfg.data).class_names
    fetch = lambda ref, workdir: fetch_checkpoint(ref, None, workdir)  # noqa: E731
    start = resized_start(cfg, classes, fetch, str(tmp_path / "work"))
    assert (start.config.reg_tokens, start.config.no_embed_class) == (4, True)
    assert start.config.grid_size == (3, 3) and start.config.num_classes == 10
    reports = train_in_process(cfg, start, keep=tmp_path / "tuned")
    assert reports and all(r["loss"] == r["loss"] for r in reports)  # trained, no NaN
    tuned = load_checkpoint(tmp_path / "tuned")
    assert tuned.pos_embed.shape[1] == 9 and tuned.reg_token.shape[1] == 4
