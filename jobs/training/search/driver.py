"""`search`: run (or resume) the search in `cfg.tune` on Ray Tune, tracked as one parent
run with a nested run per trial, and register the chosen trial's model. Every way out but
the end (an error, no trial reporting, nothing to register, a stall, Ctrl-C or SIGTERM)
marks the parent run FAILED and says why in its description."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from jobs.cluster.raynode import ensure_ray
from jobs.config import JobConfig, with_values
from jobs.environ import scoped_environ
from jobs.inference.evaluation import evaluate_checkpoint
from jobs.training.capacity import fit_to_cluster
from jobs.training.fit import storage_dir
from jobs.training.plan import TrainPlan, make_plan
from jobs.training.runlock import run_lock
from jobs.training.search.outcome import TRIAL_RUN_KEY, SearchOutcome
from jobs.training.search.pick import NothingToRegister, at_storage, select_best, unregistrable
from jobs.training.search.resources import concurrent_trials, driver_cpus, trial_resources
from jobs.training.search.space import check_search, scheduler, search_algorithm, search_space
from jobs.training.search.trial import run_trial
from jobs.training.search.watchdog import (
    WATCHDOG,
    SearchStopped,
    Watchdog,
    WatchdogFeed,
    WatchdogStop,
)
from jobs.training.start import data_for_start, start_workdir
from jobs.training.tracker import Tracker
from pipeline.dataset import ensure_prepared

RESUME = "run the same command again to resume the search"


def absolute(path: str) -> str:
    """Trials run in their own directories: local paths go to them absolute."""
    return path if "://" in path or not Path(path).exists() else str(Path(path).resolve())


def search(cfg: JobConfig, tracker: Tracker) -> SearchOutcome:
    """Run (or resume) the search in `cfg.tune`; returns the chosen trial and its run."""
    check_search(cfg)
    tracker.check()
    cfg = with_values(cfg, {"data.dataset": absolute(ensure_prepared(cfg.data.dataset))})
    run_dir = f"{storage_dir(cfg)}/{cfg.run.name}"
    with run_lock(run_dir), start_workdir(f"{run_dir}-init") as workdir:
        return search_from(cfg, tracker, run_dir, workdir)


def search_from(cfg: JobConfig, tracker: Tracker, run_dir: str, workdir: str) -> SearchOutcome:
    """`search` while this process alone holds `run_dir`, its starting checkpoint fetched
    into `workdir`."""
    plan, start = make_plan(cfg, fetch=tracker.fetch_checkpoint, workdir=workdir)
    cfg = data_for_start(cfg, start)
    ensure_ray()
    cfg = fit_to_cluster(cfg, driver_cpus(cfg))  # one trial must fit, or the search waits
    concurrent = concurrent_trials(cfg, plan.vit)
    parent_id = tracker.open_run(cfg, run_dir, "tune", plan.split_rows)
    with failed_on_the_way_out(tracker, parent_id), terminate_as_interrupt():
        if parent_id and start is not None:
            tracker.log_start(start, parent_id)
        resources = trial_resources(cfg, plan.vit)
        results = tune_fit(cfg, tracker, run_dir, parent_id, start, concurrent, resources)
        return finish(cfg, plan, results, parent_id, tracker, WATCHDOG)


def tune_fit(
    cfg: JobConfig,
    tracker: Tracker,
    run_dir: str,
    parent_id: str | None,
    start: Any,
    concurrent: int,
    resources: Any,
) -> Any:
    """Tune's results: the search built (or restored from `run_dir`) and run to its end.
    Raises SearchStopped when it returned with trials unfinished (Ctrl-C: Tune saved its
    state)."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=cfg.model_dump(mode="json"),
            parent_id=parent_id,
            tracker=tracker,
            start=start,  # in the object store once, shared by every trial
        ),
        resources,
    )
    WATCHDOG.reset(cfg.tune.time_budget_s, cfg.tune.stall_timeout_s)
    if "://" not in run_dir:
        # Tune snapshots its state each time a trial has saved run.num_to_keep checkpoints,
        # and warns when that happens twice in 5 s: a cost of remote storage, while a local
        # snapshot is a file copy. Tune's documented knob, for local storage only.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    resumed = tune.Tuner.can_restore(run_dir)
    if resumed:
        print(f"resuming the search in {run_dir}", flush=True)
        tuner = tune.Tuner.restore(run_dir, trainable, resume_errored=True)
    else:
        tuner = build_tuner(cfg, trainable, concurrent)
    print(
        f"tune: {cfg.tune.num_samples} sample(s) of {sorted(cfg.tune.space)}, "
        f"{cfg.tune.scheduler} scheduler, {cfg.tune.search} search, "
        f"{concurrent} at a time, budget {cfg.tune.time_budget_s:.0f} s; each trial holds "
        + " + ".join(" ".join(f"{v:g} {k}" for k, v in b.items()) for b in resources.bundles),
        flush=True,
    )
    results = fit_interruptibly(tuner, own_loggers=not resumed)
    unfinished = unfinished_trials(run_dir)
    if unfinished and not WATCHDOG.reason:
        raise SearchStopped(f"interrupted with {len(unfinished)} trial(s) unfinished; {RESUME}")
    return results


def unfinished_trials(run_dir: str) -> list[str]:
    from ray import tune

    return [
        t.trial_id
        for t in tune.ExperimentAnalysis(run_dir).trials
        if t.status not in ("TERMINATED", "ERROR")
    ]


def build_tuner(cfg: JobConfig, trainable: Any, concurrent: int) -> Any:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    t = cfg.tune
    return tune.Tuner(
        trainable,
        param_space=search_space(t.space),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            scheduler=scheduler(cfg),
            search_alg=search_algorithm(cfg),
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
            # CSV and JSON: ResultGrid and ExperimentAnalysis read them
            callbacks=[WatchdogFeed(), CSVLoggerCallback(), JsonLoggerCallback()],
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep,
                checkpoint_score_attribute=t.metric,
                checkpoint_score_order=t.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
        ),
    )


def finish(
    cfg: JobConfig,
    plan: TrainPlan,
    results: Any,
    parent_id: str | None,
    tracker: Tracker,
    dog: Watchdog,
) -> SearchOutcome:
    """The chosen trial's outcome, logged and registered; raises when there is none."""
    t = cfg.tune
    if dog.stalled:
        raise SearchStopped(f"the search stopped: {dog.reason}")
    finished = [r for r in results if r.metrics and t.metric in r.metrics]
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
        raise NothingToRegister(missing)
    if dog.reason:
        print(f"search stopped early: {dog.reason}; best of the trials so far", flush=True)
    if not parent_id:
        return outcome
    scores = (
        test_scores(cfg, checkpoint) if outcome.best_run_id and "test" in plan.split_rows else {}
    )
    return replace(outcome, registered=tracker.log_search(outcome, scores))


def test_scores(cfg: JobConfig, checkpoint: Any) -> dict[str, float]:
    """The chosen checkpoint scored on the held-out test split."""
    with checkpoint.as_directory() as d:
        scores = evaluate_checkpoint(d, cfg.data, "test")
    print(f"test top-1 of the best checkpoint: {scores['test_top1']:.4f}", flush=True)
    return scores


def failure_reason(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted; {RESUME}"
    if isinstance(error, (SearchStopped, NothingToRegister)):
        return str(error)
    return f"{type(error).__name__}: {error}"


@contextmanager
def failed_on_the_way_out(tracker: Tracker, parent_id: str | None) -> Iterator[None]:
    """Whatever ends the search early marks its parent run FAILED, saying why; the error
    goes on to the caller. A run marked so is continued by the same command."""
    try:
        yield
    except BaseException as error:
        if parent_id:
            reason = failure_reason(error)
            try:
                tracker.fail_search(parent_id, reason)
            except Exception as marking:  # the original error matters more
                print(f"warning: could not mark search run {parent_id} FAILED: {marking}")
        raise


TUNING = threading.Event()  # set while tuner.fit() runs, with Tune's SIGINT handler in place


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def fit_interruptibly(tuner: Any, own_loggers: bool) -> Any:
    """`tuner.fit()`. Tune installs its own SIGINT handler and never puts the previous one
    back: after a search, Ctrl-C would only set a flag nobody reads. It is put back here.
    `own_loggers`: Tune adds no loggers of its own during this fit (the tuner has its CSV
    and JSON ones: Tune's TensorBoard one would print a `tensorboard --logdir` line for
    files that duplicate MLflow); a search resumed from before keeps what Tune added then."""
    before = signal.getsignal(signal.SIGINT) if in_main_thread() else None
    TUNING.set()
    try:
        with scoped_environ(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1" if own_loggers else None):
            return tuner.fit()
    finally:
        TUNING.clear()
        if before is not None:
            signal.signal(signal.SIGINT, before)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`ray job stop`, a pod deleted, `kill`) stops the search as Ctrl-C does:
    during `tuner.fit()` Tune saves its state and returns, elsewhere KeyboardInterrupt; the
    parent run is marked FAILED either way and the same command resumes."""
    if not in_main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if not (TUNING.is_set() and callable(handler)):
            raise KeyboardInterrupt
        handler(signum, frame)  # Tune's: it saves the search's state and returns

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
