"""`vitray bench finetune`: does interpolating the position embeddings keep what
pretraining learned? (the paper, section 3.2)

Pretrain once on digits at 16 px, then at 32 px and equal budget (same steps, same
recipe, several seeds each): fine-tune with the posemb 2-D interpolated, fine-tune with
the posemb re-initialised (everything else pretrained), and train from scratch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from jobs.bench.common import write_result
from jobs.config import CONFIGS, load_config
from jobs.tracking.mlflow_tracker import MlflowTracker
from jobs.training.inprocess import train_in_process
from jobs.training.start import Start, resized_start
from pipeline.dataset import describe_dataset, ensure_prepared
from vit import ViT


def with_fresh_posemb(start: Start, seed: int) -> Start:
    """The same start with the position embeddings drawn anew (std 0.02, as at init)."""
    state = dict(start.state)
    generator = torch.Generator().manual_seed(seed)
    shape = state["pos_embed"].shape
    state["pos_embed"] = torch.randn(shape, generator=generator) * 0.02
    return Start(start.config, state, start.directory, {**start.tags, "posemb": "re-initialised"})


def from_scratch(start: Start, seed: int) -> Start:
    """The same architecture at 32 px, freshly initialised."""
    torch.manual_seed(seed)
    return Start(start.config, ViT(start.config).state_dict(), start.directory, {})


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "runs": [round(v, 4) for v in values],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    dataset = ensure_prepared("builtin:digits")
    common = [f"data.dataset={dataset}", "mlflow.enabled=false", "scaling.num_workers=1"]
    with tempfile.TemporaryDirectory() as tmp:
        pre_cfg = load_config(
            CONFIGS / "demo-pretrain.yaml", [*common, f"train.epochs={args.pretrain_epochs}"]
        )
        print(f"pretraining at 16 px for {args.pretrain_epochs} epochs", flush=True)
        pre = train_in_process(pre_cfg, keep=Path(tmp) / "pretrained")
        tune_sets = [
            *common,
            f"train.epochs={args.epochs}",
            f"train.lr={args.lr}",
            "scaling.cpus_per_worker=1",
        ]
        ft_cfg = load_config(
            CONFIGS / "demo-finetune.yaml",
            [*tune_sets, f"init.checkpoint={Path(tmp) / 'pretrained'}"],
        )
        info = describe_dataset(ft_cfg.data)
        fetch = MlflowTracker(ft_cfg.mlflow).fetch_checkpoint
        start = resized_start(ft_cfg, info.class_names, fetch, f"{tmp}/ft")
        finals: dict[str, list[float]] = {"interpolated": [], "reinit_posemb": [], "scratch": []}
        for seed in range(args.seeds):
            cfg = ft_cfg.model_copy(
                update={"train": ft_cfg.train.model_copy(update={"seed": seed})}
            )
            starts = {
                "interpolated": start,
                "reinit_posemb": with_fresh_posemb(start, seed),
                "scratch": from_scratch(start, seed),
            }
            for name, begin in starts.items():
                reports = train_in_process(cfg, start=begin)
                finals[name].append(reports[-1]["val_top1"])
                print(f"seed {seed} {name}: val top-1 {reports[-1]['val_top1']:.4f}", flush=True)
    result = {
        "benchmark": "finetune",
        "dataset": "builtin:digits",
        "pretrain": {
            "image_size": 16,
            "epochs": args.pretrain_epochs,
            "val_top1": round(pre[-1]["val_top1"], 4),
        },
        "finetune": {"image_size": 32, "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds},
        "val_top1": {name: summarize(values) for name, values in finals.items()},
    }
    means = result["val_top1"]
    result["interpolated_minus_reinit"] = round(
        means["interpolated"]["mean"] - means["reinit_posemb"]["mean"], 4
    )
    result["interpolated_minus_scratch"] = round(
        means["interpolated"]["mean"] - means["scratch"]["mean"], 4
    )
    return write_result(result, args.json)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tune epochs (each variant)")
    parser.add_argument("--lr", type=float, default=0.05, help="fine-tune SGD lr")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the result here")
