"""The tracking interface the training drivers are handed (MLflow's is
jobs.tracking.mlflow_tracker.MlflowTracker): training code never imports MLflow itself."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from jobs.config import JobConfig
    from jobs.training.search.outcome import SearchOutcome
    from jobs.training.start import Start


class MetricsSink(Protocol):
    """Where rank 0 sends each report's metrics; pickled to the Ray Train workers."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None:
        """After the last report: send what an outage held back (retried, for a bounded
        time)."""


class Tracker(Protocol):
    """Runs, metrics, artifacts and checkpoint references of one tracking backend."""

    def check(self) -> None:
        """Fail now, not after an hour of training, when the backend is unreachable."""

    def fetch_checkpoint(self, ref: str, workdir: str) -> Path:
        """A local vitray checkpoint directory for any reference a user may give."""

    def open_run(
        self, cfg: JobConfig, run_dir: str, kind: str, split_rows: dict[str, int]
    ) -> str | None:
        """The run of `run.name` (the unfinished one it left, or a new one, which records
        the dataset and its split sizes); None when tracking is off."""

    def open_trial_run(
        self, cfg: JobConfig, parent_id: str, trial_name: str, split_rows: dict[str, int]
    ) -> str:
        """A search trial's nested run under `parent_id`."""

    def metrics(self, run_id: str | None) -> MetricsSink | None:
        """A sink that logs to `run_id`, or None."""

    def active(self, run_id: str) -> AbstractContextManager[Any]:
        """The driver's run context while training: marked failed if training raises."""

    def log_start(self, start: Start, run_id: str) -> None:
        """A fine-tune's resized starting checkpoint, with where it came from."""

    def log_outcome(self, cfg: JobConfig, result: Any, run_id: str, start: Start | None) -> None:
        """After training: the config, the final and best checkpoints, the figures."""

    def fail_search(self, parent_id: str, reason: str) -> None:
        """Mark a search that ended early FAILED, with why in its description."""

    def log_search(self, outcome: SearchOutcome, test_scores: dict[str, float]) -> Any:
        """The search's summary, trial fates and figures; the chosen model registered: its
        version (an MLflow ModelVersion), or None when nothing was registered."""
