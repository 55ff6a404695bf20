"""What a search returns and what its tracker logs: a leaf module, so that the driver and
the tracking backend share these types without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.config import JobConfig

TRIAL_RUN_KEY = "mlflow_run_id"  # reported by every trial, so the driver can find its run


@dataclass(frozen=True)
class SearchOutcome:
    config: JobConfig
    results: Any  # ray.tune.ResultGrid
    parent_run_id: str | None
    best_run_id: str | None
    best_checkpoint: Any
    best_metric: float
    stopped_because: str | None
    registered: Any = None  # the mlflow ModelVersion the tracker registered, if any


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
        run_id = next((r.get(TRIAL_RUN_KEY) for r in records if r.get(TRIAL_RUN_KEY)), None)
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
