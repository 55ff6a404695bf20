"""After a search: trial runs closed with their fate, the parent run's summary and figures,
the best checkpoint registered in the MLflow Model Registry and scored on the test split."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import yaml

from jobs.tracking import plots
from jobs.tracking.model import log_vit_model, register_vit_model
from vit import read_checkpoint_meta

if TYPE_CHECKING:
    from jobs.training.search import SearchOutcome


def trial_rows(outcome: SearchOutcome) -> list[dict[str, Any]]:
    """One row per trial: its sample, best metric, epochs reached, run id, fate."""
    cfg, metric = outcome.config, outcome.config.tune.metric
    rows = []
    for result in outcome.results:
        history = result.metrics_dataframe
        records = history.to_dict("records") if history is not None else []
        points = [(r["epoch"], r[metric]) for r in records if r.get(metric) is not None]
        values = [v for _, v in points]
        best = (max if cfg.tune.mode == "max" else min)(values) if values else None
        epochs = max((e for e, _ in points), default=0.0)
        run_id = next((r.get("mlflow_run_id") for r in records if r.get("mlflow_run_id")), None)
        fate = "error" if result.error else "complete" if epochs >= cfg.train.epochs else "stopped"
        rows.append(
            {
                **{k: result.config[k] for k in cfg.tune.space},
                "trial": result.path.rsplit("/", 1)[-1],
                metric: best,
                "epochs": epochs,
                "fate": fate,
                "run_id": run_id,
                "curve": points,
            }
        )
    return rows


def close_trial_runs(client: Any, rows: list[dict[str, Any]]) -> None:
    status = {"complete": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    for row in rows:
        if row["run_id"]:
            client.set_tag(row["run_id"], "vitray.tune.fate", row["fate"])
            client.set_terminated(row["run_id"], status[row["fate"]])


def register_best(outcome: SearchOutcome, scores: dict[str, float], uri: str) -> None:
    """The best checkpoint as an MLflow model of the best trial's run, registered and
    aliased; its test accuracy logged on that run (and the parent)."""
    import mlflow
    from mlflow import MlflowClient

    cfg, client = outcome.config, MlflowClient(uri)
    run_id = outcome.best_run_id
    with outcome.best_checkpoint.as_directory() as d:
        model = read_checkpoint_meta(d)["model"]
        interpolation, crop_fraction, crop_mode = cfg.data.eval_transform
        preprocessing = {
            "image_size": list(cfg.data.size_hw),
            "channels": cfg.data.channels,
            "mean": model["mean"],
            "std": model["std"],
            "interpolation": f"{interpolation}, antialiased",
            "eval_crop_fraction": crop_fraction,
            "eval_crop_mode": crop_mode,
        }
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            client.log_artifacts(run_id, d, "checkpoint/best")
            model_uri = log_vit_model(d, preprocessing=preprocessing)
            if scores:
                mlflow.log_metrics(scores)
    if scores:
        for key, value in scores.items():
            client.log_metric(outcome.parent_run_id, key, value)
    if not cfg.tune.register_as:
        return
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
    outcome.registered = version


def log_search(outcome: SearchOutcome, scores: dict[str, float], uri: str) -> None:
    """Everything the parent run shows for the search, then the registration."""
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
    if outcome.best_run_id:
        register_best(outcome, scores, uri)
    client.set_terminated(parent, "FINISHED")
