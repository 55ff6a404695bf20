"""After a search: trial runs closed with their fate, the parent run's summary and figures,
the best checkpoint registered in the MLflow Model Registry and scored on the test split."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import yaml

from jobs.tracking import plots
from jobs.tracking.model import log_vit_model, register_vit_model
from jobs.training.search.outcome import SearchOutcome, trial_rows

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


def close_trial_runs(client: Any, rows: list[dict[str, Any]]) -> None:
    status = {"complete": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    for row in rows:
        if row["run_id"]:
            client.set_tag(row["run_id"], "vitray.tune.fate", row["fate"])
            client.set_terminated(row["run_id"], status[row["fate"]])


def register_best(
    outcome: SearchOutcome, scores: dict[str, float], uri: str
) -> ModelVersion | None:
    """The best checkpoint as an MLflow model of the best trial's run, logged with its test
    accuracy on that run (and the parent); registered and aliased, when `tune.register_as`
    names a model, and its version returned."""
    import mlflow
    from mlflow import MlflowClient

    cfg, client = outcome.config, MlflowClient(uri)
    run_id = outcome.best_run_id
    with outcome.best_checkpoint.as_directory() as d:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            client.log_artifacts(run_id, d, "checkpoint/best")
            model_uri = log_vit_model(d)
            if scores:
                mlflow.log_metrics(scores)
    if scores:
        for key, value in scores.items():
            client.log_metric(outcome.parent_run_id, key, value)
    if not cfg.tune.register_as:
        return None
    scored = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.endswith(("top1", "top5")))
    description = (
        f"The search's pick ({cfg.tune.select}): {cfg.tune.metric} {outcome.best_metric:.4f}"
        + (f", {scored}" if scored else "")
        + f". Source run {run_id}, trial of search run {outcome.parent_run_id}."
    )
    tags = {f"best_{cfg.tune.metric}": f"{outcome.best_metric:.4f}", "source_run": run_id}
    version = register_vit_model(
        model_uri, cfg.tune.register_as, cfg.tune.alias, uri, description, tags
    )
    client.set_tag(outcome.parent_run_id, "registered_model", f"{version.name}/{version.version}")
    return version


def log_search(outcome: SearchOutcome, scores: dict[str, float], uri: str) -> ModelVersion | None:
    """Everything the parent run shows for the search, then the registration; the
    registered version, if any."""
    from mlflow import MlflowClient

    cfg, parent = outcome.config, outcome.parent_run_id
    client = MlflowClient(uri)
    metric = cfg.tune.metric
    rows = trial_rows(outcome)
    close_trial_runs(client, rows)
    client.log_text(parent, yaml.safe_dump(cfg.tune.model_dump(mode="json")), "search.yaml")
    table = [{k: v for k, v in row.items() if k != "curve"} for row in rows]
    client.log_text(parent, json.dumps(table, indent=2, default=str), "trials.json")
    curves = plots.trial_curves({row["trial"]: row["curve"] for row in rows}, metric)
    client.log_figure(parent, curves, "trial_curves.png")
    plots.close(curves)
    scatter = plots.params_vs_metric(rows, list(cfg.tune.space), metric)
    client.log_figure(parent, scatter, "params_vs_metric.png")
    plots.close(scatter)
    client.log_metric(parent, f"best_{metric}", outcome.best_metric)
    client.log_metric(parent, "trials", len(rows))
    client.log_metric(parent, "trials_stopped_early", sum(r["fate"] == "stopped" for r in rows))
    client.set_tag(parent, "best_run_id", outcome.best_run_id or "")
    if outcome.stopped_because:
        client.set_tag(parent, "vitray.tune.stopped_because", outcome.stopped_because)
    registered = register_best(outcome, scores, uri) if outcome.best_run_id else None
    client.set_terminated(parent, "FINISHED")
    return registered
