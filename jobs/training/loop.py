"""The training loop: pretraining, fine-tuning and every Tune trial share it.

`run_training` takes a `Runner`, the few things that differ between where it runs: Ray
Train calls `train_loop_per_worker(config)` on each worker (datasets built on the driver,
one shard per worker, DDP); a single-worker Tune trial runs the loop in the trial itself
(jobs/training/search.py); benchmarks run it in-process (jobs/training/inprocess.py).
Rank 0 alone logs metrics and writes checkpoints. Like Ray's examples, the pieces are an
optimiser step over micro-batches, an evaluation pass, a reporter and checkpointing.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from jobs.config import JobConfig
from jobs.training.evaluation import topk_correct
from jobs.training.mix import mix_batch
from jobs.training.optim import build_optimizer
from jobs.training.plan import TrainPlan
from jobs.training.report import Reporter, all_sum
from jobs.training.state import restore, save
from jobs.training.tracker import MetricsSink
from pipeline.dataset import fits_in_cache
from vit import Preprocessing, ViT
from vit.checkpoint import load_state_dict_checked


@dataclass
class Handles:
    """One model, three handles. `vit` is the module itself: its config, its normalisation
    and checkpoints with clean keys (compiling prefixes them with `_orig_mod.`). `ddp` is the
    DistributedDataParallel wrapper whose `no_sync` skips an all-reduce (None with one
    worker: Ray does not wrap then). `compute` is what the loop calls: compiled, DDP or bare.
    """

    vit: ViT
    ddp: torch.nn.parallel.DistributedDataParallel | None
    compute: torch.nn.Module


class CachedBatches:
    """An evaluation shard whose batches are kept after the first pass: a split that fits in
    the cache is deterministic, so later evaluations run no Ray Data execution (each took
    0.17-0.27 s on digits; the epoch under Ray Train stays ~1.7 s, bound by two DDP workers
    sharing the cores with the decode task, not by evaluation)."""

    def __init__(self, shard: Any) -> None:
        self.shard, self.batches = shard, None

    def iter_torch_batches(self, **kwargs: Any) -> Any:
        if self.batches is None:
            self.batches = list(self.shard.iter_torch_batches(**kwargs))
        return iter(self.batches)


def evaluate(model: torch.nn.Module, shard: Any, batch: int, device: torch.device) -> dict:
    """Top-1/top-5 over this worker's shard, summed over all workers."""
    model.eval()
    correct1 = correct5 = seen = skipped = 0.0
    with torch.no_grad():
        for b in shard.iter_torch_batches(batch_size=batch, device=device):
            ok = b["ok"]
            skipped += float((~ok).sum())
            if not ok.any():
                continue
            labels = b["label"][ok]
            top1, top5 = topk_correct(model(b["patches"][ok]), labels, (1, 5))
            correct1, correct5, seen = correct1 + top1, correct5 + top5, seen + len(labels)
    correct1, correct5, seen, skipped = all_sum([correct1, correct5, seen, skipped], device)
    model.train()
    return {
        "val_top1": correct1 / max(seen, 1),
        "val_top5": correct5 / max(seen, 1),
        "val_images": seen,
        "val_skipped": skipped,
    }


@dataclass
class Runner:
    """Where the loop runs: what it reads, where it reports, what it resumes from."""

    rank: int
    device: torch.device
    train: Any  # a Ray DataIterator or Dataset: anything with iter_torch_batches
    val: Any
    report: Callable[[dict[str, Any], Any], None]  # (metrics, checkpoint or None)
    make_checkpoint: Callable[[str], Any]  # a directory -> the runner's Checkpoint
    checkpoint: Any  # the checkpoint to resume from, or None
    metrics: MetricsSink | None = None  # rank 0's tracking
    progress: Callable[[str, bool], None] | None = None  # rank 0's (line, keep) to show
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    epoch_reports_only: bool = False  # Tune schedulers compare val_top1 at every report


def quiet_report_logs(level: str) -> None:
    """Ray Train 2.60 logs every report of every rank, in full, at INFO under a logger named
    after its source file: outside "ray.train", so RunConfig's LoggingConfig misses it."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    quiet_report_logs(JobConfig.model_validate(config["job"]).run.ray_train_log_level)
    rank = ray.train.get_context().get_world_rank()
    runner = Runner(
        rank=rank,
        device=ray.train.torch.get_device(),
        train=ray.train.get_dataset_shard("train"),
        val=ray.train.get_dataset_shard("val"),
        report=lambda metrics, checkpoint: ray.train.report(metrics, checkpoint=checkpoint),
        make_checkpoint=ray.train.Checkpoint.from_directory,
        checkpoint=ray.train.get_checkpoint(),
        metrics=config.get("metrics") if rank == 0 else None,
        progress=progress_to(config.get("progress")) if rank == 0 else None,
        prepare_model=ray.train.torch.prepare_model,
    )
    run_training(config, runner)


def progress_to(queue: Any) -> Callable[[str, bool], None] | None:
    """Lines into the driver's queue (jobs/training/progress.py), if it gave one."""
    if queue is None:
        return None

    def put(text: str, keep: bool) -> None:
        try:
            queue.put((text, keep), timeout=5)
        except Exception:  # a line lost never costs the training run
            pass

    return put


def initial_weights(plan: TrainPlan) -> dict[str, torch.Tensor] | None:
    """The fine-tune's starting weights: put in the object store once by the driver."""
    init = plan.init_weights
    return ray.get(init) if isinstance(init, ray.ObjectRef) else init


def epoch_batches(runner: Runner, cfg: JobConfig) -> Iterator[dict[str, torch.Tensor]]:
    return iter(
        runner.train.iter_torch_batches(
            batch_size=cfg.micro_batch,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            drop_last=True,
            device=runner.device,
            prefetch_batches=2,
        )
    )


def micro_batch_loss(
    model: Handles, b: dict[str, torch.Tensor], cfg: JobConfig, num_classes: int
) -> tuple[torch.Tensor, int, float]:
    """(loss, rows, skipped rows) of one micro-batch. A batch of only bad rows still runs
    forward and backward with zero weight: every DDP rank must, or the others hang."""
    ok = b["ok"]
    skipped = float((~ok).sum())
    weight = 1.0
    if not ok.any():
        ok, weight = torch.ones_like(ok), 0.0
    patches, labels = b["patches"][ok], b["label"][ok].clamp(min=0)
    raw = model.vit
    device = patches.device
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        patches, targets = mix_batch(
            raw.normalize(patches),
            labels,
            num_classes,
            raw.config.grid_size,
            cfg.train.mixup,
            cfg.train.cutmix,
            cfg.train.label_smoothing,
        )
        loss = weight * F.cross_entropy(model.compute(patches), targets)
    return loss, len(ok), skipped


def accumulate(
    model: Handles, batches: Iterator, cfg: JobConfig, num_classes: int, rep: Reporter
) -> int:
    """Forward and backward over up to `grad_accum` micro-batches; returns how many the
    epoch still had. DDP all-reduces on the last micro-batch of the step only, and the next
    one is fetched first to know which is last: an epoch that ends inside a step must still
    sync, or that step updates each replica with its own gradients and they drift apart."""
    accum = cfg.train.grad_accum
    b = rep.next_batch(batches)
    for i in range(accum):
        if b is None:
            return i
        after = rep.next_batch(batches) if i < accum - 1 else None
        sync = after is None or model.ddp is None
        with contextlib.nullcontext() if sync else model.ddp.no_sync():
            loss, rows, skipped = micro_batch_loss(model, b, cfg, num_classes)
            (loss / accum).backward()
        rep.loss_sum += loss.item()
        rep.images += rows
        rep.skipped += skipped
        b = after
    return accum


def optimizer_step(model: ViT, optimizer, scheduler, grad_clip: float) -> None:
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def report(
    metrics: dict, end_of_epoch: bool, runner: Runner, save_to: Callable[[Path], Path]
) -> None:
    """Hand the metrics to the runner, with a checkpoint from rank 0 at the end of an epoch
    (`save_to` writes it into a directory)."""
    if not end_of_epoch and runner.epoch_reports_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if end_of_epoch and runner.rank == 0:
            checkpoint = runner.make_checkpoint(str(save_to(Path(tmp))))
        runner.report(metrics, checkpoint)


def build_model(cfg: JobConfig, plan: TrainPlan, runner: Runner) -> tuple[Handles, Any, Any, int]:
    """The model on the runner's device with its optimiser and schedule, resumed from the
    runner's checkpoint. The model moves first: `Optimizer.load_state_dict` casts the state
    to the parameters' device as it loads, so state loaded before the move stays behind and
    the first step after a resume mixes devices."""
    vit = ViT(plan.vit)
    init = initial_weights(plan)
    if init is not None:
        load_state_dict_checked(vit, init)
    vit = vit.to(runner.device)
    optimizer, scheduler = build_optimizer(vit, cfg.train, plan.total_steps)
    step = restore(vit, optimizer, scheduler, runner.checkpoint)
    wrapped = runner.prepare_model(vit)
    ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
    compute = torch.compile(wrapped) if cfg.train.compile else wrapped
    return Handles(vit, ddp, compute), optimizer, scheduler, step


def run_training(config: dict[str, Any], runner: Runner) -> None:
    """Train from `config` ({"job": JobConfig dict, "plan": TrainPlan dict}) to the plan's
    last step, resuming from the runner's checkpoint."""
    cfg = JobConfig.model_validate(config["job"])
    plan = TrainPlan.from_dict(config["plan"])
    torch.manual_seed(cfg.train.seed + runner.rank)

    model, optimizer, scheduler, step = build_model(cfg, plan, runner)
    evaluated_as = Preprocessing(*cfg.data.eval_transform)

    def save_to(out: Path) -> Path:
        return save(
            model.vit,
            optimizer,
            scheduler,
            step,
            out,
            plan.class_names,
            plan.mlflow_run_id,
            evaluated_as,
        )

    val = runner.val
    if fits_in_cache(cfg.data, plan.val_rows):
        val = CachedBatches(runner.val)
    rep = Reporter(
        runner.rank,
        cfg.micro_batch,
        plan.steps_per_epoch,
        plan.total_steps,
        cfg.train.report_every,
        runner.metrics,
        runner.progress,
        step,
        runner.device,
    )
    model.compute.train()
    while step < plan.total_steps:
        batches = epoch_batches(runner, cfg)
        epoch_start = step
        while step < plan.total_steps:
            if not accumulate(model, batches, cfg, plan.num_classes, rep):
                break  # the epoch is over
            optimizer_step(model.vit, optimizer, scheduler, cfg.train.grad_clip)
            step += 1
            if rep.due(step):
                metrics = rep.metrics(step, scheduler.get_last_lr()[-1])
                end_of_epoch = rep.end_of_epoch(step)
                if end_of_epoch:
                    metrics.update(evaluate(model.compute, val, cfg.micro_batch, runner.device))
                rep.publish(metrics, step)
                report(metrics, end_of_epoch, runner, save_to)
                rep.reset()
        if step == epoch_start:
            raise RuntimeError(
                f"an epoch of rank {runner.rank} yielded no batch of {cfg.micro_batch} rows "
                f"({plan.train_rows} train rows over {cfg.scaling.num_workers} worker(s)); "
                "lower train.batch_size or train.grad_accum, or add data"
            )
