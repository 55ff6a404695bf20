"""The cluster path, live: `vitray cluster local up` (a Ray head + 1 worker node + an MLflow
server with authentication, all on 127.0.0.1, token auth on), refusing clients without the
token or the password, `vitray submit` of a 2-worker pretrain spread over both nodes,
`vitray cluster check` submitted to both nodes,
`vitray jobs`, a failing job, `down` leaving no process behind, and `down` after an
interrupted `up`. Slow: marked, still run in CI."""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from jobs.config import CONFIGS

from helpers import ROOT, files_holding, mlflow_job_runners

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
            "--address", cluster["dashboard"], "--format", "json",
            "--filter", "class_name=RayTrainWorker",
        ],
        capture_output=True, text=True, env={**os.environ, **cluster["env"]}, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return {actor["node_id"] for actor in json.loads(out.stdout[out.stdout.index("[") :])}


def cluster_processes(state: dict) -> list[int]:
    """Every process of the cluster `state` records: in the session of a process `up`
    started, or naming the cluster's GCS port."""
    sessions = {p["pid"] for p in state["processes"]}
    gcs_port = state["ray_address"].split(":")[1]
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            command = " ".join(proc.info["cmdline"] or [])
            ours = os.getsid(proc.pid) in sessions or gcs_port in command
            if ours and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def assert_down_stops_everything(state_dir: Path, state: dict) -> None:
    down = vitray("cluster", "local", "down", "--state", str(state_dir), timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (state_dir / "state.json").exists()
    assert not cluster_processes(state), "processes of the cluster still running after down"


def test_down_after_an_interrupted_up_stops_what_it_had_started(tmp_path):
    """`up` killed (SIGKILL: nothing of its own cleanup runs) once it has started the head
    node, before the rest: the state file it leaves is enough for `down`."""
    state_dir = tmp_path / "cluster"
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    command = [sys.executable, "-m", "jobs.cli", "cluster", "local", "up", "--workers", "1"]
    up = subprocess.Popen(
        [*command, "--cpus", "1", "--state", str(state_dir)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        state: dict = {"processes": []}
        while not state["processes"] and time.monotonic() < deadline and up.poll() is None:
            time.sleep(0.2)
            if (state_dir / "state.json").exists():
                state = json.loads((state_dir / "state.json").read_text())
    finally:
        up.kill()
        up.wait()
    assert state["processes"], "up recorded no process"
    assert psutil.pid_exists(state["processes"][0]["pid"])  # the head outlived `up`
    assert_down_stops_everything(state_dir, state)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    up = vitray(
        "cluster", "local", "up", "--workers", "1", "--cpus", "2", "--mlflow-auth",
        "--state", str(state_dir),
    )  # fmt: skip
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    state = json.loads((state_dir / "state.json").read_text())
    password = Path(state["mlflow_password_file"]).read_text()
    assert password not in up.stdout + up.stderr
    # clients use the cluster's token (token auth on) and MLflow's admin, as `up` prints
    state["env"] = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state_dir / "auth_token")}
    state["mlflow_env"] = {
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": password,
    }
    try:
        yield state
    finally:
        assert_down_stops_everything(state_dir, state)


def http_status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def listening(pids: list[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of `pids` and their
    descendants."""
    found = []
    for pid in pids:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
            except psutil.NoSuchProcess:  # an idle worker Ray just let go
                pass
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_up_refuses_clients_without_the_token_and_listens_on_localhost_only(local_cluster):
    jobs = f"{local_cluster['dashboard']}/api/jobs/"
    assert http_status(jobs, {}) in (401, 403)
    assert http_status(jobs, {"Authorization": "Bearer wrong"}) in (401, 403)
    token = Path(local_cluster["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert http_status(jobs, {"Authorization": f"Bearer {token}"}) == 200
    experiments = f"{local_cluster['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(experiments, {}) == 401  # MLflow's basic-auth app
    (mlflow,) = [p["pid"] for p in local_cluster["processes"] if p["name"] == "mlflow"]
    assert mlflow_job_runners(mlflow) == []  # no idle GenAI job runner beside it

    sockets = listening([p["pid"] for p in local_cluster["processes"]])
    ports = {port for _, _, port in sockets}
    assert int(local_cluster["ray_address"].split(":")[1]) in ports  # the GCS, found
    assert int(local_cluster["dashboard"].rsplit(":", 1)[1]) in ports
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


def test_submit_pretrain_spread_over_two_nodes_logs_to_mlflow(
    local_cluster, digits_dir, tmp_path, monkeypatch
):
    """Submitted from the user's own directory, with the user's own config file; the job
    logs to MLflow with the password in its tracking URI and in MLflow's variables, which
    neither the console, nor any file of any node's Ray session (its logs, its workers'
    output, the runtime-env agent's log, the job's unpacked directory) but the job's own
    credentials file, nor the job's record in Ray's dashboard show."""
    from mlflow import MlflowClient

    password = local_cluster["mlflow_env"]["MLFLOW_TRACKING_PASSWORD"]
    with_password = local_cluster["mlflow"].replace("://", f"://admin:{password}@")
    shutil.copy(CONFIGS / "demo-pretrain.yaml", tmp_path / "my.yaml")
    run = vitray(
        "submit", "--address", local_cluster["dashboard"], "--",
        "pretrain", "--config", "my.yaml",
        "--set", f"data.dataset={digits_dir / 'digits'}",
        "--set", "train.max_steps=10",
        "--set", "scaling.placement_strategy=SPREAD",
        "--set", "data.cpus_per_task=0.25",
        "--set", f"run.storage_path={tmp_path / 'runs'}",
        "--set", f"mlflow.tracking_uri={with_password}",
        "--set", "mlflow.experiment=cluster-test",
        cwd=tmp_path,
        **local_cluster["env"],
        **local_cluster["mlflow_env"],  # MLFLOW_TRACKING_USERNAME and _PASSWORD
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert password not in run.stdout + run.stderr
    sessions = [Path(temp) / "session_latest" for temp in local_cluster["temp_dirs"]]
    assert all((session / "logs" / "runtime_env_agent.log").is_file() for session in sessions)
    holding = [f for session in sessions for f in files_holding(password, session)]
    assert [f for f in holding if Path(f).name != "credentials.json"] == []
    job_id = run.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    token = Path(local_cluster["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    record = urllib.request.Request(
        f"{local_cluster['dashboard']}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(record, timeout=60) as answer:
        assert password not in answer.read().decode()  # `ray job list`, the dashboard
    assert "SUCCEEDED" in run.stdout and run.stdout.count("step 10/10") == 1  # printed once
    assert "Reporting training result" not in run.stdout  # Ray Train's per-report INFO lines
    assert "Execution plan of Dataset" not in run.stdout  # Ray Data's lines per epoch
    assert "execution finished" not in run.stdout
    (last,) = [line for line in run.stdout.splitlines() if "step 10/10" in line]
    assert last.startswith("step 10/10")  # printed by the driver: no Ray actor prefix
    assert "Converting a tensor with requires_grad" not in run.stdout  # torch, per worker
    assert len(train_worker_nodes(local_cluster)) == 2  # one Train worker on each node

    for key, value in local_cluster["mlflow_env"].items():
        monkeypatch.setenv(key, value)
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


def test_cluster_check_times_an_all_reduce_over_both_nodes_and_their_link(local_cluster):
    """`vitray cluster check` without GPUs, submitted as a job: one gloo worker per node."""
    run = vitray(
        "submit", "--address", local_cluster["dashboard"], "--",
        "cluster", "check", "--size-mib", "4", "--iterations", "3", "--cpus-per-worker", "0.5",
        **local_cluster["env"],
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "over 2 worker(s) (gloo" in run.stdout and "2 ranks on 2 node(s)" in run.stdout
    overall = re.search(r"all ranks: ([\d.]+) GB/s", run.stdout)
    link = re.search(r"node 0-1: ([\d.]+) GB/s", run.stdout)
    assert overall and link and float(overall.group(1)) > 0 and float(link.group(1)) > 0


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
