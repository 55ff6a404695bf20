"""`vitray tune`: ASHA searches on a real local Ray with a real MLflow server: nested runs,
registry and alias, resume after Ctrl-C, no hangs when trials are stopped early, and the
watchdog. Small digits trials (micro/4 with 2 blocks at 16 px). Slow: marked, run in CI."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.config import load_config
from jobs.tracking.runs import DESCRIPTION_TAG, recorded_run_id
from jobs.training.search.outcome import TRIAL_RUN_KEY
from jobs.training.search.watchdog import SearchStopped

from helpers import ROOT, search_config, tracked_search

pytestmark = pytest.mark.slow


def children(client, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def test_two_trial_search_nests_runs_registers_best_and_reloads(
    ray_local, digits_dir, mlflow_server, tmp_path
):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from jobs.tracking.checkpoints import load_any

    path = search_config(tmp_path, digits_dir / "digits", mlflow_server, "two", register_as="dg")
    outcome = tracked_search(load_config(path))
    client = MlflowClient(mlflow_server)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    trials = children(client, outcome.parent_run_id)
    assert len(trials) == 2
    assert {t.data.tags["vitray.tune.fate"] for t in trials} <= {"complete", "stopped"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trial_curves.png", "params_vs_metric.png", "trials.json"} <= artifacts
    assert parent.data.metrics["best_val_top1"] == pytest.approx(outcome.best_metric)
    chosen = next(r for r in outcome.results if r.metrics[TRIAL_RUN_KEY] == outcome.best_run_id)
    assert chosen.metrics["step"] == max(r.metrics["step"] for r in outcome.results)
    assert outcome.best_metric == chosen.metrics["val_top1"]  # its last report, not a peak
    assert outcome.best_checkpoint.path == chosen.checkpoint.path  # the final epoch's weights

    version = client.get_model_version_by_alias("dg", "champion")
    assert version.version == outcome.registered.version
    assert outcome.best_run_id in version.description and "test_top1" in version.description
    best_run = client.get_run(outcome.best_run_id)
    assert best_run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
    assert 0 <= best_run.data.metrics["test_top1"] <= 1  # scored on the held-out split
    served = mlflow.pyfunc.load_model("models:/dg@champion")
    ours = load_any("models:/dg@champion", mlflow_server).eval()
    images = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = ours(torch.from_numpy(images)).softmax(-1).numpy()
    out = served.predict(pd.DataFrame({"image": list(images)}), params={"input": "tensor"})
    assert list(out["label"]) == [str(i) for i in expected.argmax(1)]
    np.testing.assert_allclose(out["score"].astype(float), expected.max(1), rtol=1e-5)


def test_trials_of_two_workers_drive_a_trainer_and_register_its_reported_checkpoint(
    ray_local, digits_dir, mlflow_server, tmp_path, capsys
):
    """Each trial a thin driver (1 CPU) whose TorchTrainer reserves 2 workers of 0.25 CPU:
    with a decode task of 0.25, one trial holds 1.75 of this machine's 2 CPUs, so the search
    runs one at a time. The chosen model is the checkpoint its trainer reported."""
    from mlflow import MlflowClient

    path = search_config(
        tmp_path, digits_dir / "digits", mlflow_server, "ddp", epochs=2, register_as="ddp",
        scheduler="fifo",  # no trial killed early: see docs/design.md#tune-trials
    )  # fmt: skip
    cfg = load_config(path, ["scaling.num_workers=2", "scaling.cpus_per_worker=0.25"])
    outcome = tracked_search(cfg)
    assert "1 at a time" in capsys.readouterr().out  # tune.max_concurrent 2, capped
    assert outcome.stopped_because is None
    assert len(outcome.results) == 2 and all(r.metrics["epoch"] >= 1 for r in outcome.results)
    chosen = next(r for r in outcome.results if r.metrics[TRIAL_RUN_KEY] == outcome.best_run_id)
    assert outcome.best_checkpoint.path == chosen.metrics["checkpoint_path"]
    version = MlflowClient(mlflow_server).get_model_version_by_alias("ddp", "champion")
    assert version.version == outcome.registered.version
    assert outcome.best_run_id in version.description


def test_four_trial_asha_searches_never_hang(ray_local, digits_dir, mlflow_server, tmp_path):
    """The hang of docs/design.md#tune-trials: trials stopped early kept their resources and
    the next trial waited forever. Three searches in a row, each must finish well inside its
    budget."""
    stopped = 0
    for i in range(3):
        path = search_config(
            tmp_path, digits_dir / "digits", mlflow_server, f"asha{i}", epochs=2, num_samples=4
        )  # 2 epochs, an ASHA rung at 1: a trial behind the leaders there stops
        started = time.monotonic()
        outcome = tracked_search(load_config(path, [f"train.seed={i}"]))
        assert outcome.stopped_because is None
        assert time.monotonic() - started < 400
        fates = [r.metrics.get("epoch", 0) for r in outcome.results]
        assert len(fates) == 4 and all(f >= 1 for f in fates)
        stopped += sum(f < 2 for f in fates)
    assert stopped >= 1, "ASHA stopped no trial early in three searches"


def test_a_trial_that_runs_again_continues_its_nested_run(digits_dir, mlflow_server, tmp_path):
    """A trial restarted before its first checkpoint has no run id to resume from: it finds
    its run by name under the parent instead of leaving a first one RUNNING forever."""
    from mlflow import MlflowClient

    from jobs.tracking.runs import open_trial_run

    cfg = load_config(search_config(tmp_path, digits_dir / "digits", mlflow_server, "again"))
    client = MlflowClient(mlflow_server)
    parent = client.create_run(client.create_experiment("trial-runs-again")).info.run_id
    rows = {"train": 1257, "val": 180}
    first = open_trial_run(cfg, mlflow_server, parent, "run_trial_a_00000", rows)
    assert open_trial_run(cfg, mlflow_server, parent, "run_trial_a_00000", rows) == first
    other = open_trial_run(cfg, mlflow_server, parent, "run_trial_a_00001", rows)
    assert other != first and {r.info.run_id for r in children(client, parent)} == {first, other}


def test_interrupted_search_resumes_with_the_same_command(digits_dir, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    path = search_config(tmp_path, digits_dir / "digits", mlflow_server, "resume", scheduler="fifo")
    command = [sys.executable, "-m", "jobs.cli", "tune", "--config", str(path)]
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "RAY_ADDRESS": "local"}
    first = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_dir = tmp_path / "runs" / "resume"
    try:
        deadline = time.monotonic() + 300
        while not list(run_dir.glob("*/checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list(run_dir.glob("*/checkpoint_*")), "no trial checkpoint before the deadline"
        first.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 1 and "run the same command again" in out
    client = MlflowClient(mlflow_server)
    interrupted = client.get_run(recorded_run_id(str(run_dir)))
    assert interrupted.info.status == "FAILED"
    assert "interrupted with" in interrupted.data.tags[DESCRIPTION_TAG].splitlines()[0]

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the search" in second.stdout
    assert "snapshotting has been triggered" not in second.stdout + second.stderr
    assert re.search(r"_0000[01]: step \d+/\d+ epoch [\d.]+ loss", second.stdout)  # progress

    experiment = client.get_experiment_by_name("vitray-tune-test").experiment_id
    parents = client.search_runs([experiment], filter_string=f"tags.`vitray.run_dir` = '{run_dir}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "Failed" not in parents[0].data.tags[DESCRIPTION_TAG]  # resumed, then finished
    steps_per_run = [
        [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
        for run in children(client, parents[0].info.run_id)
    ]
    last_step = 3 * (1257 // 128)  # 3 epochs of the 1,257 training digits, batch 128
    finished = [steps for steps in steps_per_run if steps and steps[-1] == last_step]
    assert len(finished) == 2, f"{steps_per_run}\n{second.stdout[-6000:]}"  # both trials
    # A resumed trial continues its own run from its checkpoint: steps never go back to the
    # start (an epoch reported but not yet checkpointed at Ctrl-C is trained again).
    assert all(steps == sorted(steps) for steps in steps_per_run), steps_per_run


def test_watchdog_names_a_stalled_trial_and_stops_the_search(
    ray_local, digits_dir, mlflow_server, tmp_path
):
    path = search_config(tmp_path, digits_dir / "digits", mlflow_server, "stall", stall_timeout_s=1)
    with pytest.raises(SearchStopped, match=r"trial \w+ .*reported nothing for"):
        tracked_search(load_config(path))


@pytest.mark.parametrize(
    "arch, layout",
    [
        ("vit_base_patch16_clip_quickgelu_224", {"norm_pre": True, "act": "quick_gelu"}),
        ("vit_small_patch14_reg4_dinov2", {"reg_tokens": 4, "no_embed_class": True}),
    ],
)
def test_a_search_fine_tunes_a_later_vit_from_timm_at_twice_its_size_and_registers_it(
    ray_local, digits_dir, mlflow_server, tmp_path, arch, layout
):
    """The towers people start from, through the whole path: timm writes a tiny CLIP or
    DINOv2-with-registers model (random weights), `init.checkpoint=timm:DIR` converts it,
    the search fine-tunes it on digits at 32 px from 16 (its grid 4x4 -> 8x8, prefix tokens
    kept out of the interpolation) and registers the pick, which loads with its layout."""
    import timm
    from mlflow import MlflowClient
    from timm.models._hub import save_for_hf

    from jobs.tracking.checkpoints import load_any

    tower = timm.create_model(arch, pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0)  # fmt: skip
    save_for_hf(tower, tmp_path / "tower", safe_serialization=True)
    path = search_config(
        tmp_path, digits_dir / "digits", mlflow_server, f"tower-{arch}", epochs=1,
        num_samples=1, scheduler="fifo", register_as=f"tower-{arch}",
    )  # fmt: skip
    cfg = load_config(path, ["model.preset=null", f"init.checkpoint=timm:{tmp_path / 'tower'}",
                             "data.image_size=32"])  # fmt: skip
    outcome = tracked_search(cfg)
    version = MlflowClient(mlflow_server).get_model_version_by_alias(f"tower-{arch}", "champion")
    assert version.version == outcome.registered.version
    tuned = load_any(f"models:/tower-{arch}@champion", mlflow_server)
    assert tuned.config.grid_size == (8, 8) and tuned.config.num_classes == 10
    assert {k: getattr(tuned.config, k) for k in layout} == layout
