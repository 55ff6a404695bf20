"""`vitray finetune`: a 16 px digits model fine-tuned at 32 px on a real local Ray, logged to
a real MLflow server. Slow: marked, still run in CI."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.config import CONFIGS, load_config
from jobs.inference.evaluation import predict_split
from vit import load_checkpoint, read_checkpoint_meta, resize_pos_embed
from vit.resize import INTERPOLATION_PRESETS

from helpers import tracked_fit

pytestmark = pytest.mark.slow


def linear_probe_accuracy(model, data) -> float:
    """Logistic regression on the frozen pre-logits features: train split -> val split."""
    from sklearn.linear_model import LogisticRegression

    train = predict_split(model, data, "train", pre_logits=True)
    val = predict_split(model, data, "val", pre_logits=True)
    probe = LogisticRegression(max_iter=2000).fit(train["logits"].numpy(), train["labels"])
    return float((probe.predict(val["logits"].numpy()) == val["labels"].numpy()).mean())


def test_finetune_at_32px_resizes_posemb_new_head_and_learns(pretrained, digits_dir, mlflow_server):
    from mlflow import MlflowClient

    cfg = load_config(
        CONFIGS / "demo-finetune.yaml",
        [
            f"init.checkpoint={pretrained}",
            f"data.dataset={digits_dir / 'digits'}",
            "train.epochs=20",
            f"mlflow.tracking_uri={mlflow_server}",
            f"run.storage_path={digits_dir / 'ft-runs'}",
        ],
    )
    start_model = load_checkpoint(pretrained, image_size=32)
    probe = linear_probe_accuracy(start_model, cfg.data)
    outcome = tracked_fit(cfg, kind="finetune")
    tuned = outcome.result.metrics["val_top1"]
    # The paper's claim at toy scale: fine-tuning the whole model at the new resolution
    # beats a linear probe on its frozen features. Measured in one process from a val-0.73
    # start: probe 0.85, fine-tune 0.93 after 20 epochs (0.88 after 15).
    print(f"fine-tuned {tuned:.3f} vs linear probe {probe:.3f}")
    assert tuned > probe, f"fine-tuned {tuned:.3f} <= linear probe {probe:.3f}"

    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.mlflow_run_id)
    tags = run.data.tags
    assert tags["vitray.init.source"] == str(pretrained)
    assert (tags["vitray.init.old_grid"], tags["vitray.init.new_grid"]) == ("4x4", "8x8")
    assert tags["vitray.init.interpolation"] == "timm"
    start_dir = client.download_artifacts(run.info.run_id, "init_checkpoint")
    start = load_file(Path(start_dir) / "model.safetensors")
    source = load_file(pretrained / "model.safetensors")
    expected = resize_pos_embed(
        source["pos_embed"], (8, 8), (4, 4), 1, **INTERPOLATION_PRESETS["timm"]
    )
    assert start["pos_embed"].shape == (1, 65, 64)
    torch.testing.assert_close(start["pos_embed"], expected)
    assert not start["head.weight"].any() and not start["head.bias"].any()  # zero init
    torch.testing.assert_close(
        start["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"]
    )
    assert read_checkpoint_meta(start_dir)["model"]["image_size"] == [32, 32]
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {
        "figures/posemb_similarity.png",
        "figures/posemb_similarity_before_resize.png",
    } <= figures


def test_finetune_from_an_mlflow_uri_and_from_timm_weights(pretrained, digits_dir, mlflow_server):
    """init.checkpoint takes runs:/ URIs and foreign weights, not only directories."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    from jobs.tracking.checkpoints import fetch_checkpoint, local_checkpoint

    ref = f"runs:/{logged_run(mlflow_server)}/checkpoint/final"
    with local_checkpoint(ref, mlflow_server) as uri_dir:
        assert (uri_dir / "model.safetensors").is_file()
    assert not uri_dir.exists(), "a command's download is left behind"

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    path = digits_dir / "timm-tiny"  # a timm Hub directory: weights + config.json
    save_for_hf(model, path, safe_serialization=True)
    converted = fetch_checkpoint(f"timm:{path}", None, str(digits_dir / "timm-conv"))
    ours = load_checkpoint(converted)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def logged_run(uri: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vitray-demo")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`vitray.kind` = 'finetune'"
    )
    assert runs, "the fine-tune test above logs a run first"
    return runs[0].info.run_id


def test_bad_init_checkpoint_is_a_clear_error(digits_dir):
    cfg = load_config(
        CONFIGS / "demo-finetune.yaml",
        ["init.checkpoint=/nowhere/at/all", f"data.dataset={digits_dir / 'digits'}"],
    )
    with pytest.raises(FileNotFoundError, match="no such directory: /nowhere/at/all"):
        tracked_fit(cfg, kind="finetune")
