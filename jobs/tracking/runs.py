"""MLflow on the driver: where to log, a reachability check, and one run per `run.name`."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from jobs.config import JobConfig, MlflowSection, flatten

RUN_DIR_TAG = "vitray.run_dir"


def tracking_uri(section: MlflowSection) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else the embedded store ./mlflow.db."""
    uri = section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail at start, not after an hour of training, when the server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise ConnectionError(f"status {r.status}")
    except Exception as e:
        raise ConnectionError(f"MLflow tracking server {uri} is not reachable: {e}") from e


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cluster_tags() -> dict[str, str]:
    """Where the run ran: Ray job id, node count, GPUs (read on the driver)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sorted({k for n in nodes for k in n["Resources"] if k.startswith("accelerator_type:")})
    return {
        "ray.job_id": ray.get_runtime_context().get_job_id(),
        "ray.nodes": str(len(nodes)),
        "ray.gpus": str(int(sum(n["Resources"].get("GPU", 0) for n in nodes))),
        "gpu_type": ",".join(g.split(":", 1)[1] for g in gpus) or "none",
    }


def checkpointed_run_id(run_dir: str) -> str | None:
    """The MLflow run id stored in the latest local checkpoint of this run, if any."""
    import torch

    checkpoints = (
        sorted(Path(run_dir).glob("checkpoint_*/train_state.pt")) if "://" not in run_dir else []
    )
    if not checkpoints:
        return None
    state = torch.load(checkpoints[-1], weights_only=True)
    return state.get("mlflow_run_id") or None


def run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def open_run(cfg: JobConfig, uri: str, run_dir: str, kind: str) -> str:
    """The MLflow run of this `run.name`: the unfinished one it left, or a new one."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(cfg.mlflow.experiment)
    )
    run_id = checkpointed_run_id(run_dir)
    if run_id is not None and not run_exists(client, run_id):
        print(
            f"warning: the checkpoints in {run_dir} were logged to MLflow run {run_id}, which "
            f"{uri} does not have; logging to a new run",
            flush=True,
        )
        run_id = None
    if run_id is None:  # stopped before its first checkpoint: its run is still unfinished
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}' and attributes.status != 'FINISHED'",
            max_results=1,
        )
        run_id = found[0].info.run_id if found else None
    if run_id:
        client.set_terminated(run_id, "RUNNING")
        print(f"resuming MLflow run {run_id}", flush=True)
        return run_id
    tags = {
        RUN_DIR_TAG: run_dir,
        "vitray.kind": kind,
        "git_commit": git_commit(),
        **cluster_tags(),
        "mlflow.runName": cfg.run.name,
    }
    run = client.create_run(experiment_id, tags=tags, run_name=cfg.run.name)
    log_config_params(client, run.info.run_id, cfg)
    return run.info.run_id


def log_config_params(client, run_id: str, cfg: JobConfig) -> None:
    """Every config key as a param, in batches of MLflow's limit of 100."""
    import mlflow

    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(cfg.model_dump()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def open_trial_run(cfg: JobConfig, uri: str, parent_id: str, trial_name: str) -> str:
    """The trial's nested run: the one of this name under the parent when the trial runs
    again (resumed, or restarted before its first checkpoint), else a new one."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent_id).info.experiment_id
    found = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
        f"and attributes.run_name = '{trial_name}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment,
        run_name=trial_name,
        tags={"mlflow.parentRunId": parent_id, "vitray.kind": "tune-trial"},
    )
    log_config_params(client, run.info.run_id, cfg)
    return run.info.run_id


def new_run(uri: str, experiment: str, name: str, tags: dict[str, str]) -> str:
    """A new run in `experiment` (created if missing)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def log_evaluation(
    uri: str, run_id: str, metrics: dict[str, float], figures: dict[str, Any], finish: bool
) -> str:
    """Metrics and matplotlib figures (artifact path -> Figure, closed here) to `run_id`;
    `finish` ends the run."""
    from mlflow import MlflowClient

    from jobs.tracking import plots

    client = MlflowClient(uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for path, figure in figures.items():
        client.log_figure(run_id, figure, path)
        plots.close(figure)
    if finish:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def experiment_and_metrics(uri: str, run_id: str) -> tuple[str, dict[str, float]]:
    """A run's experiment id and latest metrics."""
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    return run.info.experiment_id, run.data.metrics
