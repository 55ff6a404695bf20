"""`vitray pretrain` end to end: real local Ray (2 CPU workers, gloo DDP), a real MLflow
server on 127.0.0.1 with SQLite, real digits shards. Slow: marked, still run in CI."""

import errno
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from jobs.config import CONFIGS
from vit import load_checkpoint

from helpers import (
    kill_a_train_worker_after_its_first_checkpoint,
    pretrain_config,
    tracked_fit,
)

DEMO = CONFIGS / "demo-pretrain.yaml"
pytestmark = pytest.mark.slow


def test_two_workers_learn_digits_log_to_mlflow_and_register_where_a_fine_tune_starts(
    ray_local, digits_dir, mlflow_server
):
    """Two gloo workers learn digits; the MLflow run holds its params, dataset, metrics,
    checkpoint and a servable model; and mlflow.register_as makes the best checkpoint a
    version with the alias moved to it, which the models:/<name>@<alias> a fine-tune names
    loads."""
    from mlflow import MlflowClient

    from jobs.tracking.checkpoints import load_any

    tmp = digits_dir / "run"
    tmp.mkdir()
    sets = {"train.max_steps": 250, "run.name": "two", "mlflow.register_as": "digits-pretrained"}
    outcome = tracked_fit(pretrain_config(tmp, mlflow_server, **sets))
    metrics = outcome.result.metrics
    assert metrics["step"] == 250 and metrics["val_top1"] > 0.25  # chance is 0.1
    # the Ray vitray starts runs no preemption watcher (nothing drains its nodes)
    actors = ray_local._private.state.actors().values()
    assert "RayTrainWorker" in {a["ActorClassName"] for a in actors}
    assert not [a for a in actors if "Preemption" in a["ActorClassName"]]
    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "64"
    assert run.data.tags["ray.nodes"] == "1" and run.data.tags["gpu_type"] == "none"
    assert any(key.startswith("system/") for key in run.data.metrics)  # CPU, memory, ...
    (used,) = run.inputs.dataset_inputs  # the data, as the run page and runs table show it
    assert used.dataset.name == "digits" and json.loads(used.dataset.profile) == {
        "num_rows": 1797, "train_rows": 1257, "val_rows": 180, "test_rows": 360,
        "val_from": "val",  # which rows validate: the source's own val split
    }  # fmt: skip
    assert run.data.tags["mlflow.note.content"].startswith("`vitray")  # the command line
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) >= 10 and losses[-1] < losses[0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint/final")}
    assert "checkpoint/final/model.safetensors" in artifacts
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    logged = client.search_logged_models([run.info.experiment_id])
    served = mlflow.pyfunc.load_model(logged[0].model_uri)  # registrable, safetensors inside
    flavor = served.metadata.flavors["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor  # code, not a pickle
    arrays = [np.zeros((16, 16, 3), np.uint8), np.zeros((9, 40), np.uint8)]  # any size
    answered = served.predict(pd.DataFrame({"image": arrays}))
    assert set(answered["label"]) <= {str(i) for i in range(10)}  # digits' class names
    needs = Path(mlflow.pyfunc.get_model_dependencies(logged[0].model_uri)).read_text()
    assert {"torch", "vitray"} <= {line.split("==")[0] for line in needs.split()}  # to serve it
    model = load_checkpoint(outcome.result.checkpoint.path, image_size=32)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    version = client.get_model_version_by_alias("digits-pretrained", "champion")
    assert version.tags["source_run"] == outcome.mlflow_run_id
    model = load_any("models:/digits-pretrained@champion", mlflow_server, image_size=32)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    "sets, message",
    [  # the 2-CPU trap: one worker of 1.5 CPUs left a decode task of 1.0 waiting forever
        ({"scaling.num_workers": 1, "scaling.cpus_per_worker": 1.5}, r"2.5 CPU in all .*has 2"),
        ({"scaling.use_gpu": True}, r"2 GPU in all .*has 0; 1 GPU per worker, the largest"),
    ],
)
def test_a_job_the_cluster_cannot_hold_fails_before_any_run(
    ray_local, digits_dir, tmp_path, sets, message
):
    tmp = digits_dir / tmp_path.name
    tmp.mkdir()
    cfg = pretrain_config(tmp, f"sqlite:///{tmp}/mlflow.db", **sets)
    with pytest.raises(ValueError, match=message):
        tracked_fit(cfg)
    assert not (tmp / "mlflow.db").exists()  # no MLflow run was opened


def test_killed_worker_restarts_and_a_rerun_continues_the_same_run(
    ray_local, digits_dir, mlflow_server
):
    """A worker killed mid-run: Ray Train restarts from the last checkpoint and finishes.
    The same command again, with more steps: it resumes there, in the same MLflow run."""
    import threading

    from mlflow import MlflowClient

    tmp = digits_dir / "kill"
    tmp.mkdir()
    cfg = pretrain_config(tmp, mlflow_server, **{"train.max_steps": 60, "run.name": "kill"})
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(done=tracked_fit(cfg)))
    thread.start()
    run_dir = tmp / "runs" / "kill"
    kill_a_train_worker_after_its_first_checkpoint(run_dir)  # SIGKILL, mid-run
    thread.join(timeout=600)
    first = outcome["done"]
    assert first.result.metrics["step"] == 60  # the planned step count, not more, not less
    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("vitray-demo").experiment_id],
        filter_string="tags.`vitray.run_dir` = '" + str(run_dir) + "'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

    finished_at = time.time() * 1000
    again = tracked_fit(
        pretrain_config(tmp, mlflow_server, **{"train.max_steps": 70, "run.name": "kill"})
    )
    assert again.result.metrics["step"] == 70
    assert again.mlflow_run_id == first.mlflow_run_id
    history = client.get_metric_history(first.mlflow_run_id, "loss")
    rerun_steps = sorted(m.step for m in history if m.timestamp > finished_at)
    assert rerun_steps and rerun_steps[0] > 60 and rerun_steps[-1] == 70  # not from step 0
    assert len(rerun_steps) == len(set(rerun_steps))


def test_checkpoints_of_a_run_this_store_lacks_start_a_new_run(
    ray_local, digits_dir, mlflow_server
):
    """Checkpoints left by a run logged elsewhere (a deleted mlflow.db, another server) do
    not crash the rerun: it logs to a new run of this store and says so."""
    from mlflow import MlflowClient

    from jobs.tracking.runs import RUN_RECORD, open_run

    tmp = digits_dir / "elsewhere"  # pretrain_config() reads the digits beside it
    run_dir = tmp / "runs" / "elsewhere"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_RECORD).write_text(json.dumps({"mlflow_run_id": "0" * 32}))
    cfg = pretrain_config(tmp, mlflow_server, **{"run.name": "elsewhere"})
    run_id = open_run(cfg, mlflow_server, str(run_dir), "pretrain", {"train": 1257, "val": 180})
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run_id != "0" * 32 and run.info.status == "RUNNING"
    assert run.data.params["train.batch_size"] == "64"  # a new run, with its config


def one_worker(tmp, uri, name: str, epochs: int, **sets):
    """A run of one worker (no DDP start-up) for `epochs` epochs, a checkpoint at each end."""
    more = {"run.name": name, "train.epochs": epochs, "scaling.num_workers": 1}
    return pretrain_config(tmp, uri, **more, **{"scaling.cpus_per_worker": 1}, **sets)


def steps_logged_since(uri: str, run_id: str, since_ms: float) -> list[int]:
    from mlflow import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    return sorted(m.step for m in history if m.timestamp > since_ms)


def test_a_checkpoint_cut_short_does_not_block_a_rerun(ray_local, digits_dir, mlflow_server):
    """A crash while a checkpoint was copied to storage leaves a directory Ray never
    registered, newest by name: here half the weights and half the train state. The rerun
    resumes from the last registered checkpoint, in the same MLflow run."""
    tmp = digits_dir / "cut"
    tmp.mkdir()
    first = tracked_fit(one_worker(tmp, mlflow_server, "cut", epochs=1))
    epoch = first.result.metrics["step"]
    run_dir = tmp / "runs" / "cut"
    (saved,) = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    cut = run_dir / "checkpoint_9999-12-31_23-59-59.999999"
    cut.mkdir()
    for name in ("model.safetensors", "train_state.pt"):
        data = (saved / name).read_bytes()
        (cut / name).write_bytes(data[: len(data) // 2])

    finished_at = time.time() * 1000
    again = tracked_fit(one_worker(tmp, mlflow_server, "cut", epochs=2))
    assert again.result.metrics["step"] == 2 * epoch
    assert again.mlflow_run_id == first.mlflow_run_id
    assert steps_logged_since(mlflow_server, first.mlflow_run_id, finished_at)[0] > epoch


def fill(directory: Path) -> None:
    """Write zeros into `directory` until its file system is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError) as full:
            while f.write(bytes(1 << 20)):
                pass
    assert full.value.errno == errno.ENOSPC


def test_a_full_disk_stops_the_run_by_name_and_a_rerun_with_room_resumes(
    ray_local, digits_dir, mlflow_server
):
    """The run's storage is a 64 MB tmpfs, filled by another file once the first
    checkpoint is registered, so the second save fails: the run stops naming the path and
    the full disk, the first checkpoint is intact, and once there is room again the same
    command resumes from it in the same MLflow run."""
    import threading

    from jobs.tracking.runs import RUN_RECORD

    tmp = digits_dir / "full"
    store = tmp / "runs"
    store.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(store)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (root or CAP_SYS_ADMIN): {mounted.stderr}")
    try:
        cfg = one_worker(tmp, mlflow_server, "full", epochs=2, **{"run.max_failures": 0})
        failed: dict = {}

        def first_run() -> None:
            try:
                tracked_fit(cfg)
            except Exception as e:
                failed["error"] = e

        thread = threading.Thread(target=first_run)
        thread.start()
        run_dir = store / "full"
        deadline = time.time() + 300
        while not (run_dir / "checkpoint_manager_snapshot.json").exists():  # registered
            assert time.time() < deadline and thread.is_alive(), "no checkpoint registered"
            time.sleep(0.2)
        (saved,) = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
        before = {f.name: f.read_bytes() for f in saved.iterdir()}
        fill(store)
        thread.join(timeout=600)
        assert "error" in failed, "the run finished on a full disk"
        message = str(failed["error"])
        assert "no space left on device" in message and str(run_dir) in message
        assert {f.name: f.read_bytes() for f in saved.iterdir()} == before
        epoch = torch.load(saved / "train_state.pt", weights_only=True)["step"]
        first_run_id = json.loads((run_dir / RUN_RECORD).read_text())["mlflow_run_id"]

        (store / "filler").unlink()
        failed_at = time.time() * 1000
        again = tracked_fit(cfg)
        assert again.result.metrics["step"] == 2 * epoch and again.mlflow_run_id == first_run_id
        assert steps_logged_since(mlflow_server, first_run_id, failed_at)[0] > epoch
    finally:
        subprocess.run(["umount", "--lazy", str(store)], check=True)
