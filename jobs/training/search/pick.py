"""The search's pick: the winning trial by the search's metric and `tune.select`, and the
checkpoint to register, or why there is none."""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from jobs.training.search.outcome import TRIAL_RUN_KEY, SearchOutcome


class NothingToRegister(RuntimeError):
    """The search finished, but its chosen trial left no model to register."""


def select_best(
    finished: list, metric: str, mode: str, select: str
) -> tuple[Any, Any | str | None, float]:
    """The winning trial's Result, the checkpoint to register and its metric. A single-worker
    trial's checkpoint is Tune's; a multi-worker trial's is the path its trainer reported
    (a str), None when it reported none.

    "final" judges the trials that trained longest (ASHA's top rung) by their last report
    and takes their final checkpoint, the model the schedule was built to produce. The peak
    of ten epochs x four trials on digits' 180 val images was often an early epoch: in four
    fine-tunes the best-val epoch scored test 0.972-0.994 (mean 0.981), the final one
    0.986-0.994 (mean 0.990).
    """
    sign = 1 if mode == "max" else -1
    if select == "peak":

        def peak(r: Any) -> float:
            return float((sign * r.metrics_dataframe[metric].dropna()).max())

        best = max(finished, key=peak)
        history = best.metrics_dataframe
        reported = history.loc[(sign * history[metric]).idxmax()].get(CHECKPOINT_PATH_KEY)
        reported = reported if isinstance(reported, str) else None  # NaN: none that report
        checkpoint = best.get_best_checkpoint(metric, mode) or best.checkpoint or reported
        return best, checkpoint, sign * peak(best)
    furthest = max(r.metrics.get("step", 0) for r in finished)
    longest = [r for r in finished if r.metrics.get("step", 0) == furthest]
    best = max(longest, key=lambda r: sign * r.metrics[metric])
    return best, best.checkpoint or best.metrics.get(CHECKPOINT_PATH_KEY), best.metrics[metric]


def at_storage(checkpoint: Any | str | None, storage: str) -> Any:
    """A reported checkpoint path as a Checkpoint on the run's storage (Ray reports paths
    without their scheme: `bucket/key` on S3)."""
    if not isinstance(checkpoint, str):
        return checkpoint
    import pyarrow.fs
    from ray.train import Checkpoint

    return Checkpoint(checkpoint, pyarrow.fs.FileSystem.from_uri(storage)[0])


def unregistrable(outcome: SearchOutcome, trial: str) -> str | None:
    """Why the chosen trial cannot be registered, if it cannot: a search that ends with
    nothing to register fails instead of finishing without a model."""
    chosen = f"the chosen trial {trial} ({outcome.config.tune.metric} {outcome.best_metric:.4f})"
    if outcome.best_checkpoint is None:
        return (
            f"nothing to register: {chosen} reported no checkpoint, neither to Tune nor as "
            f"the {CHECKPOINT_PATH_KEY} of its trainer's reports"
        )
    if outcome.parent_run_id and not outcome.best_run_id:
        return f"nothing to register: {chosen} reported no {TRIAL_RUN_KEY}: its run is unknown"
    return None
