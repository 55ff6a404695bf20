"""A second run of the same `run.name` while the first runs: refused, naming the first, and
it writes nothing into the run directory. A real second process holds the lock."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from jobs.config import CONFIGS, load_config
from jobs.training.runlock import run_lock

from helpers import ROOT, search_config, tracked_fit, tracked_search

HOLD = "import sys, time; from jobs.training.runlock import run_lock\n" + (
    "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)"
)


def hold(run_dir) -> subprocess.Popen:
    """Another driver of the run, holding the lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", ["pretrain", "tune"])
def test_a_second_run_of_the_same_name_refuses_and_writes_nothing(tmp_path, digits_dir, command):
    sets = [
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=twice",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    if command == "tune":
        cfg = load_config(search_config(tmp_path, digits_dir / "digits", "", "twice"), sets)
    else:
        cfg = load_config(CONFIGS / "demo-pretrain.yaml", sets)
    run_dir = tmp_path / "runs" / "twice"
    first = hold(run_dir)
    try:
        expected = rf"\(pid {first.pid} on {socket.gethostname()}\) is using {run_dir}"
        with pytest.raises(RuntimeError, match=expected):
            (tracked_search if command == "tune" else tracked_fit)(cfg)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # no record, no checkpoint
        assert not (tmp_path / "mlflow.db").exists()  # no MLflow run opened
    finally:
        first.kill()  # SIGKILL: the kernel releases the lock of a process however it ends
        first.wait()
    with run_lock(str(run_dir)):  # no stale lock left behind
        pass
