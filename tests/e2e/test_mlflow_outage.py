"""An MLflow server stopped mid-run, and killed as the run ends, each time restarted on the
same port and store: the pretraining run (real local Ray, 2 gloo workers, digits) finishes
without a restart, and its MLflow run holds every report and the end-of-run artifacts. The
tracking URI carries a password (the server ignores it): no output, log or file holds it,
however many errors quoted the URI, and each outage is warned about once."""

import logging
import math
import secrets
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.config import CONFIGS, load_config
from jobs.secrets import MaskedStream, masked_record_factory
from jobs.tracking.metrics import DROPPED_TAG
from jobs.training.plan import make_plan

from helpers import files_holding, tracked_fit

pytestmark = pytest.mark.slow


def wait_for_checkpoints(run_dir, count: int, deadline: float) -> None:
    """Until `count` complete checkpoints are in the run directory."""
    while len(list(run_dir.glob("checkpoint_*/train_state.pt"))) < count:
        assert time.monotonic() < deadline, f"{run_dir} never held {count} checkpoints"
        time.sleep(0.2)


@pytest.fixture
def masked_as_vitray_masks(monkeypatch):
    """This process's output masked, and MLflow's run URLs unprinted, as `vitray` sets up
    its own process (jobs.cli.main), until the test ends."""
    monkeypatch.setattr(sys, "stdout", MaskedStream(sys.stdout))
    monkeypatch.setattr(sys, "stderr", MaskedStream(sys.stderr))
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    make = logging.getLogRecordFactory()
    logging.setLogRecordFactory(masked_record_factory(make))
    yield
    logging.setLogRecordFactory(make)


def test_training_outlives_mlflow_restarts(
    ray_local, digits_dir, restartable_mlflow, masked_as_vitray_masks, monkeypatch, capfd
):
    from mlflow import MlflowClient

    server, tmp = restartable_mlflow, digits_dir / "outage"
    tmp.mkdir()
    password = secrets.token_hex(12)
    with_password = server.uri.replace("://", f"://alice:{password}@")
    sets = {
        "data.dataset": digits_dir / "digits",
        "train.batch_size": 64,
        "train.warmup_steps": 5,
        "train.report_every": 5,
        "train.max_steps": 60,
        "run.name": "outage",
        "run.storage_path": tmp / "runs",
        "run.max_failures": 0,  # a worker that fails fails the run: no restart hides it
        "run.num_to_keep": 10,  # every checkpoint stays, to be counted
        "mlflow.tracking_uri": with_password,
    }
    cfg = load_config(CONFIGS / "demo-pretrain.yaml", [f"{k}={v}" for k, v in sets.items()])
    plan, _ = make_plan(cfg)
    total, per_epoch = plan.total_steps, plan.steps_per_epoch
    # the driver's requests fail at once, as the workers' nearly do: only vitray's own
    # retries carry the end of the run through the second outage
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(done=tracked_fit(cfg)))
    run.start()
    run_dir = tmp / "runs" / "outage"
    deadline = time.monotonic() + 900
    wait_for_checkpoints(run_dir, 1, deadline)  # the first epoch is over
    down = time.time() * 1000
    server.stop()
    server.start()  # training goes on meanwhile (a loaded machine takes a minute)
    up = time.time() * 1000
    wait_for_checkpoints(run_dir, math.ceil(total / per_epoch), deadline)  # the last one
    server.crash()  # the driver is about to log the outcome
    server.start()
    run.join(timeout=max(deadline - time.monotonic(), 1))

    result = outcome["done"].result
    assert result.metrics["step"] == total
    client = MlflowClient(server.uri)
    tracked = client.get_run(outcome["done"].mlflow_run_id)
    assert tracked.info.status == "FINISHED"
    history = client.get_metric_history(tracked.info.run_id, "loss")
    reported = [s for s in range(1, total + 1) if s % 5 == 0 or s % per_epoch == 0 or s == total]
    assert sorted(m.step for m in history) == reported  # every report, once
    assert any(down <= m.timestamp <= up for m in history)  # made during the outage
    assert DROPPED_TAG not in tracked.data.tags
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id, "checkpoint/final")}
    assert "checkpoint/final/model.safetensors" in artifacts
    assert client.search_logged_models([tracked.info.experiment_id])
    out, err = capfd.readouterr()
    assert err.count("; trying again for up to") == 1  # the outcome waited for MLflow, once
    assert err.count("got through after") == 1
    ray_logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    rank0 = [p for p in ray_logs.glob("worker-*") if b"is unreachable" in p.read_bytes()]
    assert rank0, "rank 0's outage warning is in no worker's log"
    assert "alice:***@" in b"".join(p.read_bytes() for p in rank0).decode(errors="ignore")
    leaks = [line for line in (out + err).splitlines() if password in line]
    assert leaks + files_holding(password, ray_logs) + files_holding(password, tmp) == []
