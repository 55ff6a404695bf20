"""`vitray bench train`: is training data-bound, and what does Ray Train cost per step?

Three runs of the same model and batch, in one process:
1. `vitray pretrain`'s loop fed by the Ray Data pipeline (decode + crop + patchify live);
2. the same loop fed from the same data decoded once into memory (`materialize`);
3. the same training step in a plain loop over one in-memory batch (no Ray at all).
data_bound_ratio = 1 / 2 (1.0: the pipeline keeps up); overhead = per-step time of 2 minus 3,
and as a fraction of 3's. Like for like with `--workers 1` (one process, the same threads);
with more workers 2 adds DDP's all-reduce between processes, which 3 does not have.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch

from jobs.bench.common import write_result
from jobs.config import CONFIGS, load_config
from jobs.tracking.mlflow_tracker import MlflowTracker
from jobs.training.fit import fit
from jobs.training.loop import Handles, micro_batch_loss, optimizer_step
from jobs.training.optim import build_optimizer
from vit import ViT


def median_rate(outcome: Any, uri: str) -> float:
    """Median images/s over the run's reports (the first window holds the warm-up)."""
    from mlflow import MlflowClient

    history = MlflowClient(uri).get_metric_history(outcome.mlflow_run_id, "images_per_s")
    return statistics.median(m.value for m in history[1:] or history)


def plain_loop(cfg: Any, num_classes: int, steps: int) -> float:
    """The training step `vitray pretrain` runs (its loss, optimiser, schedule and
    clipping), on one batch held in memory: no Ray Train, no Ray Data, no reports."""
    vit = ViT(cfg.vit_config(num_classes))
    model = Handles(vit, None, vit)
    optimizer, scheduler = build_optimizer(vit, cfg.train, steps)
    n, patch_dim = vit.config.num_patches, vit.config.patch_dim
    batch = {
        "patches": torch.randint(0, 256, (cfg.train.batch_size, n, patch_dim), dtype=torch.uint8),
        "label": torch.randint(0, num_classes, (cfg.train.batch_size,)),
        "ok": torch.ones(cfg.train.batch_size, dtype=torch.bool),
    }
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _ = micro_batch_loss(model, batch, cfg, num_classes)
        loss.backward()
        optimizer_step(vit, optimizer, scheduler, cfg.train.grad_clip)
        times.append(time.perf_counter() - start)
    return cfg.train.batch_size / statistics.median(times[2:] or times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            f"data.dataset=builtin:photos?n={args.images}",
            f"data.image_size={args.size}",
            "data.hflip=true",
            "data.crop_scale=[0.08, 1.0]",
            "data.eval_crop_fraction=0.875",
            f"model.preset={args.preset}",
            f"train.batch_size={args.batch}",
            f"train.max_steps={args.steps}",
            "train.epochs=1000",
            "train.report_every=5",
            f"scaling.num_workers={args.workers}",
            f"run.storage_path={tmp}/runs",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            "mlflow.experiment=bench",
        ]
        live_cfg = load_config(CONFIGS / "demo-pretrain.yaml", [*sets, "run.name=live"])
        tracker = MlflowTracker(live_cfg.mlflow)
        live = fit(live_cfg, tracker)
        memory_cfg = load_config(CONFIGS / "demo-pretrain.yaml", [*sets, "run.name=memory"])
        memory = fit(memory_cfg, tracker, materialize=True)
        live_img_s = median_rate(live, tracker.uri)
        memory_img_s = median_rate(memory, tracker.uri)
    cfg = load_config(CONFIGS / "demo-pretrain.yaml", sets)
    torch.set_num_threads(args.workers)
    plain_img_s = plain_loop(cfg, 8, max(10, args.steps // 2))
    step_ray = args.batch / memory_img_s
    step_plain = args.batch / plain_img_s
    return write_result(
        {
            "benchmark": "train",
            "preset": args.preset,
            "image_size": args.size,
            "batch": args.batch,
            "workers": args.workers,
            "ray_data_img_s": round(live_img_s, 1),
            "in_memory_img_s": round(memory_img_s, 1),
            "plain_loop_img_s": round(plain_img_s, 1),
            "data_bound_ratio": round(live_img_s / memory_img_s, 3),
            "ray_train_overhead_s_per_step": round(step_ray - step_plain, 4),
            "ray_train_overhead_fraction": round(step_ray / step_plain - 1, 4),
        },
        args.json,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="ti/16")
    parser.add_argument("--size", type=int, default=64, help="image size")
    parser.add_argument("--images", type=int, default=2000, help="builtin:photos images")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--json", metavar="PATH", help="also write the result here")
