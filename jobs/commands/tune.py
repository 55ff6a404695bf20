"""`vitray tune --config ...`: a Ray Tune search of training runs (jobs/training/search/)."""

from __future__ import annotations

import argparse

import yaml

from jobs.config import add_config_arguments, load_config, shown
from jobs.tracking.mlflow_tracker import MlflowTracker
from jobs.training.search.driver import search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every job: --config and --set; the search is the config's tune:."""
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    print(yaml.safe_dump({"resolved config": shown(cfg)}, sort_keys=False))
    outcome = search(cfg, MlflowTracker(cfg.mlflow))
    print(f"best {cfg.tune.metric}: {outcome.best_metric:.4f} (MLflow run {outcome.best_run_id})")
    if outcome.registered is not None:
        v = outcome.registered
        print(f"registered models:/{v.name}/{v.version} (alias @{cfg.tune.alias})")
