"""One training run (pretrain or fine-tune) on Ray Train.

Driver side, in Ray's example style: validate the config, check the tracker, plan, build
the datasets, then one TorchTrainer. Re-running the same command with the same `run.name`
resumes from the latest checkpoint and continues its tracked run.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.cluster.raynode import ensure_ray
from jobs.config import JobConfig
from jobs.training.capacity import fit_to_cluster, worker_resources
from jobs.training.loop import train_loop_per_worker
from jobs.training.plan import TrainPlan, make_plan
from jobs.training.progress import ProgressFeed
from jobs.training.runlock import run_lock
from jobs.training.start import data_for_start, start_workdir
from jobs.training.tracker import MetricsSink, Tracker
from pipeline.dataset import build_dataset, quiet_progress


@dataclass
class Outcome:
    config: JobConfig
    result: Any  # ray.train.Result
    mlflow_run_id: str | None


def storage_dir(cfg: JobConfig) -> str:
    path = cfg.run.storage_path
    return path if "://" in path else str(Path(path).resolve())


def build_datasets(cfg: JobConfig, plan: TrainPlan, materialize: bool = False) -> dict[str, Any]:
    datasets = {
        split: quiet_progress(build_dataset(cfg.data, split, plan.vit.patch_size, plan.num_classes))
        for split in ("train", "val")
    }
    if cfg.data.val_subset:  # evaluated during training; the whole val split at the end
        datasets["val_subset"] = quiet_progress(
            build_dataset(
                cfg.data, "val", plan.vit.patch_size, plan.num_classes, subset=cfg.data.val_subset
            )
        )
    if materialize:
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    return datasets


def build_trainer(
    cfg: JobConfig,
    plan: TrainPlan,
    datasets: dict[str, Any],
    metrics: MetricsSink | None = None,
    progress: Any = None,
    callbacks: list | None = None,
    score_by: tuple[str, str] = ("val_top1", "max"),
) -> Any:
    """Ray's trainer of the plan. Its checkpoints are kept by `score_by` (metric, mode): a
    search's trial passes the search's own, so that the peak it may pick is never pruned."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            "plan": plan.to_dict(),
            "metrics": metrics,
            "progress": progress,  # a Ray queue of rank 0's progress lines, or None
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_dir(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep,
                # scores on a val sample (data.val_subset) and on the whole split do not
                # compare: then the latest checkpoints are kept, the last scored on all of val
                checkpoint_score_attribute=None if cfg.data.val_subset else score_by[0],
                checkpoint_score_order=score_by[1],
            ),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level=cfg.run.ray_train_log_level),
        ),
    )


def run_trainer(trainer: Any, run_dir: str) -> Any:
    """`trainer.fit()`, a full disk named as such (Ray hands it over as a worker's
    traceback). Ray registers a checkpoint only once it is written in full, so the ones
    before it stay usable."""
    try:
        return trainer.fit()
    except Exception as e:
        if os.strerror(errno.ENOSPC) not in str(e):
            raise
        free = "" if "://" in run_dir else f", {shutil.disk_usage(run_dir).free >> 20} MB free now"
        raise RuntimeError(
            f"no space left on device while saving a checkpoint to {run_dir}{free}; the "
            "checkpoints saved before it are intact: make room there (or in the workers' "
            "temporary directory, where each is written first) and run the same command "
            "again to resume from the last one"
        ) from e


def fit(
    cfg: JobConfig, tracker: Tracker, kind: str = "pretrain", materialize: bool = False
) -> Outcome:
    """Run (or resume) one training job; returns Ray's Result and the tracked run id.

    `materialize` decodes the datasets once into the object store (benchmarks: training
    fed from memory, the same loop otherwise).
    """
    tracker.check()
    run_dir = f"{storage_dir(cfg)}/{cfg.run.name}"
    with run_lock(run_dir), start_workdir(run_dir) as workdir:
        return fit_locked(cfg, tracker, kind, materialize, run_dir, workdir)


def fit_locked(
    cfg: JobConfig, tracker: Tracker, kind: str, materialize: bool, run_dir: str, workdir: str
) -> Outcome:
    """`fit` while this process alone holds `run_dir`."""
    import ray

    plan, start = make_plan(cfg, fetch=tracker.fetch_checkpoint, workdir=workdir)
    cfg = data_for_start(cfg, start)
    ensure_ray()
    cfg = fit_to_cluster(cfg)  # sized, and refused before any run if it cannot run
    datasets = build_datasets(cfg, plan, materialize)
    run_id = tracker.open_run(cfg, run_dir, kind, plan.split_rows)
    plan = plan.replace(mlflow_run_id=run_id)
    if start is not None:
        plan = plan.replace(init_weights=ray.put(start.state))
        if run_id:
            tracker.log_start(start, run_id)
    workers, micro = cfg.scaling.num_workers, cfg.micro_batch
    print(
        f"{kind}: {plan.train_rows} train images, {workers} worker(s) x {micro} x "
        f"{cfg.train.grad_accum} accum, {plan.steps_per_epoch} steps/epoch, "
        f"{plan.total_steps} steps; checkpoints in {run_dir}",
        flush=True,
    )
    with ProgressFeed() as progress:
        trainer = build_trainer(cfg, plan, datasets, tracker.metrics(run_id), progress)
        if run_id is None:
            return Outcome(cfg, run_trainer(trainer, run_dir), None)
        with tracker.active(run_id):
            result = run_trainer(trainer, run_dir)
            tracker.log_outcome(cfg, result, run_id, start)
    return Outcome(cfg, result, run_id)
