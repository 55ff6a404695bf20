"""`vitray evaluate CHECKPOINT --data ...`: accuracy, per-class accuracy and a confusion
matrix, streamed through the training pipeline's eval transforms, logged to MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.data_options import add_data_arguments, data_for
from jobs.config import MlflowSection
from jobs.inference.evaluation import confusion, predict_split, split_scores
from jobs.secrets import redact
from jobs.tracking import plots
from jobs.tracking.checkpoints import local_checkpoint
from jobs.tracking.runs import log_evaluation, new_run, tracking_uri
from vit import load_checkpoint, read_checkpoint_meta


def run(args: argparse.Namespace) -> None:
    """`vitray evaluate`: accuracy, per-class accuracy and the confusion matrix, in MLflow."""
    uri = args.tracking_uri or tracking_uri(MlflowSection())
    with local_checkpoint(args.checkpoint, uri) as checkpoint:
        meta = read_checkpoint_meta(checkpoint)
        model = load_checkpoint(checkpoint)
    data = data_for(args.data, meta, args)
    out = predict_split(model, data, args.split)
    n = model.config.num_classes
    names = meta.get("class_names") or [str(i) for i in range(n)]
    matrix = confusion(out["logits"], out["labels"], n)
    per_class = (matrix.diag() / matrix.sum(dim=1).clamp_min(1)).tolist()
    metrics = split_scores(out, args.split)
    for key, value in metrics.items():
        print(f"{key:>16} {value:.4f}" if value <= 1 else f"{key:>16} {value:.0f}")
    for name, acc in zip(names, per_class, strict=True):
        print(f"  class {name:>12}: {acc:.4f}")
        metrics[f"{args.split}_acc_class_{name}"] = acc
    run_id = args.mlflow_run or new_run(
        uri,
        args.experiment,
        f"evaluate {Path(str(checkpoint)).name}",
        {"vitray.kind": "evaluate", "vitray.checkpoint": args.checkpoint},
    )
    figure = plots.confusion_matrix(matrix.numpy(), names)
    figures = {f"evaluation/{args.split}_confusion_matrix.png": figure}
    log_evaluation(uri, run_id, metrics, figures, finish=args.mlflow_run is None)
    print(f"logged to MLflow run {run_id} at {redact(uri)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, runs:/..., models:/...")
    parser.add_argument("--data", required=True, help="a dataset (builtin:digits, a directory)")
    parser.add_argument("--split", default="test", help="split to score (default test)")
    add_data_arguments(parser)
    parser.add_argument("--mlflow-run", metavar="RUN_ID", help="log to this run, else a new one")
    parser.add_argument("--experiment", default="vitray-eval", help="experiment of a new run")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
