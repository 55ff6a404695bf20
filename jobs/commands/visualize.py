"""`vitray visualize CHECKPOINT`: the paper's Figures 6 and 7 for any checkpoint, as PNG
files and (optionally) artifacts of an MLflow run."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.data_options import add_data_arguments, data_for
from jobs.config import MlflowSection
from jobs.tracking.checkpoints import local_checkpoint
from jobs.tracking.figures import log_figures
from jobs.tracking.runs import tracking_uri
from vit import read_checkpoint_meta


def run(args: argparse.Namespace) -> None:
    uri = args.tracking_uri or tracking_uri(MlflowSection())
    with local_checkpoint(args.checkpoint, uri) as checkpoint:
        data = None
        if args.data:
            data = data_for(args.data, read_checkpoint_meta(checkpoint), args)
        written = log_figures(checkpoint, data, args.mlflow_run, uri, Path(args.out))
    for path in written:
        print(f"wrote {path}")
    if args.mlflow_run:
        print(f"logged {len(written)} figures to MLflow run {args.mlflow_run} (figures/)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, runs:/..., models:/...")
    parser.add_argument("--data", help="dataset for the attention figures (e.g. builtin:digits)")
    parser.add_argument("--out", default="figures", help="output directory (default figures/)")
    parser.add_argument("--mlflow-run", metavar="RUN_ID", help="also log the PNGs to this run")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    add_data_arguments(parser)
