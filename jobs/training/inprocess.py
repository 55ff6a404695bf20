"""The training loop in this process, without Ray Train: benchmarks and quick experiments.

The data still streams through Ray Data (a local Ray is started when none is running); the
loop is the one every job runs (jobs/training/loop.py), on one device, reporting to a list.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from jobs.cluster.raynode import ensure_ray
from jobs.config import JobConfig
from jobs.training.fit import build_datasets
from jobs.training.loop import Runner, run_training
from jobs.training.plan import make_plan
from jobs.training.start import Start, data_for_start
from pipeline.console import ConsoleLine


def train_in_process(
    cfg: JobConfig, start: Start | None = None, keep: Path | None = None
) -> list[dict[str, Any]]:
    """Train `cfg` here, untracked, from `start` (a fine-tune's resized checkpoint) when
    given; returns every per-epoch report (val_top1 included). `keep`: where the last
    epoch's checkpoint is copied."""
    ensure_ray()
    plan, start = make_plan(cfg, start=start)
    cfg = data_for_start(cfg, start)
    plan = plan.replace(init_weights=start.state if start else None)
    datasets = build_datasets(cfg, plan)
    reports: list[dict[str, Any]] = []
    runner = Runner(
        rank=0,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        train=datasets["train"],
        val=datasets["val"],
        val_subset=datasets.get("val_subset"),
        report=lambda metrics, checkpoint: reports.append(metrics),
        make_checkpoint=lambda d: keep and shutil.copytree(d, keep, dirs_exist_ok=True),
        checkpoint=None,
        progress=ConsoleLine().show,
        epoch_reports_only=True,
    )
    run_training({"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner)
    return reports
