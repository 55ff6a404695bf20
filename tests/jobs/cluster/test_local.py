"""The local cluster without Ray: its secrets (a fresh owner-only token at every `up`,
never another's), its MLflow server with authentication, and `down` never signalling a
process it did not start. The cluster itself: tests/e2e/test_cluster.py."""

import json
import stat
import subprocess
from pathlib import Path

import pytest

from jobs.cluster.local import cluster_env, down, identity, write_token
from jobs.tracking.runs import check_reachable


def test_every_up_writes_a_new_owner_only_token(tmp_path):
    write_token(tmp_path)
    first = (tmp_path / "auth_token").read_text()
    write_token(tmp_path)
    second = (tmp_path / "auth_token").read_text()
    assert len(second) == 64 and second != first
    assert stat.S_IMODE((tmp_path / "auth_token").stat().st_mode) == 0o600


def test_an_inherited_token_does_not_override_the_clusters(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")
    env = cluster_env(tmp_path)
    assert "RAY_AUTH_TOKEN" not in env
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path.resolve() / "auth_token")


def test_mlflow_with_auth_serves_its_admin_and_refuses_others(mlflow_with_auth, monkeypatch):
    from mlflow import MlflowClient

    state_dir, state = mlflow_with_auth
    password_file = Path(state["mlflow_password_file"])
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", state["mlflow_user"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    check_reachable(state["mlflow"])
    check_reachable(state["mlflow"].replace("127.0.0.1", "localhost"))  # --allowed-hosts
    MlflowClient(state["mlflow"]).create_experiment("with-auth")

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(ConnectionError, match="refused the credentials.*MLFLOW_TRACKING_USERNAME"):
        check_reachable(state["mlflow"])
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(ConnectionError, match="refused the credentials"):
        check_reachable(state["mlflow"])
    assert password not in (state_dir / "mlflow.log").read_text()


def test_down_never_signals_a_process_that_took_a_recorded_pid(tmp_path, capsys):
    """A pid `up` recorded now belongs to another process (here one of our own, in a
    session of its own as a node would be): `down` leaves it alone."""
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        recorded = {**identity(other.pid), "name": "head"}
        recorded["create_time"] -= 1000  # the process `up` started is older
        state = {"processes": [recorded], "temp_dirs": [], "ray_address": "127.0.0.1:1"}
        (tmp_path / "state.json").write_text(json.dumps(state))
        down(tmp_path)
        assert other.poll() is None, "down signalled a process it did not start"
        assert f"not stopping pid {other.pid}" in capsys.readouterr().out
        assert not (tmp_path / "state.json").exists()
    finally:
        other.kill()
        other.wait()


def test_a_process_is_recorded_by_the_command_it_execs_not_the_fork_before():
    """Between fork and exec a child shows its parent's command line: recorded then (a
    loaded machine makes the window long), `down` later took it for another process and
    left the cluster running."""
    import time

    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: time.sleep(0.5))
    try:
        assert identity(child.pid)["cmdline"] == ["sleep", "30"]
    finally:
        child.kill()
        child.wait()
