"""`vitray predict CHECKPOINT --input DATA --output DIR`: batch inference on Ray Data."""

from __future__ import annotations

import argparse

from jobs.commands.data_options import add_data_arguments, data_for
from jobs.config import MlflowSection
from jobs.inference.predict import predict
from jobs.tracking.checkpoints import local_checkpoint
from jobs.tracking.runs import tracking_uri
from vit import read_checkpoint_meta


def run(args: argparse.Namespace) -> None:
    uri = args.tracking_uri or tracking_uri(MlflowSection())
    with local_checkpoint(args.checkpoint, uri) as directory:
        meta = read_checkpoint_meta(directory)
        data = data_for(args.input, meta, args, cpus_per_task=args.cpus_per_task)
        predict(
            str(directory), data, args.output, args.split, args.top_k, args.batch_size, args.actors
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, runs:/..., models:/...")
    parser.add_argument("--input", required=True, help="shards, an image folder, builtin:...")
    parser.add_argument("--output", required=True, help="directory for the Parquet files")
    parser.add_argument("--split", default="all", help="a split name, or all (default)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", type=int, default=1, help="model replicas (one GPU each)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="decode task CPUs")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    add_data_arguments(parser)
