"""MLflow on the driver: where to log, a reachability check, and one run per `run.name`."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from jobs.config import JobConfig, MlflowSection, flatten, shown
from jobs.secrets import redact
from pipeline.config import DataConfig
from pipeline.dataset import describe_dataset

RUN_DIR_TAG = "vitray.run_dir"
RUN_RECORD = "vitray-run.json"  # in the run directory: the MLflow run it logs to
DESCRIPTION_TAG = "mlflow.note.content"  # the run page's Description
# MLflow 3 opens an experiment in its GenAI view unless it is marked as model development,
# and a link opens the Model training view only with this query.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
TRAINING_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def tracking_uri(section: MlflowSection) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else the embedded store ./mlflow.db."""
    uri = section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout: float = 30.0) -> None:
    """Fail at start, not after an hour of training, when the server is down or refuses
    this client. A real API route with the client's credentials, as MLflow sends them:
    /health skips the server's Host and authentication checks."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=timeout,
            raise_on_status=False,
        )
    except Exception as e:
        raise ConnectionError(redact(f"MLflow tracking server {uri} is not reachable: {e}")) from e
    answer = f"HTTP {response.status_code}: {response.text.strip()[:200]}"
    if "Invalid Host header" in response.text:  # MLflow compares it with --allowed-hosts
        raise ConnectionError(
            redact(
                f"MLflow tracking server {uri} refused its own address ({answer}); its "
                "--allowed-hosts must list this URI's host:port exactly"
            )
        )
    if response.status_code in (401, 403):
        raise ConnectionError(
            redact(
                f"MLflow tracking server {uri} refused the credentials ({answer}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                "MLFLOW_TRACKING_TOKEN, to an account of that server"
            )
        )
    if response.status_code != 200:
        raise ConnectionError(redact(f"MLflow tracking server {uri} answered {answer}"))


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

    from jobs.training.capacity import alive_nodes, node_cards

    nodes = alive_nodes()
    return {
        "ray.job_id": ray.get_runtime_context().get_job_id(),
        "ray.nodes": str(len(nodes)),
        "ray.gpus": str(int(sum(n.get("GPU", 0) for n in nodes))),
        "gpu_type": ",".join(node_cards(nodes)) or "none",
    }


def recorded_run_id(run_dir: str) -> str | None:
    """The MLflow run that `run_dir` logs to, from its record; None before its first start.
    A record, not the newest checkpoint: a save cut short leaves a `checkpoint_*` directory
    that Ray never registered, and the last name in order need not be a usable one."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(run_dir)
    try:
        with fs.open_input_stream(f"{path}/{RUN_RECORD}") as f:
            return json.loads(f.read())["mlflow_run_id"]
    except FileNotFoundError:
        return None


def record_run(run_dir: str, run_id: str) -> None:
    """Written under a temporary name and renamed: a crash or a full disk leaves the old
    record or the new one, never half of one."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(run_dir)
    fs.create_dir(path)
    tmp = f"{path}/.{RUN_RECORD}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps({"mlflow_run_id": run_id}).encode())
    fs.move(tmp, f"{path}/{RUN_RECORD}")


def like_pattern(value: str) -> str:
    """`value` as a quoted LIKE pattern. MLflow's filter grammar has no escape for a quote
    inside a quoted value, so quotes, LIKE's wildcards and backslash (an escape in some SQL
    stores) each match any one character; callers compare the exact values."""
    return "'" + "".join("_" if c in "'\"%_\\" else c for c in value) + "'"


def runs_tagged(
    client: Any, experiment_id: str, tags: dict[str, str], unfinished: bool = False
) -> list[Any]:
    """The runs (newest first) whose tags equal `tags` exactly, whatever quotes the values
    hold (a run name or storage path such as `it's "quoted"`)."""
    clauses = [f"tags.`{key}` LIKE {like_pattern(value)}" for key, value in tags.items()]
    if unfinished:
        clauses.append("attributes.status != 'FINISHED'")
    found = client.search_runs([experiment_id], filter_string=" and ".join(clauses))
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def open_run(cfg: JobConfig, uri: str, run_dir: str, kind: str, split_rows: dict[str, int]) -> str:
    """The MLflow run of this `run.name`: the unfinished one it left, or a new one."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = experiment_id_of(client, cfg.mlflow.experiment)
    run_id = recorded_run_id(run_dir)
    if run_id is not None and not run_exists(client, run_id):
        print(
            f"warning: {run_dir} was logged to MLflow run {run_id}, which {redact(uri)} does "
            "not have; logging to a new run",
            flush=True,
        )
        run_id = None
    if run_id is None:  # a run directory from before records were kept
        found = runs_tagged(client, experiment_id, {RUN_DIR_TAG: redact(run_dir)}, unfinished=True)
        run_id = found[0].info.run_id if found else None
    if run_id:
        client.set_terminated(run_id, "RUNNING")
        client.set_tag(run_id, DESCRIPTION_TAG, f"`{command_line()}`")  # no "Failed:" left
        record_run(run_dir, run_id)
        print(f"resuming MLflow run {run_id}", flush=True)
        return run_id
    tags = {
        RUN_DIR_TAG: redact(run_dir),  # as shown: a storage URI may carry keys
        "vitray.kind": kind,
        "git_commit": git_commit(),
        **cluster_tags(),
        "mlflow.runName": cfg.run.name,
        DESCRIPTION_TAG: f"`{command_line()}`",
    }
    run = client.create_run(experiment_id, tags=tags, run_name=cfg.run.name)
    log_config_params(client, run.info.run_id, cfg)
    log_dataset(client, run.info.run_id, cfg.data, split_rows)
    record_run(run_dir, run.info.run_id)
    print(f"MLflow run: {run_url(uri, experiment_id, run.info.run_id)}", flush=True)
    return run.info.run_id


def log_config_params(client, run_id: str, cfg: JobConfig) -> None:
    """Every config key as a param, in batches of MLflow's limit of 100."""
    import mlflow

    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(shown(cfg)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def open_trial_run(
    cfg: JobConfig, uri: str, parent_id: str, trial_name: str, split_rows: dict[str, int]
) -> str:
    """The trial's nested run: the one of this name under the parent when the trial runs
    again (resumed, or restarted before its first checkpoint), else a new one."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent_id).info.experiment_id
    found = runs_tagged(
        client, experiment, {"mlflow.parentRunId": parent_id, "mlflow.runName": trial_name}
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment,
        run_name=trial_name,
        tags={
            "mlflow.parentRunId": parent_id,
            "vitray.kind": "tune-trial",
            DESCRIPTION_TAG: f"Trial {trial_name} of the search in run {parent_id}.",
        },
    )
    log_config_params(client, run.info.run_id, cfg)
    log_dataset(client, run.info.run_id, cfg.data, split_rows)
    return run.info.run_id


def new_run(uri: str, experiment: str, name: str, tags: dict[str, str]) -> str:
    """A new run in `experiment` (created if missing), described by the command line."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    tags = {DESCRIPTION_TAG: f"`{command_line()}`", **tags}
    run = client.create_run(experiment_id_of(client, experiment), run_name=name, tags=tags)
    return run.info.run_id


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


def command_line() -> str:
    """How this process was started, as a user would type it, less the passwords of URIs
    (`--set mlflow.tracking_uri=http://user:password@host`)."""
    return redact(shlex.join(["vitray", *sys.argv[1:]]))


def experiment_id_of(client: Any, name: str) -> str:
    """The experiment `name` (created if missing), marked as model development unless it
    says otherwise."""
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    key, value = EXPERIMENT_KIND
    if found is None or key not in found.tags:
        client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def ui_base(uri: str) -> str:
    return redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def experiment_url(uri: str, experiment_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def dataset_input(data: DataConfig, split_rows: dict[str, int]) -> Any:
    """The run's images as an MLflow dataset: its name, where it lives, a digest of what is
    there (the manifest, else the file listing) and the rows of each split as its profile."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    info = describe_dataset(data)
    root = info.source.root
    location = redact(data.dataset) if "://" in data.dataset else root
    listing = json.dumps(info.source.manifest or info.source.files, sort_keys=True)
    name = data.dataset.removeprefix("builtin:") if data.dataset.startswith("builtin:") else None

    class ImageDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, int | str]:
            return {
                "num_rows": sum(split_rows.values()),
                **{f"{k}_rows": v for k, v in split_rows.items()},
                "val_from": info.val_from,  # which rows validate
            }

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    with warnings.catch_warnings():  # MLflow 3 registers its local-path source twice
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(location)
    return ImageDataset(
        source=source,
        name=name or posixpath.basename(root.rstrip("/")),
        digest=hashlib.sha256(listing.encode()).hexdigest()[:16],
    )


def log_dataset(client: Any, run_id: str, data: DataConfig, split_rows: dict[str, int]) -> None:
    from mlflow.entities import DatasetInput, InputTag

    dataset = dataset_input(data, split_rows)._to_mlflow_entity()
    context = InputTag(key="mlflow.data.context", value="training")
    client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=[context])])
