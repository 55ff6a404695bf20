"""One training run (pretrain or fine-tune) on Ray Train, tracked in MLflow.

Driver side, in Ray's example style: validate the config, check MLflow, build the
datasets, compute the per-worker batch, then one TorchTrainer. Re-running the same command
with the same `run.name` resumes from the latest checkpoint and continues its MLflow run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.cluster.raynode import ensure_ray
from jobs.config import JobConfig
from jobs.tracking.figures import log_figures
from jobs.tracking.model import log_vit_model
from jobs.tracking.runs import check_reachable, open_run, tracking_uri
from jobs.training.loop import train_loop_per_worker
from jobs.training.start import Start, log_start, resized_start
from pipeline.dataset import build_dataset, describe_dataset, quiet_progress
from vit import ViTConfig


@dataclass
class Outcome:
    config: JobConfig
    result: Any  # ray.train.Result
    mlflow_run_id: str | None
    tracking_uri: str


@dataclass
class Plan:
    """What the driver works out once: the architecture, the step counts, the worker meta."""

    vit: ViTConfig
    meta: dict[str, Any]
    start: Start | None  # a fine-tune's resized starting checkpoint


def storage_dir(cfg: JobConfig) -> str:
    path = cfg.run.storage_path
    return path if "://" in path else str(Path(path).resolve())


def make_plan(cfg: JobConfig, uri: str, workdir: str, start: Start | None = None) -> Plan:
    """`start`: a fine-tune start already resized (Tune trials share the driver's)."""
    info = describe_dataset(cfg.data)
    num_classes = len(info.class_names or []) or None
    if not num_classes:
        raise ValueError(f"{cfg.data.dataset}: class names unknown; prepare it with vitray prepare")
    if cfg.init.checkpoint and start is None:
        start = resized_start(cfg, num_classes, info.class_names, uri, workdir)
    vit = start.config if start is not None else cfg.vit_config(num_classes)
    rows = info.split_rows.get("train")
    if not rows:
        raise ValueError(f"{cfg.data.dataset}: the train split size is unknown")
    steps_per_epoch = max(
        1, rows // cfg.scaling.num_workers // cfg.micro_batch // cfg.train.grad_accum
    )
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    meta = {
        "vit": vit.to_dict(),
        "num_classes": num_classes,
        "class_names": info.class_names,
        "train_rows": rows,
        "val_rows": info.split_rows.get("val"),
        "splits": sorted(info.split_rows),
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "tracking_uri": uri,
        "mlflow_run_id": None,
        "init_weights": None,
    }
    return Plan(vit, meta, start)


def build_datasets(cfg: JobConfig, plan: Plan, materialize: bool = False) -> dict[str, Any]:
    datasets = {
        split: quiet_progress(
            build_dataset(cfg.data, split, plan.vit.patch_size, plan.meta["num_classes"])
        )
        for split in ("train", "val")
    }
    if materialize:
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    return datasets


def worker_resources(cfg: JobConfig) -> dict[str, float]:
    """What one Ray Train worker holds."""
    return {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}


def check_capacity(cfg: JobConfig) -> None:
    """Fail now rather than wait forever. Ray queues work that no node can hold, and train
    workers that take the CPUs a decode task needs leave the job silent, not failed (on 2
    CPUs: one worker of 1.5 CPUs and decode tasks of 1.0)."""
    import ray

    if cfg.scaling.autoscaling:
        return
    worker, workers = worker_resources(cfg), cfg.scaling.num_workers
    need = {kind: amount * workers for kind, amount in worker.items()}
    need["CPU"] += cfg.data.cpus_per_task
    have = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    largest = {kind: max((n.get(kind, 0) for n in nodes), default=0) for kind in need}
    problems = [
        f"{need[k]:g} {k} in all ({workers} worker(s) x {worker[k]:g}"
        + (f" + one decode task of {cfg.data.cpus_per_task:g}" if k == "CPU" else "")
        + f"), the cluster has {have.get(k, 0):g}"
        for k in need
        if need[k] > have.get(k, 0) + 1e-9
    ] + [
        f"{amount:g} {k} per worker, the largest node has {largest[k]:g}"
        for k, amount in worker.items()
        if amount > largest[k] + 1e-9
    ]
    if problems:
        raise ValueError(
            "this Ray cluster cannot hold the job, which would wait forever: it needs "
            + "; ".join(problems)
            + ". Lower scaling.num_workers, scaling.cpus_per_worker or data.cpus_per_task, "
            "or set scaling.autoscaling=true on a cluster that adds nodes on demand"
        )


def build_trainer(
    cfg: JobConfig, plan: Plan, datasets: dict[str, Any], callbacks: list | None = None
) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "meta": plan.meta},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"]),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_dir(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep,
                checkpoint_score_attribute="val_top1",
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level=cfg.run.ray_train_log_level),
        ),
    )


def fit(cfg: JobConfig, kind: str = "pretrain", materialize: bool = False) -> Outcome:
    """Run (or resume) one training job; returns Ray's Result and the MLflow run id.

    `materialize` decodes the datasets once into the object store (benchmarks: training
    fed from memory, the same loop otherwise).
    """
    import ray

    uri = tracking_uri(cfg.mlflow)
    if cfg.mlflow.enabled:
        check_reachable(uri)
    run_dir = f"{storage_dir(cfg)}/{cfg.run.name}"
    plan = make_plan(cfg, uri, workdir=run_dir if "://" not in run_dir else tempfile.mkdtemp())
    ensure_ray()
    check_capacity(cfg)
    datasets = build_datasets(cfg, plan, materialize)
    run_id = open_run(cfg, uri, run_dir, kind) if cfg.mlflow.enabled else None
    plan.meta["mlflow_run_id"] = run_id
    if plan.start is not None:
        plan.meta["init_weights"] = ray.put(plan.start.state)
        if run_id:
            log_start(plan.start, run_id, uri)
    workers, micro = cfg.scaling.num_workers, cfg.micro_batch
    print(
        f"{kind}: {plan.meta['train_rows']} train images, {workers} worker(s) x {micro} x "
        f"{cfg.train.grad_accum} accum, {plan.meta['steps_per_epoch']} steps/epoch, "
        f"{plan.meta['total_steps']} steps; checkpoints in {run_dir}",
        flush=True,
    )
    trainer = build_trainer(cfg, plan, datasets)
    if run_id is None:
        return Outcome(cfg, trainer.fit(), None, uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    # The driver's run context: system metrics of this node while training, the run marked
    # FAILED if training raises, FINISHED after the outcome is logged.
    with mlflow.start_run(run_id=run_id, log_system_metrics=True):
        result = trainer.fit()
        log_outcome(cfg, result, run_id, uri, plan.start)
    return Outcome(cfg, result, run_id, uri)


def log_outcome(
    cfg: JobConfig, result: Any, run_id: str, uri: str, start: Start | None = None
) -> None:
    """Driver-side MLflow: the resolved config, the final and the best checkpoints, and the
    figures of the best (a fine-tune's posemb similarity before and after the resize)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json")), "config.yaml")
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            client.log_artifacts(run_id, d, "checkpoint/final")
    best = sorted(result.best_checkpoints, key=lambda cm: cm[1].get("val_top1", 0))
    if best:
        checkpoint, metrics = best[-1]
        with checkpoint.as_directory() as d:
            client.log_artifacts(run_id, d, "checkpoint/best")
            log_vit_model(d)  # the best checkpoint, ready for the model registry
            with tempfile.TemporaryDirectory() as out:
                before = start.before if start else None
                log_figures(d, cfg.data, run_id, uri, Path(out), before=before)
        client.set_tag(run_id, "best_val_top1", f"{metrics.get('val_top1', 0):.4f}")
