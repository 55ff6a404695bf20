"""No secret in any output: `vitray pretrain` run as a user runs it, with the password of an
authenticating MLflow server in its tracking URI, and every output of that run searched for
the password. Slow: marked, still run in CI."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import CONFIGS

from helpers import files_holding

pytestmark = pytest.mark.slow


def pretrain(uri: str, digits: Path, tmp: Path) -> subprocess.CompletedProcess:
    """`vitray pretrain` of 10 steps in a fresh process that starts its own local Ray; the
    credentials reach it only in `uri`."""
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):  # fmt: skip
        env.pop(key, None)
    return subprocess.run(
        [
            sys.executable, "-m", "jobs.cli", "pretrain",
            "--config", str(CONFIGS / "demo-pretrain.yaml"),
            "--set", f"data.dataset={digits}",
            "--set", "train.max_steps=10",
            "--set", "scaling.num_workers=1",
            "--set", "scaling.cpus_per_worker=1",
            "--set", "data.cpus_per_task=0.25",
            "--set", f"run.storage_path={tmp / 'runs'}",
            "--set", f"mlflow.tracking_uri={uri}",
            "--set", "mlflow.experiment=vitray-secrets-test",
        ],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def mlflow_texts_holding(secret: str, client, run_id: str) -> list[str]:
    """What the run's MLflow records show (params, tags, metric keys, its experiment's tags,
    its logged models' params and tags), as `where: text`, keeping those holding `secret`."""
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    texts = [
        *(f"param {k}={v}" for k, v in run.data.params.items()),
        *(f"tag {k}={v}" for k, v in run.data.tags.items()),
        *(f"metric {k}" for k in run.data.metrics),
        *(f"experiment tag {k}={v}" for k, v in experiment.tags.items()),
        f"run info {run.info}",
        *(f"model {m.model_id} {m.params} {m.tags} {m.source_run_id}" for m in models),
    ]
    return [t for t in texts if secret in t]


def downloaded(client, run_id: str, uri: str, dst: Path) -> Path:
    """Every artifact of the run and of its logged models (MLmodel, requirements, the
    checkpoints' config.json, config.yaml, figures), downloaded through the client."""
    import mlflow

    client.download_artifacts(run_id, "", str(dst / "run"))
    experiment_id = client.get_run(run_id).info.experiment_id
    for model in client.search_logged_models(experiment_ids=[experiment_id]):
        mlflow.artifacts.download_artifacts(
            artifact_uri=model.artifact_location,
            dst_path=str(dst / model.model_id),
            tracking_uri=uri,
        )
    return dst


def test_a_password_in_the_tracking_uri_reaches_no_output(
    mlflow_with_auth, digits_dir, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    state_dir, state = mlflow_with_auth
    password = Path(state["mlflow_password_file"]).read_text()
    server = state["mlflow"]  # http://127.0.0.1:PORT
    with_password = server.replace("://", f"://{state['mlflow_user']}:{password}@")
    redacted = with_password.replace(password, "***")  # how outputs may name the server
    run = pretrain(with_password, digits_dir / "digits", tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "step 10/10" in run.stdout
    printed = [line for line in (run.stdout + run.stderr).splitlines() if password in line]

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", state["mlflow_user"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("vitray-secrets-test")
    (logged,) = client.search_runs([experiment.experiment_id])
    run_id = logged.info.run_id
    assert logged.data.params["mlflow.tracking_uri"] == redacted
    artifacts = downloaded(client, run_id, server, tmp_path / "artifacts")
    assert {"config.yaml", "MLmodel", "requirements.txt"} <= {p.name for p in artifacts.rglob("*")}
    runs = tmp_path / "runs"
    assert {"vitray-run.json", "config.json", "train_state.pt"} <= {p.name for p in runs.rglob("*")}
    leaks = [
        *printed,
        *mlflow_texts_holding(password, client, run_id),
        *files_holding(password, artifacts),
        *files_holding(password, runs),
    ]
    assert leaks == []

    wrong = secrets.token_hex(12)
    refused = pretrain(with_password.replace(password, wrong), digits_dir / "digits", tmp_path)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert f"{redacted} refused the credentials" in said, said
    assert wrong not in said and password not in said
