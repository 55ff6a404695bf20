"""One trial: a full training run of the shared loop with the trial's sample.

A single-worker trial runs the loop in its own process and reports to Tune directly. A
multi-worker trial drives a TorchTrainer: its datasets are built outside the trial's
placement group, so their decode tasks spread over the cluster as a job's do, and the
trainer's end-of-epoch reports reach Tune with the path of their checkpoint, from which the
chosen model is taken.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray
from ray.train import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.util.queue import Empty, Queue

from jobs.config import JobConfig, with_values
from jobs.secrets import masked_errors
from jobs.training.fit import build_datasets, build_trainer
from jobs.training.loop import Runner, run_training
from jobs.training.plan import TrainPlan, make_plan
from jobs.training.search.outcome import TRIAL_RUN_KEY
from jobs.training.tracker import Tracker


class EpochReports(UserCallback):
    """A multi-worker trial's reports: rank 0's end-of-epoch metrics (the ones with a
    checkpoint, which schedulers compare), the checkpoint's path and the trial's MLflow run,
    put on `queue` for the trial's own thread to hand to Tune (`forward_reports`).

    Ray's TuneReportCallback hands them over from Tune's side instead, and races the end of
    the trial: a last report taken while the trial function returns deadlocks Tune's result
    queue, and the trial hangs with its training done."""

    def __init__(self, run_id: str | None, queue: Any) -> None:
        self.run_id, self.queue = run_id, queue

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if checkpoint is not None:
            self.queue.put(
                {**metrics[0], CHECKPOINT_PATH_KEY: checkpoint.path, TRIAL_RUN_KEY: self.run_id}
            )


def forward_reports(trainer: Any, queue: Any) -> None:
    """`trainer.fit()` in a thread of its own while this one (the trial function's) reports
    to Tune whatever the trainer's EpochReports put on `queue`; returns once the trainer has
    ended and every report has been handed over, and raises what the trainer raised."""
    from ray import tune

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # raised again in the trial's thread
            failure.append(e)

    fitting = threading.Thread(target=fit, name="trial-trainer", daemon=True)
    fitting.start()
    while True:
        ended = not fitting.is_alive()  # read before the queue: a report put last is seen
        try:
            tune.report(queue.get(timeout=1.0))
        except Empty:
            if ended:
                break
    if failure:
        raise failure[0]


@ray.remote(num_cpus=0, scheduling_strategy="DEFAULT")
def datasets_outside_trial(cfg: JobConfig, plan: TrainPlan) -> dict[str, Any]:
    """A dataset's decode tasks stay in the placement group of the process that builds it
    (pipeline.dataset.placement_args). A multi-worker trial's group is its driver's single
    CPU: it builds its datasets in this task, outside the group."""
    return build_datasets(cfg, plan)


def trial_trainer(
    cfg: JobConfig,
    plan: TrainPlan,
    datasets: dict[str, Any],
    metrics: Any,
    reports: EpochReports,
) -> Any:
    """The TorchTrainer a multi-worker trial drives: its end-of-epoch reports to `reports`,
    its checkpoints kept by the search's metric."""
    return build_trainer(
        cfg,
        plan,
        datasets,
        metrics,
        callbacks=[reports],
        score_by=(cfg.tune.metric, cfg.tune.mode),
    )


def run_trial(
    sample: dict[str, Any], base: dict, parent_id: str | None, tracker: Tracker, start
) -> None:
    """One Tune trial: the base config with this trial's sample, trained to the end or
    until the scheduler stops it. Its error, as Tune writes it to disk, holds no password."""
    with masked_errors():
        train_trial(sample, base, parent_id, tracker, start)


def train_trial(
    sample: dict[str, Any], base: dict, parent_id: str | None, tracker: Tracker, start
) -> None:
    """`run_trial`'s work: in process, or as the driver of its own trainer."""
    import torch
    from ray import tune

    cfg = with_values(JobConfig.model_validate(base), sample)
    # Tune logs each checkpoint it persists ("Checkpoint successfully created") under
    # ray.train at INFO, in the trial's process, where LoggingConfig does not reach.
    logging.getLogger("ray.train").setLevel(cfg.run.ray_train_log_level)
    context = tune.get_context()
    checkpoint = tune.get_checkpoint()
    plan, start = make_plan(cfg, start=start)
    run_id = None
    if parent_id:
        run_id = tracker.open_trial_run(cfg, parent_id, context.get_trial_name(), plan.split_rows)
    plan = plan.replace(mlflow_run_id=run_id, init_weights=start.state if start else None)
    if start is not None and cfg.scaling.num_workers > 1:  # to every worker: once, by reference
        plan = plan.replace(init_weights=ray.put(start.state))
    if cfg.scaling.num_workers > 1:
        datasets = ray.get(datasets_outside_trial.remote(cfg, plan.replace(init_weights=None)))
        cfg = with_values(cfg, {"run.name": f"{cfg.run.name}/{context.get_trial_id()}"})
        queue = Queue(actor_options={"num_cpus": 0})
        reports = EpochReports(run_id, queue)
        trainer = trial_trainer(cfg, plan, datasets, tracker.metrics(run_id), reports)
        forward_reports(trainer, queue)
        return
    datasets = build_datasets(cfg, plan)
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    runner = Runner(
        rank=0,
        device=torch.device("cuda" if use_gpu else "cpu"),
        train=datasets["train"],
        val=datasets["val"],
        val_subset=datasets.get("val_subset"),
        report=lambda metrics, ckpt: tune.report(
            {**metrics, TRIAL_RUN_KEY: run_id}, checkpoint=ckpt
        ),
        make_checkpoint=tune.Checkpoint.from_directory,
        checkpoint=checkpoint,
        metrics=tracker.metrics(run_id),
        # a line per report, as pretraining prints: a long trial is not silent between
        # Tune's status tables (Ray prefixes it with the trial's process)
        progress=lambda text, keep: print(f"{context.get_trial_name()}: {text}", flush=True),
        epoch_reports_only=True,
    )
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    run_training({"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner)
