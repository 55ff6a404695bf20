"""MLflow behind the training drivers' `Tracker` interface (jobs/training/tracker.py).

Commands build one `MlflowTracker(cfg.mlflow)` and hand it to `fit` or `search`; with
`mlflow.enabled: false` it opens no run and logs nothing, but still resolves checkpoint
references (`runs:/...`, `models:/...`) against the configured store.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from jobs.config import JobConfig, MlflowSection, shown
from jobs.secrets import redact
from jobs.tracking import runs, search_report
from jobs.tracking.checkpoints import fetch_checkpoint
from jobs.tracking.figures import log_figures
from jobs.tracking.metrics import MlflowMetrics, retrying
from jobs.tracking.model import log_vit_model, register_vit_model

if TYPE_CHECKING:
    from jobs.training.search.outcome import SearchOutcome
    from jobs.training.start import Start

INIT_ARTIFACT = "init_checkpoint"


def best_checkpoint(kept: list[tuple[Any, dict]], by_score: bool) -> tuple[Any, dict] | None:
    """The (checkpoint, metrics) logged as best and registered: the highest val_top1, or
    the last one when not `by_score`. With data.val_subset every evaluation but the last
    scores a sample of val: a lucky sample must not beat the whole split."""
    if not kept:
        return None
    if by_score:
        return max(kept, key=lambda cm: (cm[1].get("val_top1", 0), cm[1].get("step", 0)))
    return max(kept, key=lambda cm: cm[1].get("step", 0))


class MlflowTracker:
    def __init__(self, section: MlflowSection) -> None:
        self.uri = runs.tracking_uri(section)
        self.enabled = section.enabled

    def check(self) -> None:
        if self.enabled:
            runs.check_reachable(self.uri)

    def fetch_checkpoint(self, ref: str, workdir: str) -> Path:
        return fetch_checkpoint(ref, self.uri, workdir)

    def open_run(
        self, cfg: JobConfig, run_dir: str, kind: str, split_rows: dict[str, int]
    ) -> str | None:
        if not self.enabled:
            return None
        return runs.open_run(cfg, self.uri, run_dir, kind, split_rows)

    def open_trial_run(
        self, cfg: JobConfig, parent_id: str, trial_name: str, split_rows: dict[str, int]
    ) -> str:
        return runs.open_trial_run(cfg, self.uri, parent_id, trial_name, split_rows)

    def metrics(self, run_id: str | None) -> MlflowMetrics | None:
        return MlflowMetrics(self.uri, run_id) if run_id else None

    @contextlib.contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        """System metrics of this node while training; the run marked FAILED if training
        raises, FINISHED after the outcome is logged (retried through an outage: MLflow's
        own end of the run then marks it once more, quickly)."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        client = mlflow.MlflowClient(self.uri)
        with mlflow.start_run(run_id=run_id, log_system_metrics=True):
            yield
            retrying("marking the run FINISHED", lambda: client.set_terminated(run_id))

    def log_start(self, start: Start, run_id: str) -> None:
        """The resized checkpoint as its own artifact, once per run (not again on resume)."""
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        if client.get_run(run_id).data.tags.get("vitray.init.source"):
            return
        client.log_artifacts(run_id, str(start.directory), INIT_ARTIFACT)
        for key, value in start.tags.items():
            client.set_tag(run_id, key, value)

    def log_outcome(self, cfg: JobConfig, result: Any, run_id: str, start: Start | None) -> None:
        """The resolved config, the final and the best checkpoints, and the figures of the
        best (a fine-tune's posemb similarity before and after the resize); the best
        registered as mlflow.register_as@mlflow.alias when that is set."""
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        config = yaml.safe_dump(shown(cfg), sort_keys=False)
        retrying("logging config.yaml", lambda: client.log_text(run_id, config, "config.yaml"))
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                retrying(
                    "logging checkpoint/final",
                    lambda: client.log_artifacts(run_id, d, "checkpoint/final"),
                )
        best = best_checkpoint(result.best_checkpoints, by_score=not cfg.data.val_subset)
        if best:
            checkpoint, metrics = best
            with checkpoint.as_directory() as d:
                retrying(
                    "logging checkpoint/best",
                    lambda: client.log_artifacts(run_id, d, "checkpoint/best"),
                )
                # the best checkpoint, ready for the registry
                model_uri = retrying("logging the model", lambda: log_vit_model(d))
                with tempfile.TemporaryDirectory() as out:
                    before = start.before if start else None
                    retrying(
                        "logging the figures",
                        lambda: log_figures(
                            d, cfg.data, run_id, self.uri, Path(out), before=before
                        ),
                    )
            top1 = f"{metrics.get('val_top1', 0):.4f}"
            retrying("tagging best_val_top1", lambda: client.set_tag(run_id, "best_val_top1", top1))
            if cfg.mlflow.register_as:
                about = f"Best checkpoint of {cfg.run.name} (run {run_id}): val_top1 {top1}."
                tags = {"best_val_top1": top1, "source_run": run_id}
                name, alias = cfg.mlflow.register_as, cfg.mlflow.alias
                retrying(
                    f"registering {name}",
                    lambda: register_vit_model(model_uri, name, alias, self.uri, about, tags),
                )
        elif cfg.mlflow.register_as:
            raise RuntimeError(
                f"mlflow.register_as {cfg.mlflow.register_as}: the run reported no checkpoint "
                "to register"
            )

    def fail_search(self, parent_id: str, reason: str) -> None:
        """Why, at the top of the run's description, above the command that resumes it."""
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        about = f"**Failed:** {redact(reason)}\n\n`{runs.command_line()}`"
        client.set_tag(parent_id, runs.DESCRIPTION_TAG, about)
        client.set_terminated(parent_id, "FAILED")

    def log_search(self, outcome: SearchOutcome, test_scores: dict[str, float]) -> Any:
        return search_report.log_search(outcome, test_scores, self.uri)
