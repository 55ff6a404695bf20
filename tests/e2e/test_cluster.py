"""The cluster path, live: `vitray cluster local up` (a Ray head + 1 worker node + an MLflow
server, all on 127.0.0.1, token auth on), `vitray submit` of a 2-worker pretrain spread
over both nodes, `vitray jobs`, a failing job, and `down` leaving no process behind.
Slow: marked, still run in CI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from jobs.config import CONFIGS

from helpers import ROOT

pytestmark = pytest.mark.slow


def vitray(
    *args: str, timeout: float = 900, cwd: Path = ROOT, **env_vars: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", **env_vars}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_worker_nodes(cluster: dict) -> set[str]:
    """The nodes the job's Ray Train workers ran on, from Ray's state API."""
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"), "list", "actors",
            "--address", cluster["ray_address"], "--format", "json",
            "--filter", "class_name=RayTrainWorker",
        ],
        capture_output=True, text=True, env={**os.environ, **cluster["env"]}, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return {actor["node_id"] for actor in json.loads(out.stdout[out.stdout.index("[") :])}


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    up = vitray(
        "cluster", "local", "up", "--workers", "1", "--cpus", "2", "--state", str(state_dir)
    )
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    state = json.loads((state_dir / "state.json").read_text())
    # clients use the cluster's token (token auth on, as `up` prints)
    state["env"] = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state_dir / "auth_token")}
    try:
        yield state
    finally:
        down = vitray("cluster", "local", "down", "--state", str(state_dir), timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        left = [pid for pid in state["pids"] if psutil.pid_exists(pid)]
        assert not left, f"processes left after down: {left}"
        gcs_port = state["ray_address"].split(":")[1]
        strays = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if gcs_port in " ".join(p.info["cmdline"] or [])
        ]
        assert not strays, f"Ray processes of the cluster still running: {strays}"


def test_up_serves_ray_and_mlflow_on_localhost_only(local_cluster):
    without_token = vitray(
        "jobs",
        "list",
        "--address",
        local_cluster["dashboard"],
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH="/nonexistent",
    )
    assert without_token.returncode != 0  # token auth is on: no token, no jobs
    assert local_cluster["ray_address"].startswith("127.0.0.1:")
    assert local_cluster["dashboard"].startswith("http://127.0.0.1:")
    assert local_cluster["mlflow"].startswith("http://127.0.0.1:")


def test_submit_pretrain_spread_over_two_nodes_logs_to_mlflow(local_cluster, digits_dir, tmp_path):
    """Submitted from the user's own directory, with the user's own config file."""
    from mlflow import MlflowClient

    shutil.copy(CONFIGS / "demo-pretrain.yaml", tmp_path / "my.yaml")
    run = vitray(
        "submit", "--address", local_cluster["dashboard"], "--",
        "pretrain", "--config", "my.yaml",
        "--set", f"data.dataset={digits_dir / 'digits'}",
        "--set", "train.max_steps=10",
        "--set", "scaling.placement_strategy=SPREAD",
        "--set", "data.cpus_per_task=0.25",
        "--set", f"run.storage_path={tmp_path / 'runs'}",
        "--set", f"mlflow.tracking_uri={local_cluster['mlflow']}",
        "--set", "mlflow.experiment=cluster-test",
        cwd=tmp_path,
        **local_cluster["env"],
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "SUCCEEDED" in run.stdout and run.stdout.count("step 10/10") == 1  # printed once
    assert "Reporting training result" not in run.stdout  # Ray Train's per-report INFO lines
    assert "Execution plan of Dataset" not in run.stdout  # Ray Data's lines per epoch
    assert "execution finished" not in run.stdout
    (last,) = [line for line in run.stdout.splitlines() if "step 10/10" in line]
    assert last.startswith("step 10/10")  # printed by the driver: no Ray actor prefix
    assert "Converting a tensor with requires_grad" not in run.stdout  # torch, per worker
    assert len(train_worker_nodes(local_cluster)) == 2  # one Train worker on each node
    job_id = run.stdout.split("submitted ", 1)[1].split(":", 1)[0]

    client = MlflowClient(local_cluster["mlflow"])
    experiment = client.get_experiment_by_name("cluster-test")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.metrics["step"] == 10 and "val_top1" in mlflow_run.data.metrics
    assert mlflow_run.data.tags["ray.nodes"] == "2"
    files = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "checkpoint/final")}
    assert "checkpoint/final/model.safetensors" in files
    assert f"run {mlflow_run.info.run_id}" in run.stdout  # submit printed the MLflow run

    logs = vitray(
        "jobs", "logs", job_id, "--address", local_cluster["dashboard"], **local_cluster["env"]
    )
    assert logs.returncode == 0 and "step 10/10" in logs.stdout
    listed = vitray("jobs", "list", "--address", local_cluster["dashboard"], **local_cluster["env"])
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout


def test_a_failing_job_makes_submit_exit_nonzero_with_its_error(local_cluster):
    run = vitray(
        "submit", "--address", local_cluster["dashboard"], "--",
        "pretrain", "--config", "jobs/configs/demo-pretrain.yaml",
        "--set", "data.dataset=/nonexistent/dataset",
        **local_cluster["env"],
    )  # fmt: skip
    assert run.returncode == 1
    assert "/nonexistent/dataset" in run.stdout and "FAILED" in run.stdout


def test_a_bad_config_exits_2_before_anything_is_submitted(local_cluster):
    run = vitray(
        "submit", "--address", local_cluster["dashboard"], "--",
        "pretrain", "--config", "jobs/configs/demo-pretrain.yaml", "--set", "train.lrr=1",
        **local_cluster["env"],
    )  # fmt: skip
    assert run.returncode == 2
    assert "train.lrr" in run.stderr and "submitted" not in run.stdout
