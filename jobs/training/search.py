"""A Ray Tune search over fine-tunes (or pretraining runs).

Each trial is a full training run of the shared loop (jobs/training/loop.py). A
single-worker trial runs the loop in the trial itself: on Ray 2.60, trials that build a
TorchTrainer and get stopped early by ASHA leak their worker resources and the next trial
waits forever (docs/design.md#tune-trials), while plain function trials release everything
when stopped. Its Ray Data tasks run inside the trial's placement group, in a bundle of
their own, so data and training never wait on each other.

A trial that asks for several workers is a thin driver of about one CPU that builds a
TorchTrainer: in Ray Train V2 the trainer reserves its workers' placement group itself, so
reserving them in the trial's group as well would book every GPU twice. As Tune no longer
sees the workers, the search caps how many trials run at once by what the cluster holds;
the trial's datasets are built outside its group, so their decode tasks spread over the
cluster as a job's do; and the trainer's end-of-epoch reports reach Tune with the path of
their checkpoint, from which the chosen model is taken.

Tracking: one parent run for the search, one nested run per trial, the chosen checkpoint
registered with an alias. A watchdog stops the search when its time budget is spent or a
running trial goes silent, and names that trial.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.train import UserCallback
from ray.tune import Callback, Stopper
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.util.queue import Empty, Queue

from jobs.cluster.raynode import ensure_ray
from jobs.config import JobConfig, with_values
from jobs.training.capacity import fit_to_cluster, worker_resources
from jobs.training.evaluation import evaluate_checkpoint
from jobs.training.fit import build_datasets, build_trainer, storage_dir
from jobs.training.loop import Runner, run_training
from jobs.training.plan import TrainPlan, make_plan
from jobs.training.start import data_for_start, start_workdir
from jobs.training.tracker import Tracker
from pipeline.dataset import ensure_prepared

TRIAL_RUN_KEY = "mlflow_run_id"  # reported by every trial, so the driver can find its run
TRIAL_DRIVER_CPUS = 1.0  # a trial that drives a TorchTrainer (Ray's Train V2 Tune guide)


def absolute(path: str) -> str:
    """Trials run in their own directories: local paths go to them absolute."""
    return path if "://" in path or not Path(path).exists() else str(Path(path).resolve())


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """YAML distributions -> Ray Tune's, keyed by the dotted config key."""
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),  # YAML's [lo, hi] is inclusive
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {key: make[kind](args) for key, dist in space.items() for kind, args in dist.items()}


def driver_cpus(cfg: JobConfig) -> float:
    """CPUs a trial holds beside its workers: a multi-worker trial's driver."""
    return TRIAL_DRIVER_CPUS if cfg.scaling.num_workers > 1 else 0.0


def trial_resources(cfg: JobConfig) -> Any:
    """The trial's placement group: a single-worker trial's worker and one data bundle, or
    a multi-worker trial's driver alone (its trainer reserves the workers)."""
    from ray import tune

    if cfg.scaling.num_workers > 1:
        return tune.PlacementGroupFactory([{"CPU": driver_cpus(cfg)}])
    return tune.PlacementGroupFactory([worker_resources(cfg), {"CPU": cfg.data.cpus_per_task}])


def trial_footprint(cfg: JobConfig) -> dict[str, float]:
    """What one running trial holds in all: its workers, one decode task, its driver."""
    need = {k: v * cfg.scaling.num_workers for k, v in worker_resources(cfg).items()}
    need["CPU"] += cfg.data.cpus_per_task + driver_cpus(cfg)
    return need


def concurrent_trials(cfg: JobConfig) -> int:
    """`tune.max_concurrent`, capped by how many trials the cluster holds at once (its GPUs
    over a trial's, and its CPUs). Tune does not see a multi-worker trial's workers: trials
    started beyond that would hold their drivers and wait for workers. Under
    `scaling.autoscaling` the cluster grows on demand, and the config's number stands."""
    if cfg.scaling.autoscaling:
        return cfg.tune.max_concurrent
    have = ray.cluster_resources()
    fits = min(int(have.get(k, 0) / v + 1e-9) for k, v in trial_footprint(cfg).items() if v)
    return max(1, min(cfg.tune.max_concurrent, fits))


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


@dataclass
class Watchdog:
    """Tracks the last sign of life of every running trial, for the stopper below."""

    budget_s: float
    stall_s: float
    started: float = field(default_factory=time.monotonic)
    alive: dict[str, float] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    stalled: str | None = None

    def reset(self, budget_s: float, stall_s: float) -> None:
        self.budget_s, self.stall_s, self.started = budget_s, stall_s, time.monotonic()
        self.alive, self.names, self.reason, self.stalled = {}, {}, None, None

    def check(self) -> bool:
        now = time.monotonic()
        if now - self.started > self.budget_s:
            self.reason = f"time budget of {self.budget_s:.0f} s spent"
            return True
        for trial_id, seen in self.alive.items():
            if now - seen > self.stall_s:
                self.stalled = self.names.get(trial_id, trial_id)
                self.reason = f"trial {self.stalled} reported nothing for {now - seen:.0f} s"
                return True
        return False


# The driver's watchdog. Tune pickles its callbacks and stopper with the experiment (and
# unpickles them on restore), so the two hooks look the watchdog up instead of holding it.
WATCHDOG = Watchdog(budget_s=float("inf"), stall_s=float("inf"))


class WatchdogFeed(Callback):
    def on_trial_start(self, iteration, trials, trial, **info):
        WATCHDOG.alive[trial.trial_id] = time.monotonic()
        WATCHDOG.names[trial.trial_id] = f"{trial.trial_id} {trial.config}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        WATCHDOG.alive[trial.trial_id] = time.monotonic()

    def on_trial_complete(self, iteration, trials, trial, **info):
        WATCHDOG.alive.pop(trial.trial_id, None)

    on_trial_error = on_trial_complete


class WatchdogStop(Stopper):
    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return WATCHDOG.check()


class SearchStopped(RuntimeError):
    """The watchdog stopped the search: a trial stalled."""


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
    until the scheduler stops it."""
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
        epoch_reports_only=True,
    )
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    run_training({"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner)


def build_tuner(cfg: JobConfig, trainable: Any, concurrent: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.epochs,
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
            # A trial at train.epochs ends by itself. Stopped there by ASHA instead, a
            # multi-worker trial's process was killed while its trainer shut down, leaving
            # the workers' placement group to Ray's cleaner (which needs the state API).
            stop_last_trials=False,
        )
        if t.scheduler == "asha"
        else FIFOScheduler()
    )
    search_alg = None
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.train.seed)
    return tune.Tuner(
        trainable,
        param_space=search_space(t.space),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=t.num_samples,
            max_concurrent_trials=concurrent,
            # A new single-worker trial reuses a finished one's process: no torch re-import.
            # A stopped multi-worker trial's process goes, and its trainer's workers with it.
            reuse_actors=cfg.scaling.num_workers == 1,
        ),
        run_config=tune.RunConfig(
            name=cfg.run.name,
            storage_path=storage_dir(cfg),
            stop=WatchdogStop(),
            callbacks=[WatchdogFeed()],
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep,
                checkpoint_score_attribute=t.metric,
                checkpoint_score_order=t.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
        ),
    )


@dataclass
class SearchOutcome:
    config: JobConfig
    results: Any  # ray.tune.ResultGrid
    parent_run_id: str | None
    best_run_id: str | None
    best_checkpoint: Any
    best_metric: float
    stopped_because: str | None
    registered: Any = None  # mlflow ModelVersion


def search(cfg: JobConfig, tracker: Tracker) -> SearchOutcome:
    """Run (or resume) the search in `cfg.tune`; returns the best trial and its run."""

    if not cfg.tune.space:
        raise ValueError("tune.space is empty: name at least one config key to search")
    tracker.check()
    cfg = with_values(cfg, {"data.dataset": absolute(ensure_prepared(cfg.data.dataset))})
    run_dir = f"{storage_dir(cfg)}/{cfg.run.name}"
    with start_workdir(f"{run_dir}-init") as workdir:
        return search_from(cfg, tracker, run_dir, workdir)


def search_from(cfg: JobConfig, tracker: Tracker, run_dir: str, workdir: str) -> SearchOutcome:
    """`search`, its starting checkpoint fetched into `workdir`."""
    from ray import tune

    plan, start = make_plan(cfg, fetch=tracker.fetch_checkpoint, workdir=workdir)
    cfg = data_for_start(cfg, start)
    ensure_ray()
    cfg = fit_to_cluster(cfg, driver_cpus(cfg))  # one trial must fit, or the search waits
    concurrent = concurrent_trials(cfg)
    parent_id = tracker.open_run(cfg, run_dir, "tune", plan.split_rows)
    if parent_id and start is not None:
        tracker.log_start(start, parent_id)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=cfg.model_dump(mode="json"),
            parent_id=parent_id,
            tracker=tracker,
            start=start,  # in the object store once, shared by every trial
        ),
        trial_resources(cfg),
    )
    WATCHDOG.reset(cfg.tune.time_budget_s, cfg.tune.stall_timeout_s)
    if tune.Tuner.can_restore(run_dir):
        print(f"resuming the search in {run_dir}", flush=True)
        tuner = tune.Tuner.restore(run_dir, trainable, resume_errored=True)
    else:
        tuner = build_tuner(cfg, trainable, concurrent)
    print(
        f"tune: {cfg.tune.num_samples} sample(s) of {sorted(cfg.tune.space)}, "
        f"{cfg.tune.scheduler} scheduler, {cfg.tune.search} search, "
        f"{concurrent} at a time, budget {cfg.tune.time_budget_s:.0f} s",
        flush=True,
    )
    results = tuner.fit()
    unfinished = [
        t.trial_id
        for t in tune.ExperimentAnalysis(run_dir).trials
        if t.status not in ("TERMINATED", "ERROR")
    ]
    if unfinished and not WATCHDOG.reason:  # Ctrl-C: Tune saved its state and returned
        raise SearchStopped(
            f"interrupted with {len(unfinished)} trial(s) unfinished; run the same command "
            "again to resume the search"
        )
    return finish(cfg, plan, results, parent_id, tracker, WATCHDOG)


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


class NothingToRegister(RuntimeError):
    """The search finished, but its chosen trial left no model to register."""


def finish(
    cfg: JobConfig,
    plan: TrainPlan,
    results: Any,
    parent_id: str | None,
    tracker: Tracker,
    dog: Watchdog,
) -> SearchOutcome:
    t = cfg.tune
    finished = [r for r in results if r.metrics and t.metric in r.metrics]
    if dog.stalled:
        if parent_id:
            tracker.fail_search(parent_id, dog.reason)
        raise SearchStopped(f"the search stopped: {dog.reason}")
    if not finished:
        errors = [str(r.error) for r in results if r.error]
        raise RuntimeError(f"no trial reported {t.metric}; errors: {errors[:3]}")
    best, found, value = select_best(finished, t.metric, t.mode, t.select)
    checkpoint = at_storage(found, storage_dir(cfg))
    outcome = SearchOutcome(
        cfg, results, parent_id, best.metrics.get(TRIAL_RUN_KEY), checkpoint, value, dog.reason
    )
    missing = unregistrable(outcome, best.path.rsplit("/", 1)[-1])
    if missing:
        if parent_id:
            tracker.fail_search(parent_id, missing)
        raise NothingToRegister(missing)
    if dog.reason:
        print(f"search stopped early: {dog.reason}; best of the trials so far", flush=True)
    if parent_id:
        logged = outcome.best_run_id and "test" in plan.split_rows
        tracker.log_search(outcome, test_scores(cfg, checkpoint) if logged else {})
    return outcome


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


def test_scores(cfg: JobConfig, checkpoint: Any) -> dict[str, float]:
    """The chosen checkpoint scored on the held-out test split."""
    with checkpoint.as_directory() as d:
        scores = evaluate_checkpoint(d, cfg.data, "test")
    print(f"test top-1 of the best checkpoint: {scores['test_top1']:.4f}", flush=True)
    return scores
