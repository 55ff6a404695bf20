"""The typed plan: what the driver works out once and every worker, trial or process reads.

Built on the driver from the config and the dataset's metadata (never from a Ray task),
shipped to Ray Train workers as a plain dict (`to_dict`) inside `train_loop_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.config import JobConfig
from jobs.training.start import Start, resized_start
from pipeline.dataset import describe_dataset
from vit import ViTConfig


@dataclass(frozen=True)
class TrainPlan:
    vit: ViTConfig  # the architecture trained (a fine-tune's: the resized checkpoint's)
    class_names: tuple[str, ...]
    split_rows: dict[str, int]  # rows of every split the dataset has
    steps_per_epoch: int
    total_steps: int
    mlflow_run_id: str | None = None  # rank 0 logs to it; stored in every checkpoint
    init_weights: Any = None  # a fine-tune's start: a state dict, or its Ray ObjectRef

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_rows(self) -> int:
        return self.split_rows["train"]

    @property
    def val_rows(self) -> int | None:
        return self.split_rows.get("val")

    def replace(self, **changes: Any) -> TrainPlan:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for Ray (shallow: the init weights are not copied)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "vit": self.vit.to_dict(), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainPlan:
        return cls(
            **{
                **d,
                "vit": ViTConfig.from_dict(d["vit"]),
                "class_names": tuple(d["class_names"]),
            }
        )


def make_plan(
    cfg: JobConfig,
    start: Start | None = None,
    fetch: Callable[[str, str], Path] | None = None,
    workdir: str = "",
) -> tuple[TrainPlan, Start | None]:
    """The plan of `cfg`, and a fine-tune's start: `start` when given (Tune trials share the
    driver's), else `init.checkpoint` fetched with `fetch(ref, workdir)` and resized."""
    info = describe_dataset(cfg.data)
    if not info.class_names:
        raise ValueError(f"{cfg.data.dataset}: class names unknown; prepare it with vitray prepare")
    if len(info.class_names) < 2:
        raise ValueError(
            f"{cfg.data.dataset} has {len(info.class_names)} class {info.class_names}: "
            "training needs 2 at least"
        )
    if cfg.init.checkpoint and start is None:
        if fetch is None:
            raise ValueError("init.checkpoint needs a checkpoint resolver")
        start = resized_start(cfg, info.class_names, fetch, workdir)
    empty = [split for split in ("train", "val") if info.split_rows.get(split) == 0]
    if empty:
        raise ValueError(f"{cfg.data.dataset}: the {empty[0]} split has no rows")
    rows = info.split_rows.get("train")
    if not rows:
        raise ValueError(f"{cfg.data.dataset}: the train split size is unknown")
    check_rows_per_worker(cfg, rows)
    # an epoch ending inside an accumulation still steps, on what it has
    micro_batches = rows // cfg.scaling.num_workers // cfg.micro_batch
    steps_per_epoch = max(1, math.ceil(micro_batches / cfg.train.grad_accum))
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    plan = TrainPlan(
        vit=start.config if start is not None else cfg.vit_config(len(info.class_names)),
        class_names=tuple(info.class_names),
        split_rows=dict(info.split_rows),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    return plan, start


def check_rows_per_worker(cfg: JobConfig, rows: int) -> None:
    """Every worker must get at least one micro-batch an epoch (batches drop their ragged
    end), or training would wait for data that never comes."""
    workers, micro = cfg.scaling.num_workers, cfg.micro_batch
    if rows // workers < micro:
        raise ValueError(
            f"{cfg.data.dataset}: {rows} train rows over {workers} worker(s) make "
            f"{rows // workers} per worker, fewer than one micro-batch of {micro} "
            f"(train.batch_size {cfg.train.batch_size} / scaling.num_workers {workers} / "
            f"train.grad_accum {cfg.train.grad_accum}): lower train.batch_size or "
            "scaling.num_workers, or add data"
        )
