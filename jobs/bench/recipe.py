"""`vitray bench recipe`: the paper's recipe against its baseline on real data, scored on
Fashion-MNIST's held-out test split: pretrain at 16 px then fine-tune at 28 px (position
embeddings interpolated), against training at 28 px from scratch, each for several seeds,
with the wall time of each, beside the published Fashion-MNIST baselines."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.bench.common import write_result
from jobs.bench.finetune import summarize
from jobs.config import CONFIGS, JobConfig, load_config
from jobs.inference.evaluation import evaluate_checkpoint
from jobs.tracking.mlflow_tracker import MlflowTracker
from jobs.training.inprocess import train_in_process
from jobs.training.start import resized_start
from pipeline.dataset import describe_dataset, ensure_prepared

# test top-1 published with the dataset (zalandoresearch/fashion-mnist's benchmark table)
PUBLISHED = {"sklearn_best_classical": 0.897, "small_cnn": "0.91-0.92", "resnet18": 0.949}


def trained(cfg: JobConfig, keep: Path, start: Any = None) -> tuple[float, float]:
    """(test top-1, seconds) of training `cfg` in this process."""
    began = time.monotonic()
    train_in_process(cfg, start=start, keep=keep)
    seconds = time.monotonic() - began
    return evaluate_checkpoint(keep, cfg.data, "test")["test_top1"], seconds


def config(name: str, sets: list[str]) -> JobConfig:
    return load_config(CONFIGS / f"fashion-mnist-{name}.yaml", sets)


def run(args: argparse.Namespace) -> dict[str, Any]:
    dataset = ensure_prepared("builtin:fashion-mnist")
    common = [f"data.dataset={dataset}", "mlflow.enabled=false"]
    if args.smoke:
        common.append("smoke=true")
    scores: dict[str, list[float]] = {"scratch": [], "recipe": [], "pretrain_only": []}
    seconds: dict[str, list[float]] = {"scratch": [], "recipe": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            seeded = [*common, f"train.seed={seed}"]
            scratch = config("scratch", [*seeded, f"train.epochs={args.scratch_epochs}"])
            top1, s = trained(scratch, Path(tmp) / f"scratch-{seed}")
            scores["scratch"].append(top1)
            seconds["scratch"].append(s)
            print(f"seed {seed} scratch at 28 px: test top-1 {top1:.4f} in {s:.0f} s", flush=True)
            pre = config("pretrain", [*seeded, f"train.epochs={args.pretrain_epochs}"])
            pre_top1, pre_s = trained(pre, Path(tmp) / f"pre-{seed}")
            scores["pretrain_only"].append(pre_top1)
            ft = config(
                "finetune",
                [
                    *seeded,
                    f"train.epochs={args.finetune_epochs}",
                    f"init.checkpoint={Path(tmp) / f'pre-{seed}'}",
                ],
            )
            fetch = MlflowTracker(ft.mlflow).fetch_checkpoint
            classes = describe_dataset(ft.data).class_names
            start = resized_start(ft, classes, fetch, f"{tmp}/ft-{seed}")
            top1, ft_s = trained(ft, Path(tmp) / f"ft-{seed}", start=start)
            scores["recipe"].append(top1)
            seconds["recipe"].append(pre_s + ft_s)
            print(
                f"seed {seed} recipe: 16 px test top-1 {pre_top1:.4f} ({pre_s:.0f} s), "
                f"28 px fine-tune {top1:.4f} ({ft_s:.0f} s)",
                flush=True,
            )
    result = {
        "benchmark": "recipe",
        "dataset": "builtin:fashion-mnist (test split, 10,000 images)",
        "scratch": {"image_size": 28, "epochs": args.scratch_epochs},
        "recipe": {
            "pretrain": {"image_size": 16, "epochs": args.pretrain_epochs},
            "finetune": {"image_size": 28, "epochs": args.finetune_epochs},
        },
        "test_top1": {name: summarize(values) for name, values in scores.items()},
        "seconds": {name: summarize(values) for name, values in seconds.items()},
        "published_test_top1": PUBLISHED,
    }
    result["recipe_minus_scratch"] = round(
        result["test_top1"]["recipe"]["mean"] - result["test_top1"]["scratch"]["mean"], 4
    )
    return write_result(result, args.json)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scratch-epochs", type=int, default=10)
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds from this one on")
    parser.add_argument("--smoke", action="store_true", help="20 steps each: checks it runs")
    parser.add_argument("--json", metavar="PATH", help="also write the result here")
