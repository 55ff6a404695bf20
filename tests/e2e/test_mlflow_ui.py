"""What a person sees in the MLflow UI after a search, in a real headless Chromium: the
experiment's runs and dataset, a run's metrics, the registered model and its alias.
Slow: marked, still run in CI (.ci/run installs Debian's chromium when it is missing)."""

import html
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from jobs.cluster.local import MLFLOW_SERVER_ENV
from jobs.config import load_config

from helpers import free_port, search_config, stop_group, tracked_search, wait_healthy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def ui(ray_local, digits_dir, tmp_path_factory):
    """A 2-trial search logged to its own SQLite store, then `mlflow ui` serving that store
    on 127.0.0.1; stopped by its process group at the end."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp}/mlflow.db"
    # the experiment first, so its artifacts go under tmp, not the working directory
    MlflowClient(uri).create_experiment("vitray-ui", artifact_location=str(tmp / "artifacts"))
    path = search_config(tmp, digits_dir / "digits", uri, "browse", epochs=2, register_as="dv")
    tree = path.read_text().replace("vitray-tune-test", "vitray-ui")
    path.write_text(tree)
    outcome = tracked_search(load_config(path))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, **MLFLOW_SERVER_ENV}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield SimpleNamespace(base=base, uri=uri, outcome=outcome, tmp=tmp)
    finally:
        stop_group(server)


def rendered_text(url: str, profile) -> str:
    """The page's text after its scripts ran, as headless Chromium renders it."""
    browser = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
         "--dump-dom", url],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert browser.stdout, f"chromium rendered nothing: {browser.stderr[-3000:]}"
    dom = browser.stdout
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_experiment_page_lists_the_runs_and_their_dataset(ui):
    from mlflow import MlflowClient

    experiment = MlflowClient(ui.uri).get_experiment_by_name("vitray-ui")
    text = rendered_text(
        f"{ui.base}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning",
        ui.tmp / "chrome-experiment",
    )
    assert "Model training" in text and "vitray-ui" in text
    assert "browse" in text  # the search's parent run
    assert "digits" in text  # the dataset column


def test_run_page_shows_metrics_dataset_and_description(ui):
    from mlflow import MlflowClient

    run = MlflowClient(ui.uri).get_run(ui.outcome.best_run_id)
    text = rendered_text(
        f"{ui.base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        "?workflowType=machine_learning",
        ui.tmp / "chrome-run",
    )
    assert run.info.run_name in text
    assert "val_top1" in text and "test_top1" in text
    assert "digits" in text
    assert "Trial" in text  # its description


def test_registered_model_page_shows_the_champion_alias(ui):
    text = rendered_text(f"{ui.base}/#/models/dv", ui.tmp / "chrome-model")
    assert "dv" in text and "champion" in text
    assert f"Version {ui.outcome.registered.version}" in text
