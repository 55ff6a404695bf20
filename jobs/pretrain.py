"""`vitray pretrain --config ...`: distributed ViT training on Ray Train, tracked in MLflow.

Driver side, in Ray's example style: validate the config, check MLflow, build the
datasets, compute the per-worker batch, then one TorchTrainer. Re-running the same command
with the same `run.name` resumes from the latest checkpoint and continues its MLflow run.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.config import JobConfig, load_config
from jobs.mlflow_model import log_vit_model
from jobs.tracking import check_reachable, open_run, tracking_uri
from jobs.train import train_loop_per_worker
from pipeline.dataset import build_dataset, describe_dataset

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo-pretrain.yaml"


@dataclass
class Outcome:
    config: JobConfig
    result: Any  # ray.train.Result
    mlflow_run_id: str | None
    tracking_uri: str


def storage_dir(cfg: JobConfig) -> str:
    path = cfg.run.storage_path
    return path if "://" in path else str(Path(path).resolve())


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():  # RAY_ADDRESS (a cluster or a job) wins; else a local Ray
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def fit(
    cfg: JobConfig,
    kind: str = "pretrain",
    init_weights: str | None = None,
    materialize: bool = False,
) -> Outcome:
    """Run (or resume) one training job; returns Ray's Result and the MLflow run id.

    `materialize` decodes the datasets once into the object store (benchmarks: training
    fed from memory, the same loop otherwise).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    uri = tracking_uri(cfg.mlflow)
    if cfg.mlflow.enabled:
        check_reachable(uri)
    info = describe_dataset(cfg.data)
    num_classes = len(info.class_names or []) or None
    if not num_classes:
        raise ValueError(f"{cfg.data.dataset}: class names unknown; prepare it with vitray prepare")
    vit = cfg.vit_config(num_classes)
    ensure_ray()
    datasets = {
        "train": build_dataset(cfg.data, "train", vit.patch_size, num_classes),
        "val": build_dataset(cfg.data, "val", vit.patch_size, num_classes),
    }
    for ds in datasets.values():  # one line per report is the progress; no bars per epoch
        ds.context.enable_progress_bars = False
    if materialize:
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    rows = info.split_rows.get("train")
    if not rows:
        raise ValueError(f"{cfg.data.dataset}: the train split size is unknown")
    workers, micro = cfg.scaling.num_workers, cfg.micro_batch
    steps_per_epoch = max(1, rows // workers // micro // cfg.train.grad_accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    run_dir = f"{storage_dir(cfg)}/{cfg.run.name}"
    run_id = open_run(cfg, uri, run_dir, kind) if cfg.mlflow.enabled else None
    print(
        f"{kind}: {rows} train images, {workers} worker(s) x {micro} x {cfg.train.grad_accum} "
        f"accum, {steps_per_epoch} steps/epoch, {total_steps} steps; checkpoints in {run_dir}",
        flush=True,
    )
    meta = {
        "num_classes": num_classes,
        "class_names": info.class_names,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
        "init_weights": init_weights,
    }
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "meta": meta},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
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
        ),
    )
    if run_id is None:
        return Outcome(cfg, trainer.fit(), None, uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    # The driver's run context: system metrics of this node while training, the run marked
    # FAILED if training raises, FINISHED after the outcome is logged.
    with mlflow.start_run(run_id=run_id, log_system_metrics=True):
        result = trainer.fit()
        log_outcome(cfg, result, run_id, uri)
    return Outcome(cfg, result, run_id, uri)


def log_outcome(cfg: JobConfig, result: Any, run_id: str, uri: str) -> None:
    """Driver-side MLflow: the resolved config, the final and the best checkpoints."""
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
        client.set_tag(run_id, "best_val_top1", f"{metrics.get('val_top1', 0):.4f}")


def summary(outcome: Outcome) -> None:
    metrics = outcome.result.metrics or {}
    print(
        f"done: val top-1 {metrics.get('val_top1', float('nan')):.4f}, "
        f"checkpoint {outcome.result.checkpoint.path if outcome.result.checkpoint else None}"
    )
    if outcome.mlflow_run_id:
        print(f"MLflow run {outcome.mlflow_run_id} at {outcome.tracking_uri}")


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    print(yaml.safe_dump({"resolved config": cfg.model_dump(mode="json")}, sort_keys=False))
    summary(fit(cfg))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML file, e.g. jobs/configs/...")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable); values are YAML",
    )
