"""`vitray cluster local up|down`: a multi-node Ray cluster and an MLflow server on this
machine, all on 127.0.0.1, to try the cluster path (`vitray submit`) before a real one.

Each Ray node is a `ray start --block` process in its own session, and so is MLflow:
stopping a session stops everything its process started. `up` records each process in a
state file the moment it starts, so that `down` stops exactly those, by their ids, even
after an interrupted `up`; `down` signals a process only while it is still the one `up`
started (same start time and command line), never one that has since been given its pid.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from jobs.cluster.raynode import node_env

DEFAULT_STATE = Path(".vitray") / "cluster"
MLFLOW_ADMIN = "admin"  # the user MLflow's basic-auth app creates at its first start
# MLflow 3's server also starts a job runner and seven task consumers for its GenAI jobs
# (scorers, prompt optimisation) unless told not to: 8 more processes, ~2 GB resident and
# ~18 s of CPU at every start on 2 cores, for jobs a ViT's runs never submit.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    """The executable of this environment (the venv), whatever PATH says."""
    return str(Path(sys.executable).parent / name)


def state_path(state_dir: Path) -> Path:
    return state_dir / "state.json"


def save_state(state_dir: Path, state: dict[str, Any]) -> None:
    """Replace the state file in one step (temp + rename): an `up` killed mid-write leaves
    the previous complete file, never a truncated one."""
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_path(state_dir))


def identity(pid: int) -> dict[str, Any]:
    """What tells this process from a later one given the same pid. A process that has just
    been started reads an empty command line for a moment, and then, until its exec
    completes, ours (it is a fork of this process): recorded then, `down` took the process
    for another one later and left it running."""
    proc, own = psutil.Process(pid), psutil.Process().cmdline()
    deadline = time.monotonic() + 30
    while (cmdline := proc.cmdline()) in ([], own) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"pid": pid, "create_time": proc.create_time(), "cmdline": cmdline}


def still_ours(recorded: dict[str, Any]) -> bool:
    """The process `up` started, running or exited. An exited one's session is still
    ours: its id is not reused while a process of the session lives."""
    try:
        proc = psutil.Process(recorded["pid"])
        if proc.create_time() != recorded["create_time"]:
            return False
        return proc.status() == psutil.STATUS_ZOMBIE or proc.cmdline() == recorded["cmdline"]
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then act on them as usual: a
    process must not start without its pid reaching the state file. The children started
    here get the default handlers back when they exec."""
    received: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda s, _: received.append(s)) for s in kinds}
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler)
        for kind in received:
            signal.raise_signal(kind)


def spawn(
    state_dir: Path,
    state: dict[str, Any],
    name: str,
    command: list[str],
    env: dict[str, str],
    cwd: str | None = None,
) -> None:
    """Start `command` in its own session, logging to NAME.log, and record it in the state
    file before anything else happens."""
    with open(state_dir / f"{name}.log", "ab") as out, signals_deferred():
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        state["processes"].append({"name": name, **identity(proc.pid)})
        save_state(state_dir, state)


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


def write_secret(path: Path, value: str) -> None:
    """`value` in a file readable by its owner only from its creation (O_EXCL: no moment
    where it exists with looser permissions, no file planted there is reused)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def write_token(state_dir: Path) -> None:
    """A new Ray token at every `up`."""
    (state_dir / "auth_token").unlink(missing_ok=True)
    write_secret(state_dir / "auth_token", secrets.token_hex(32))


def cluster_env(state_dir: Path) -> dict[str, str]:
    """The processes we start see this venv first on PATH (job entrypoints run `python`)
    and the cluster's token."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_DISABLE_USAGE_STATS": "1", **auth_env(state_dir)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # an inherited token must not override the cluster's
    return env


def wait_nodes(dashboard: str, count: int, env: dict[str, str], seconds: float = 120) -> None:
    """Until `count` Ray nodes are alive (asked through `ray list nodes` of the dashboard:
    Ray would rewrite the head's 127.0.0.1 address to the machine's)."""
    deadline = time.monotonic() + seconds
    alive = 0
    while time.monotonic() < deadline:
        out = subprocess.run(
            [bin_path("ray"), "list", "nodes", "--address", dashboard, "--format", "json"],
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


def mlflow_password_path(state_dir: Path) -> Path:
    return state_dir.resolve() / "mlflow_password"


def mlflow_auth_env(state_dir: Path) -> dict[str, str]:
    """MLflow's basic-auth app, its users kept in the state directory. The admin password is
    made once and kept (owner-only) beside them: MLflow reads it only when it creates the
    admin user, at the first start against an empty user store."""
    password = mlflow_password_path(state_dir)
    if not password.exists():
        write_secret(password, secrets.token_urlsafe(24))
    config = state_dir.resolve() / "mlflow_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{state_dir.resolve()}/mlflow_auth.db\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password.read_text(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),  # its CSRF key, per start
    }


def mlflow_server(state_dir: Path, port: int, auth: bool) -> list[str]:
    """MLflow on 127.0.0.1; MLflow compares a request's Host header with --allowed-hosts
    exactly, so they are the two names a client here sends, with the port."""
    root = state_dir.resolve()
    return [
        bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "mlartifacts"),
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
        "--workers", "1", *(["--app-name", "basic-auth"] if auth else []),
    ]  # fmt: skip


def start_mlflow(state_dir: Path, state: dict[str, Any], env: dict[str, str], auth: bool) -> None:
    port = free_port()
    env = {**env, **MLFLOW_SERVER_ENV, **(mlflow_auth_env(state_dir) if auth else {})}
    state["mlflow"] = f"http://127.0.0.1:{port}"
    if auth:
        state["mlflow_user"] = MLFLOW_ADMIN
        state["mlflow_password_file"] = str(mlflow_password_path(state_dir))
    spawn(state_dir, state, "mlflow", mlflow_server(state_dir, port, auth), env)
    wait_http(f"{state['mlflow']}/health", 120, "the MLflow server")


def loopback_env(env: dict[str, str]) -> dict[str, str]:
    """Ray replaces 127.0.0.1 by the machine's address wherever it reads one (a node's, the
    head's), so that other machines reach the node; its servers then listen on every
    interface. Unless Ray believes it runs single-node (its switch for macOS and Windows):
    then the head's address stays 127.0.0.1 and each of its servers binds there. For the
    head only: a worker node refuses the switch."""
    return {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def worker_address(gcs: int) -> str:
    """The head as a worker node reaches it: 127.1 is 127.0.0.1 to the system's resolver
    (gRPC's native one, which the node is told to use) but not to Ray's rewrite, and the
    node takes its own address (127.0.0.1, where its servers then bind) from the route."""
    return f"127.1:{gcs}"


def start_ray(
    state_dir: Path, state: dict[str, Any], env: dict[str, str], workers: int, cpus: int
) -> None:
    gcs, dashboard = free_port(), free_port()
    state.update(ray_address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dashboard}")

    # Each node's dashboard agent on a port of its own: on Ray's fixed default (52365), held
    # by any other Ray on the machine, the head's agent failed and no job could be submitted.
    def common() -> list[str]:
        return [
            "--num-cpus",
            str(cpus),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--block",
        ]

    head = [
        bin_path("ray"), "start", "--head", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--include-dashboard", "true", *common(),
    ]  # fmt: skip
    temp = node_dir(state_dir, state)
    head_env = {**loopback_env(env), "TMPDIR": f"{temp}/tmp"}
    spawn(state_dir, state, "head", [*head, "--temp-dir", temp], head_env, cwd=f"{temp}/work")
    wait_http(f"{state['dashboard']}/api/version", 120, "the Ray dashboard")
    for i in range(workers):
        temp = node_dir(state_dir, state)
        node = [bin_path("ray"), "start", "--address", worker_address(gcs), "--temp-dir", temp]
        worker_env = {**env, "GRPC_DNS_RESOLVER": "native", "TMPDIR": f"{temp}/tmp"}
        spawn(state_dir, state, f"worker-{i}", [*node, *common()], worker_env, cwd=f"{temp}/work")
    wait_nodes(state["dashboard"], 1 + workers, env)


def node_dir(state_dir: Path, state: dict[str, Any]) -> str:
    """A node's own disk, as on separate machines: its Ray temp dir, TMPDIR (tmp/) and
    working directory (work/), shared with no other node. Sharing /tmp/ray, one node's
    runtime-env agent re-extracted a job's working_dir from under another's driver; sharing
    a working directory, a relative path worked here and failed on a real cluster. Short,
    because Unix socket paths are limited to 107 bytes."""
    temp = tempfile.mkdtemp(prefix="vitray-node-")
    state["temp_dirs"].append(temp)
    save_state(state_dir, state)
    for sub in ("tmp", "work"):
        os.mkdir(f"{temp}/{sub}")
    return temp


def up(
    state_dir: Path, workers: int, cpus: int, mlflow: bool = True, mlflow_auth: bool = False
) -> dict[str, Any]:
    if state_path(state_dir).exists():
        raise ValueError(
            f"a local cluster is already up ({state_path(state_dir)}); run `down` first"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # its secrets and logs are the owner's only
    write_token(state_dir)
    env = {**cluster_env(state_dir), **node_env(cpus)}
    state: dict[str, Any] = {"processes": [], "temp_dirs": [], "logs": str(state_dir)}
    save_state(state_dir, state)
    try:
        start_ray(state_dir, state, env, workers, cpus)
        if mlflow:
            start_mlflow(state_dir, state, env, mlflow_auth)
    except BaseException:
        stop(state_dir, state)
        raise
    return state


def in_sessions(sessions: set[int]) -> list[int]:
    """The running processes of these sessions. Each process `up` starts leads a session of
    its own, and the processes it starts stay in it (Ray's workers in groups of their own):
    a session id, like a pid, is not reused while a process of the session lives."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) in sessions:
                found.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def wait_gone(sessions: set[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while in_sessions(sessions) and time.monotonic() < deadline:
        time.sleep(0.2)


def stop_pids(pids: list[int], patient: set[int], seconds: float = 3) -> list[int]:
    """SIGTERM each process `up` started (as a group), then SIGKILL whatever is left in
    their sessions; returns survivors. Ray nodes have nothing to save (a head under `ray
    start --block` takes ~35 s to stop its services one by one): they get `seconds`, or as
    long as the `patient` ones take (MLflow, closing its store: 1.3 s measured), up to 10 s."""
    for pid in reversed(pids):  # workers and MLflow before the head
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    started = time.monotonic()
    wait_gone(patient, 10)
    wait_gone(set(pids), seconds - (time.monotonic() - started))
    for pid in in_sessions(set(pids)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(set(pids), 10)  # a killed process is gone once its parent has reaped it
    return in_sessions(set(pids))


def stop(state_dir: Path, state: dict[str, Any]) -> None:
    """Stop what `state` records; the state file goes only when all of it is gone."""
    mine = [p["pid"] for p in state["processes"] if still_ours(p)]
    for other in (p for p in state["processes"] if p["pid"] not in mine):
        print(
            f"not stopping pid {other['pid']}: it is no longer the {other['name']} process "
            "`up` started (another process has its id)"
        )
    mlflow = {p["pid"] for p in state["processes"] if p["name"] == "mlflow"} & set(mine)
    survivors = stop_pids(mine, patient=mlflow)
    if survivors:
        raise RuntimeError(f"processes still alive after down: {survivors}")
    for path in state["temp_dirs"]:
        shutil.rmtree(path, ignore_errors=True)
    state_path(state_dir).unlink()
    print(f"stopped {len(mine)} process group(s) started by `up`")


def down(state_dir: Path) -> None:
    if not state_path(state_dir).exists():
        raise ValueError(f"no local cluster recorded in {state_path(state_dir)}")
    stop(state_dir, json.loads(state_path(state_dir).read_text()))
