"""Nodes that share nothing but object storage. A local cluster (`vitray cluster local up`:
a head and a worker node, each with its own temp dir and working directory) and an MLflow
server whose artifacts live on the S3 server, as the only shared things. The dataset
exists only on S3 (the prepared copy is deleted); a submitted pretrain reads `s3://`
shards, checkpoints to `s3://`, loses a worker to SIGKILL and resumes from `s3://`,
registers its model; a submitted search fine-tunes from that registered model. Nothing
of a run is written to a local disk. Slow: marked, still run in CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from jobs.cluster.local import MLFLOW_SERVER_ENV
from jobs.config import CONFIGS

from helpers import ROOT, free_port, stop_group, wait_healthy

pytestmark = pytest.mark.slow

BUCKETS = ("vitray-data", "vitray-runs", "vitray-mlflow")


def aws_env(endpoint: str) -> dict[str, str]:
    """Standard AWS variables: what boto3 (MLflow), pyarrow (Ray Data, Ray Train) read."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def vitray(*args: str, env: dict[str, str], cwd: Path, timeout: float = 1200):
    full = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", **env}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def s3_files(prefix: str, env: dict[str, str]) -> list[str]:
    """Every object under s3://PREFIX, listed the way the jobs see storage (pyarrow)."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http")
    try:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    except FileNotFoundError:
        return []
    return [i.path for i in infos if i.type == pafs.FileType.File]


@pytest.fixture(scope="module")
def storage(s3_server, digits_dir, tmp_path_factory):
    """The buckets, the prepared digits uploaded to s3://vitray-data/digits and the local
    copy gone, and an MLflow server (its own machine: SQLite on its disk) whose artifacts
    live in s3://vitray-mlflow."""
    import boto3

    env = aws_env(s3_server)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    for bucket in BUCKETS:
        s3.create_bucket(Bucket=bucket)
    local = tmp_path_factory.mktemp("upload") / "digits"
    shutil.copytree(digits_dir / "digits", local)
    for path in local.rglob("*"):  # as `aws s3 cp --recursive` would
        if path.is_file():
            s3.upload_file(str(path), "vitray-data", f"digits/{path.relative_to(local)}")
    shutil.rmtree(local)

    root = tmp_path_factory.mktemp("mlflow-s3")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", "s3://vitray-mlflow/artifacts", "--workers", "1",
        ],
        env={**os.environ, **env, **MLFLOW_SERVER_ENV}, cwd=root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri)
        yield {"env": env, "mlflow": uri}
    finally:
        stop_group(server)


@pytest.fixture(scope="module")
def cluster(storage, tmp_path_factory):
    """Head + 1 worker node, 2 CPUs each, the AWS variables in their environment (as a
    node's own credentials would be), no MLflow of its own."""
    state_dir = tmp_path_factory.mktemp("s3cluster")
    client_dir = tmp_path_factory.mktemp("client")
    up = vitray(
        "cluster", "local", "up", "--workers", "1", "--cpus", "2", "--no-mlflow",
        "--state", str(state_dir), env=storage["env"], cwd=client_dir,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    state = json.loads((state_dir / "state.json").read_text())
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(state_dir / "auth_token"),
        "MLFLOW_TRACKING_URI": storage["mlflow"],
    }
    try:
        yield {**state, "client_env": env, "client_dir": client_dir, "mlflow": storage["mlflow"]}
    finally:
        down = vitray("cluster", "local", "down", "--state", str(state_dir), env=env,
                      cwd=client_dir, timeout=300)  # fmt: skip
        assert down.returncode == 0, down.stdout + down.stderr


def is_train_worker_of(proc: psutil.Process, node_pids: set[int]) -> bool:
    """A Ray Train worker started by one of this cluster's nodes (not another Ray's)."""
    try:
        return "RayTrainWorker" in " ".join(proc.cmdline()) and any(
            p.pid in node_pids for p in proc.parents()
        )
    except psutil.Error:
        return False


def kill_a_worker_after_the_first_checkpoint(
    cluster, storage, run: str, job: threading.Thread
) -> int | None:
    """SIGKILL one of the job's Train workers once a checkpoint of `run` is on S3; None
    when the job ended first."""
    node_pids = {p["pid"] for p in cluster["processes"] if p["name"] != "mlflow"}
    while True:
        if not job.is_alive():
            return None
        saved = [f for f in s3_files(f"vitray-runs/runs/{run}", storage["env"])
                 if f.endswith("train_state.pt")]  # fmt: skip
        if saved:
            break
        time.sleep(1)
    workers = [p for p in psutil.process_iter() if is_train_worker_of(p, node_pids)]
    assert workers, "no Ray Train worker of the cluster found"
    workers[-1].kill()
    return workers[-1].pid


def test_pretrain_on_s3_survives_a_killed_worker_and_a_search_starts_from_its_model(
    cluster, storage
):
    from mlflow import MlflowClient

    client_dir, env = cluster["client_dir"], cluster["client_env"]
    shutil.copy(CONFIGS / "demo-pretrain.yaml", client_dir / "pretrain.yaml")
    pretrain = [
        "submit", "--address", cluster["dashboard"], "--",
        "pretrain", "--config", "pretrain.yaml",
        "--set", "data.dataset=s3://vitray-data/digits",
        "--set", "run.storage_path=s3://vitray-runs/runs",
        "--set", "run.name=share",
        "--set", "train.max_steps=40",
        "--set", "train.report_every=5",
        "--set", "scaling.placement_strategy=SPREAD",
        "--set", "data.cpus_per_task=0.25",
        "--set", "mlflow.experiment=share-nothing",
        "--set", "mlflow.register_as=digits-s3",
    ]  # fmt: skip
    done: dict = {}
    thread = threading.Thread(
        target=lambda: done.update(run=vitray(*pretrain, env=env, cwd=client_dir))
    )
    thread.start()
    killed = kill_a_worker_after_the_first_checkpoint(cluster, storage, "share", thread)
    thread.join(timeout=1500)
    run = done["run"]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert killed is not None, "the job ended before its first checkpoint reached S3"
    assert "step 40/40" in run.stdout and "SUCCEEDED" in run.stdout
    assert not psutil.pid_exists(killed)

    saved = s3_files("vitray-runs/runs/share", storage["env"])
    assert any(f.endswith("model.safetensors") for f in saved)
    assert any(f.endswith("vitray-run.json") for f in saved)
    client = MlflowClient(storage["mlflow"])
    experiment = client.get_experiment_by_name("share-nothing")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.metrics["step"] == 40
    history = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")]
    assert max(history) == 40
    assert client.get_model_version_by_alias("digits-s3", "champion").run_id == (
        mlflow_run.info.run_id
    )
    artifacts = s3_files("vitray-mlflow/artifacts", storage["env"])
    assert any(mlflow_run.info.run_id in f and f.endswith("model.safetensors") for f in artifacts)

    shutil.copy(CONFIGS / "demo-tune.yaml", client_dir / "tune.yaml")
    tune = vitray(
        "submit", "--address", cluster["dashboard"], "--",
        "tune", "--config", "tune.yaml",
        "--set", "init.checkpoint=models:/digits-s3@champion",
        "--set", "data.dataset=s3://vitray-data/digits",
        "--set", "run.storage_path=s3://vitray-runs/runs",
        "--set", "run.name=share-tune",
        "--set", "train.epochs=1",
        "--set", "tune.num_samples=2",
        "--set", "tune.grace_period=1",
        "--set", "mlflow.experiment=share-nothing",
        "--set", "tune.register_as=digits-s3-384",
        env=env, cwd=client_dir,
    )  # fmt: skip
    assert tune.returncode == 0, tune.stdout[-4000:] + tune.stderr[-2000:]
    champion = client.get_model_version_by_alias("digits-s3-384", "champion")
    assert champion.source and s3_files("vitray-runs/runs/share-tune", storage["env"])

    # nothing of either run on a local disk: neither the client's directory nor any node's
    # working directory or TMPDIR holds run output
    dirs = [client_dir, *(f"{t}/{sub}" for t in cluster["temp_dirs"] for sub in ("work", "tmp"))]
    written = [
        p for d in dirs for p in Path(d).rglob("*") if p.name.startswith(("checkpoint_", "runs"))
    ]
    assert not written, written
    assert not (ROOT / "runs" / "share").exists()
