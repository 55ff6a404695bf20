"""`build_dataset(cfg, split)`: a streaming Ray Dataset of uint8 patches and labels.

The driver plans read units from metadata alone (`pipeline.readers`: a Parquet row group of
~8 MB, a WebDataset tar, a chunk of image files; a prepared dataset's manifest gives every
row group's rows and bytes, so no file is opened) and groups consecutive row groups into
tasks of `data.task_bytes` (64 MB). A task carries only its units (paths, row groups); it
reads, decodes, crops, flips and patchifies one unit at a time at an explicit CPU fraction
and yields it `decode_batch_size` rows at a time. For training, tasks come in a new random
order every epoch, and the units of a task and the rows of a unit too. Consumers iterate
with a local shuffle buffer and normalise on the device.

Why not `ray.data.read_parquet` + `map_batches`: on Ray 2.60 it packs row groups into
128 MB read units (one task decoded a whole 60 MB shard while the other core idled) and
lists files in a 1-CPU task, which never starts once train workers hold the CPUs of a
small node (measured: a 2-core pipeline hung). One task per 8 MB row group would make
about 190,000 tasks of 14M images (1.5 TB), and one per small shard as many as shards.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import torch

from pipeline.config import DataConfig
from pipeline.prepare import prepare
from pipeline.readers import (
    Unit,
    batches,
    carve_units,
    cut,
    open_source,
    plan_tasks,
    plan_units,
    read_unit,
    sample_units,
    task_source,
)
from pipeline.sources import Source, SourceError, data_home
from pipeline.transforms import preprocess_batch

# A validation split whose patches fit in this many bytes is read once by each training
# worker, which keeps its batches (jobs.training.loop.CachedBatches): it is deterministic, so
# evaluations after the first need no Ray Data execution.
CACHE_EVAL_BYTES = 64 * 2**20
SUBSET_SEED = 0  # the val subset is one fixed sample, whatever the run's seed


@dataclass
class DatasetInfo:
    """What a trainer needs to know before streaming, from metadata only."""

    source: Source
    class_names: list[str] | None  # None: unknown (a WebDataset, a Parquet label without names)
    # rows of each split there is (a row may still be a bad image); a split without files is
    # absent, one whose size needs reading every file (WebDataset) too
    split_rows: dict[str, int]
    val_from: str = "val"  # which rows validate: the source's val, a carve of train, a split


def ensure_prepared(spec: str) -> str:
    """Built-in datasets are prepared once under $VITRAY_DATA (default ./data)."""
    if not spec.startswith("builtin:"):
        return spec
    name = "".join(c if c.isalnum() else "-" for c in spec.removeprefix("builtin:")).strip("-")
    out = data_home() / "builtin" / name
    if not (out / "manifest.json").is_file():
        prepare(spec, out)
    return str(out)


def check_sizes(cfg: DataConfig, patch_size: int) -> None:
    h, w = cfg.size_hw
    if h % patch_size or w % patch_size:
        raise ValueError(f"data.image_size {h}x{w} is not a multiple of patch size {patch_size}")


def val_from(cfg: DataConfig, source: Source) -> str:
    """Which rows validate, in words: the source's val split, a seeded carve of train
    (data.val_fraction) or another split (data.val_split). Checked here, on the driver."""
    if cfg.val_fraction is not None:
        if "val" in source.splits:
            raise SourceError(
                f"{cfg.dataset} has a val split; data.val_fraction carves one only where "
                "there is none"
            )
        return f"train, carved (val_fraction {cfg.val_fraction}, seed {cfg.val_seed})"
    if cfg.val_split is not None:
        if cfg.val_split == "train":
            raise SourceError("data.val_split: train would validate on the training rows")
        source.split_files(cfg.val_split)  # raises naming the splits there are
        if cfg.val_split == "test":
            warnings.warn(
                f"{cfg.dataset}: validating on the test split (data.val_split: test); its "
                "scores stop being a held-out estimate once they pick checkpoints or "
                "hyperparameters",
                stacklevel=2,
            )
        return f"split {cfg.val_split}"
    return "val"


def split_units(cfg: DataConfig, source: Source, split: str) -> list[Unit]:
    """The read units of a split as a job sees it: train and val carved from train with
    data.val_fraction, val read from data.val_split, any other split as it is."""
    if cfg.val_fraction is not None and split in ("train", "val"):
        return carve_units(source, cfg.val_fraction, cfg.val_seed)[split]
    if cfg.val_split is not None and split == "val":
        split = cfg.val_split
    return plan_units(source, source.split_files(split))


def describe_dataset(cfg: DataConfig) -> DatasetInfo:
    """Classes and split sizes from metadata only: a manifest, Parquet footers, a listing."""
    spec = ensure_prepared(cfg.dataset)
    source = open_source(spec, cfg.image_column, cfg.label_column, cfg.label_field)
    where = val_from(cfg, source)
    names = set(source.split_names()) | ({"val"} if where != "val" else set())
    rows = {}
    for split in sorted(names):
        units = split_units(cfg, source, split)
        rows[split] = sum(u["rows"] for u in units) if all(u["rows"] >= 0 for u in units) else None
    known = {split: n for split, n in rows.items() if n is not None}
    return DatasetInfo(source, source.class_names, known, where)


def load_tasks(
    batch: dict[str, np.ndarray], source: Source, chunk_rows: int, **kwargs: Any
) -> Iterator[dict[str, np.ndarray]]:
    """Ray task body: read the units of the batch's tasks one at a time and yield their rows
    preprocessed, `chunk_rows` at a time, so that consumers start on a unit before the
    next is read."""
    # One image at a time: intra-op threads only oversubscribe the cores that the other
    # decode tasks use (measured 5x slower at 0.5 CPU per task on 2 cores).
    torch.set_num_threads(1)
    rng = np.random.default_rng()
    for task in batch["units"]:
        units = json.loads(task)
        if kwargs["train"]:  # a new order every epoch, free: a task's units are listed
            units = [units[i] for i in rng.permutation(len(units))]
        yield from unit_chunks(source, units, chunk_rows, rng, **kwargs)


def unit_chunks(
    source: Source, units: list[Unit], chunk_rows: int, rng: np.random.Generator, **kwargs: Any
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `units` in turn, preprocessed `chunk_rows` at a time (`preprocess_batch`'s
    keyword arguments in `kwargs`)."""
    for unit in units:
        rows = read_unit(source, unit)
        if kwargs["train"]:  # a new row order every epoch, free: the unit is in memory
            order = rng.permutation(len(rows["label"]))
            rows = {key: column[order] for key, column in rows.items()}
        for chunk in batches(rows, chunk_rows):
            yield preprocess_batch(chunk, **kwargs)


def first_rows(cfg: DataConfig, split: str, patch_size: int, n: int) -> dict[str, np.ndarray]:
    """Up to `n` rows of `split`, from its first units in plan order, preprocessed as the
    eval pipeline does but read in this process, labels unchecked: a figure's handful of
    images without a dataset on the cluster. A unit of known size is cut to `n` rows
    first (a folder unit is 256 files); a tar, whose rows are counted by reading it, is
    read whole."""
    info = describe_dataset(cfg)
    tasks = plan_split(cfg, info, split)
    units = [cut(unit, n) if unit["rows"] >= 0 else unit for task in tasks for unit in task]
    kwargs = dict(cfg=cfg, patch_size=patch_size, train=False)
    chunks, rows = [], 0
    for chunk in unit_chunks(info.source, units, n, np.random.default_rng(), **kwargs):
        chunks.append(chunk)
        rows += len(chunk["label"])
        if rows >= n:
            break
    if not chunks:
        raise SourceError(f"{cfg.dataset} split {split!r} has no rows")
    return {key: np.concatenate([c[key] for c in chunks])[:n] for key in chunks[0]}


def decode_slots(cfg: DataConfig) -> int:
    """Decode tasks that run at once: the cluster's CPUs (this machine's before Ray starts)
    over each task's CPU fraction."""
    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count()
    return max(1, int((cpus or 1) / cfg.cpus_per_task))


def task_bytes(cfg: DataConfig, total_bytes: int) -> int:
    """`data.task_bytes`, or less on a small split: two tasks per decode slot at least, so
    that every core has work and none waits on the last long task."""
    return max(1, min(cfg.task_bytes, total_bytes // (2 * decode_slots(cfg))))


def plan_split(
    cfg: DataConfig, info: DatasetInfo, split: str, subset: int | None = None
) -> list[list[Unit]]:
    """The tasks of a split (of a `subset` of its rows), from metadata only."""
    units = split_units(cfg, info.source, split)
    if not units or info.split_rows.get(split) == 0:
        files = info.source.split_files(split if split in info.source.splits else "all")
        raise SourceError(f"{cfg.dataset} split {split!r} has no rows: {files[:4]}")
    if subset is not None:
        units = sample_units(units, subset, SUBSET_SEED)
    return plan_tasks(units, task_bytes(cfg, sum(max(unit["bytes"], 0) for unit in units)))


def build_dataset(
    cfg: DataConfig,
    split: str,
    patch_size: int,
    num_classes: int | None = None,
    keep_ids: bool = False,
    check_labels: bool = True,
    subset: int | None = None,
) -> ray.data.Dataset:
    """A lazy, streaming dataset of {patches (B, N, P*P*C) uint8, label, ok[, id]}.

    Training splits get random crops and flips and a new unit order every epoch; other
    splits get the deterministic resize + center crop. `subset` rows: the same seeded
    sample of the split on every call (`sample_units`). Bad configuration and bad paths
    fail here, on the driver, before any Ray task runs.
    """
    check_sizes(cfg, patch_size)
    info = describe_dataset(cfg)
    tasks = plan_split(cfg, info, split, subset)
    if not check_labels:  # inference: labels pass through as they are, even none (-1)
        num_classes = None
    elif num_classes is None and info.class_names is not None:
        num_classes = len(info.class_names)
    train = split == "train"
    ds = ray.data.from_items(
        [{"units": json.dumps(task)} for task in tasks], override_num_blocks=len(tasks)
    )
    if train:
        ds = ds.randomize_block_order()  # a new order on every execution, i.e. every epoch
    with warnings.catch_warnings():
        # Ray 2.60 deprecates map_batches' **ray_remote_args but has no named parameter for
        # a scheduling strategy, the one way to keep data tasks in a trial's group.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            load_tasks,
            fn_kwargs=dict(
                source=task_source(info.source),
                chunk_rows=cfg.decode_batch_size,
                cfg=cfg,
                patch_size=patch_size,
                train=train,
                num_classes=num_classes,
                keep_ids=keep_ids,
            ),
            batch_format="numpy",
            batch_size=1,
            num_cpus=cfg.cpus_per_task,
            **placement_args(),
        )
    # Ray Data reserves half of the CPUs for its operators in turn; with one map operator
    # that left a single decode task running on 2 cores (measured 533 img/s; 821 without).
    ds.context.op_resource_reservation_enabled = False
    # Ray Data buffers a task's output until it exceeds this size (128 MB by default) and
    # slices blocks above 1.5x it: capped so that each chunk the task yields is one block.
    h, w = cfg.size_hw
    row_bytes = h * w * cfg.channels + 9  # patches, int64 label, bool ok
    chunk_bytes = int(0.8 * cfg.decode_batch_size * row_bytes)
    limit = ds.context.target_max_block_size
    ds.context.target_max_block_size = min(limit, chunk_bytes) if limit else chunk_bytes
    return ds


def quiet_progress(ds: ray.data.Dataset) -> ray.data.Dataset:
    """No progress bars and no 'Starting execution' / 'Execution plan' log lines: jobs print
    one progress line per report, and a Ray Train dataset executes once per epoch (two
    lines each, per epoch, in the demo's log before)."""
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    return ds


def fits_in_cache(cfg: DataConfig, rows: int | None) -> bool:
    """Whether `rows` images of patches (uint8: a byte per pixel and channel) fit in
    `CACHE_EVAL_BYTES`; unknown row counts never do."""
    h, w = cfg.size_hw
    return rows is not None and rows * h * w * cfg.channels <= CACHE_EVAL_BYTES


def placement_args() -> dict[str, Any]:
    """Inside a placement group (a Tune trial), keep the data tasks in it. Ray Data
    schedules with SPREAD otherwise, outside the group, where a small node has no CPU left
    and the trial waits forever."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.get_current_placement_group()
    if group is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group)}
