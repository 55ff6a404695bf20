"""`vitray demo` (`make demo`): the paper's recipe end to end on real digits, on a laptop.

Prepare builtin:digits, pretrain at 16 px, fine-tune at 32 px through a small ASHA search
whose start is the pretrained run's best checkpoint (an MLflow URI), register the best
trial's model as digits-vit@champion, score it on the held-out test split, then print the
numbers, the run links and the command that opens the MLflow UI.
"""

from __future__ import annotations

import argparse
import time

from jobs.cluster.raynode import ensure_ray
from jobs.config import CONFIGS, load_config
from jobs.secrets import redact
from jobs.tracking import runs
from jobs.tracking.mlflow_tracker import MlflowTracker
from jobs.training.fit import fit
from jobs.training.search.driver import search
from pipeline.dataset import ensure_prepared


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)}"
    return f".venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    dataset = ensure_prepared("builtin:digits")
    ensure_ray()
    stamp = time.strftime("%Y%m%d-%H%M%S")  # each demo makes new runs; --set run.name wins
    common = [f"data.dataset={dataset}", *args.set]
    pretrain_cfg = load_config(
        CONFIGS / "demo-pretrain.yaml", [f"run.name=demo-pretrain-{stamp}", *common]
    )
    pretrained = fit(pretrain_cfg, MlflowTracker(pretrain_cfg.mlflow))
    source = f"runs:/{pretrained.mlflow_run_id}/checkpoint/best"
    tune_cfg = load_config(
        CONFIGS / "demo-tune.yaml",
        [f"run.name=demo-tune-{stamp}", f"init.checkpoint={source}", *common],
    )
    tracker = MlflowTracker(tune_cfg.mlflow)
    tuned = search(tune_cfg, tracker)

    uri = tracker.uri
    experiment, best_metrics = runs.experiment_and_metrics(uri, tuned.best_run_id)
    minutes = (time.monotonic() - started) / 60
    print(f"\nvitray demo finished in {minutes:.1f} min")
    print(f"  pretrain 16 px   val top-1 {pretrained.result.metrics['val_top1']:.4f}")
    pick = tuned.config.tune.select
    print(f"  fine-tune 32 px  val top-1 {tuned.best_metric:.4f} (the search's pick: {pick})")
    print(f"  test top-1       {best_metrics.get('test_top1', float('nan')):.4f}")
    if tuned.registered is not None:
        v = tuned.registered
        print(f"  registered       models:/{v.name}/{v.version} (@{tuned.config.tune.alias})")
    print(f"  experiment       {runs.experiment_url(uri, experiment)}")
    print(f"  pretrain run     {runs.run_url(uri, experiment, pretrained.mlflow_run_id)}")
    print(f"  search run       {runs.run_url(uri, experiment, tuned.parent_run_id)}")
    print(f"  best trial run   {runs.run_url(uri, experiment, tuned.best_run_id)}")
    print(f"open the MLflow UI: {ui_command(uri)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a key of both demo configs (e.g. mlflow.experiment=mine)",
    )
