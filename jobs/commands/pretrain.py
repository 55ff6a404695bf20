"""`vitray pretrain|finetune --config ...`: one training run on Ray Train (jobs.training.fit)."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from jobs.config import add_config_arguments, load_config, shown
from jobs.secrets import redact
from jobs.tracking.mlflow_tracker import MlflowTracker
from jobs.training.fit import Outcome, fit


def checkpoint_uri(checkpoint: Any) -> str | None:
    """Where a Ray checkpoint lives, as a user would pass it on (`s3://bucket/...`: Ray's
    `path` drops the scheme of object storage)."""
    if checkpoint is None:
        return None
    scheme = {"s3": "s3://", "gcs": "gs://"}.get(checkpoint.filesystem.type_name, "")
    return scheme + checkpoint.path


def summary(outcome: Outcome, uri: str) -> None:
    metrics = outcome.result.metrics or {}
    print(
        f"done: val top-1 {metrics.get('val_top1', float('nan')):.4f}, "
        f"checkpoint {checkpoint_uri(outcome.result.checkpoint)}"
    )
    if outcome.mlflow_run_id:
        print(f"MLflow run {outcome.mlflow_run_id} at {redact(uri)}")


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    kind = args.command
    if kind == "finetune" and not cfg.init.checkpoint:
        raise ValueError("finetune needs init.checkpoint (--set init.checkpoint=REF)")
    print(yaml.safe_dump({"resolved config": shown(cfg)}, sort_keys=False))
    tracker = MlflowTracker(cfg.mlflow)
    summary(fit(cfg, tracker, kind), tracker.uri)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
