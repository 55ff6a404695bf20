"""`vitray cluster local up|down`: a multi-node Ray cluster and an MLflow server on this
machine, all on 127.0.0.1, to try the cluster path (`vitray submit`) before a real one.

Each Ray node is a `ray start --block` process in its own session: stopping that process
stops everything the node started. `up` records what it started in a state file; `down`
stops exactly those processes, by their ids, and checks that they are gone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from jobs.cluster.raynode import node_env

DEFAULT_STATE = Path(".vitray") / "cluster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    """The executable of this environment (the venv), whatever PATH says."""
    return str(Path(sys.executable).parent / name)


def spawn(command: list[str], log: Path, env: dict[str, str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc.pid


def wait_http(url: str, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # it answered (401 with token auth on): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {seconds:.0f} s")


def auth_env(state_dir: Path) -> dict[str, str]:
    """Token auth, explicitly on for every node and client: the cluster's own token."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(state_dir.resolve() / "auth_token"),
    }


def write_token(state_dir: Path) -> None:
    """A new token at every `up`, created readable by its owner only in one step (O_EXCL:
    no moment where it exists with looser permissions, no file planted there is reused)."""
    path = state_dir / "auth_token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def cluster_env(state_dir: Path) -> dict[str, str]:
    """The processes we start see this venv first on PATH (job entrypoints run `python`)
    and the cluster's token."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_DISABLE_USAGE_STATS": "1", **auth_env(state_dir)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # an inherited token must not override the cluster's
    return env


def wait_nodes(address: str, count: int, env: dict[str, str], seconds: float = 120) -> None:
    """Until `count` Ray nodes are alive (asked through `ray list nodes`)."""
    deadline = time.monotonic() + seconds
    alive = 0
    while time.monotonic() < deadline:
        out = subprocess.run(
            [bin_path("ray"), "list", "nodes", "--address", address, "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
        )
        start = out.stdout.find("[")  # the JSON list, after any notice Ray prints first
        if out.returncode == 0 and start >= 0:
            try:
                nodes = json.loads(out.stdout[start:])
            except json.JSONDecodeError:
                nodes = []
            alive = sum(n.get("state") == "ALIVE" for n in nodes)
            if alive >= count:
                return
        time.sleep(1)
    raise RuntimeError(f"{alive}/{count} Ray nodes alive after {seconds:.0f} s")


def up(state_dir: Path, workers: int, cpus: int, mlflow: bool = True) -> dict[str, Any]:
    state_file = state_dir / "state.json"
    if state_file.exists():
        raise ValueError(f"a local cluster is already up ({state_file}); run `down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # its token and logs are the owner's only
    write_token(state_dir)
    env = {**cluster_env(state_dir), **node_env(cpus)}
    gcs, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{gcs}"
    state: dict[str, Any] = {"pids": [], "temp_dirs": [], "logs": str(state_dir)}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--block"]
    try:
        head = [
            bin_path("ray"), "start", "--head", "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--include-dashboard", "true", *common,
        ]  # fmt: skip
        state["pids"].append(spawn(head, state_dir / "head.log", env))
        wait_http(f"http://127.0.0.1:{dashboard}/api/version", 120, "the Ray dashboard")
        for i in range(workers):
            # Nodes on one machine would share /tmp/ray, and each node's runtime-env agent
            # re-extracts a job's working_dir there, pulling it from under the job's driver.
            # A short path of its own per node (Unix socket paths are limited to 107 bytes).
            temp = tempfile.mkdtemp(prefix="vitray-node-")
            state["temp_dirs"].append(temp)
            node = [bin_path("ray"), "start", "--address", address, "--temp-dir", temp, *common]
            state["pids"].append(spawn(node, state_dir / f"worker-{i}.log", env))
        wait_nodes(address, 1 + workers, env)
        state.update(ray_address=address, dashboard=f"http://127.0.0.1:{dashboard}")
        if mlflow:
            port = free_port()
            server = [
                bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                "--backend-store-uri", f"sqlite:///{state_dir.resolve()}/mlflow.db",
                "--artifacts-destination", str(state_dir.resolve() / "mlartifacts"),
                "--workers", "1",
            ]  # fmt: skip
            state["pids"].append(spawn(server, state_dir / "mlflow.log", env))
            state["mlflow"] = f"http://127.0.0.1:{port}"
            wait_http(f"{state['mlflow']}/health", 120, "the MLflow server")
    except BaseException:
        stop_pids(state["pids"])
        remove_dirs(state["temp_dirs"])
        raise
    state_file.write_text(json.dumps(state, indent=2))
    return state


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)


def stop_pids(pids: list[int], seconds: float = 10) -> list[int]:
    """SIGTERM each process group we started, then SIGKILL what is left; returns survivors.
    MLflow and worker nodes stop in seconds; a head node under `ray start --block` takes
    ~35 s to shut its services down one by one, with nothing to save: it gets 10 s."""
    for pid in reversed(pids):  # workers and MLflow before the head
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    wait_gone(pids, seconds)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_gone(pids, 10)  # a killed process is gone once its parent has reaped it
    return [p for p in pids if alive(p)]


def remove_dirs(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def down(state_dir: Path) -> None:
    state_file = state_dir / "state.json"
    if not state_file.exists():
        raise ValueError(f"no local cluster recorded in {state_file}")
    state = json.loads(state_file.read_text())
    survivors = stop_pids(state["pids"])
    if survivors:
        raise RuntimeError(f"processes still alive after down: {survivors}")
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip().endswith(
        state["ray_address"].split(":")[1]
    ):
        current.unlink()  # `ray start` left it; ray.init() would try to join the dead cluster
    remove_dirs(state.get("temp_dirs", []))
    state_file.unlink()
    print(f"stopped {len(state['pids'])} process group(s) started by `up`")
