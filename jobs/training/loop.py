"""The training loop: pretraining, fine-tuning and every Tune trial share it.

`run_training` takes a `Runner`, the few things that differ between where it runs: Ray
Train calls `train_loop_per_worker(config)` on each worker (datasets built on the driver,
one shard per worker, DDP); a single-worker Tune trial runs the loop in the trial itself
(jobs/training/search/); benchmarks run it in-process (jobs/training/inprocess.py).
Rank 0 alone logs metrics and writes checkpoints. Like Ray's examples, the pieces are an
optimiser step over micro-batches, an evaluation pass, a reporter and checkpointing.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from jobs.config import JobConfig
from jobs.training.mfu import device_peak_flops
from jobs.training.mix import mix_batch
from jobs.training.optim import build_optimizer
from jobs.training.plan import TrainPlan
from jobs.training.report import Reporter, all_sum
from jobs.training.staging import remove_orphans, staging_dir
from jobs.training.state import restore, save
from jobs.training.tracker import MetricsSink
from pipeline.dataset import fits_in_cache
from vit import Preprocessing, ViT, forward_flops
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
    """Top-1/top-5 over this worker's shard, summed over all workers. Counts stay on the
    device until the end: bad rows (zero patches) run through the model and are masked out
    of the counts, as they are out of the training loss."""
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top-1, top-5, seen, skipped
    with torch.no_grad():
        for b in shard.iter_torch_batches(batch_size=batch, **device_copies(device)):
            ok = b["ok"]
            with autocast(device):  # the training precision: bf16 on CUDA
                logits = model(b["patches"])
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
            hits = (top == b["label"][:, None]) & ok[:, None]
            counts += torch.stack(
                [hits[:, :1].any(1).sum(), hits.any(1).sum(), ok.sum(), (~ok).sum()]
            )
    correct1, correct5, seen, skipped = all_sum(list(counts), device)
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
    # part of val evaluated at the end of each epoch but the last (data.val_subset)
    val_subset: Any = None
    metrics: MetricsSink | None = None  # rank 0's tracking
    progress: Callable[[str, bool], None] | None = None  # rank 0's (line, keep) to show
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    epoch_reports_only: bool = False  # Tune schedulers compare val_top1 at every report
    # `report` returns before the checkpoint is uploaded, and the uploader deletes its
    # directory once done (Ray's ASYNC mode); otherwise the loop deletes it after `report`
    uploads_in_background: bool = False


def cluster_peak_flops(device: torch.device) -> float | None:
    """The summed bf16 peak of every rank's card; None when any is a CPU or an unknown card
    (a collective: every rank calls it)."""
    peak = device_peak_flops(device)
    total, unknown = all_sum([peak or 0.0, 0.0 if peak else 1.0], device)
    return total if unknown == 0 else None


def quiet_report_logs(level: str) -> None:
    """Ray Train 2.60 logs every report of every rank, in full, at INFO under a logger named
    after its source file: outside "ray.train", so RunConfig's LoggingConfig misses it."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    cfg = JobConfig.model_validate(config["job"])
    quiet_report_logs(cfg.run.ray_train_log_level)
    rank = ray.train.get_context().get_world_rank()
    runner = Runner(
        rank=rank,
        device=ray.train.torch.get_device(),
        train=ray.train.get_dataset_shard("train"),
        val=ray.train.get_dataset_shard("val"),
        val_subset=ray.train.get_dataset_shard("val_subset") if cfg.data.val_subset else None,
        report=report_to_ray_train,
        make_checkpoint=ray.train.Checkpoint.from_directory,
        checkpoint=ray.train.get_checkpoint(),
        metrics=config.get("metrics") if rank == 0 else None,
        progress=progress_to(config.get("progress")) if rank == 0 else None,
        prepare_model=lambda model: ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs=DDP_OPTIONS
        ),
        uploads_in_background=True,
    )
    run_training(config, runner)


def report_to_ray_train(metrics: dict[str, Any], checkpoint: Any) -> None:
    """Ray's ASYNC mode: rank 0's checkpoint uploads in a background thread while training
    goes on, and Ray deletes the local directory once it is stored. Reports without a
    checkpoint go the same way: Ray delivers reports in order, so a synchronous one would
    wait for the upload before it."""
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        delete_local_checkpoint_after_upload=True,
    )


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


def device_copies(device: torch.device) -> dict[str, Any]:
    """`iter_torch_batches` arguments that put batches on `device`. On CUDA, Ray Data pins
    each batch in host memory, so that its copy to the GPU runs without blocking (Ray copies
    with non_blocking=True) and overlaps the step; CPU memory cannot be pinned without CUDA."""
    return {"device": device, "pin_memory": device.type == "cuda"}


def epoch_batches(runner: Runner, cfg: JobConfig) -> Iterator[dict[str, torch.Tensor]]:
    return iter(
        runner.train.iter_torch_batches(
            batch_size=cfg.micro_batch,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            drop_last=True,
            prefetch_batches=2,
            **device_copies(runner.device),
        )
    )


# Gradients live in DDP's buckets (no copy per step); no buffer sync before each forward:
# the model's buffers (normalisation constants, fixed sincos embeddings) never change.
DDP_OPTIONS = {"gradient_as_bucket_view": True, "forward_sync_buffers": False}


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; other devices compute in float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16)
    return contextlib.nullcontext()


def good_rows_in_place_of_bad(
    patches: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Before a mix: each bad row becomes a copy of a good row of the batch, so that no
    image is mixed with a bad one (zero pixels, label -1). The bad rows still weigh nothing
    in the loss. Computed on the device: the number of good rows is never read."""
    rows = torch.arange(len(ok), device=ok.device)
    good_first = torch.argsort((~ok).to(torch.uint8), stable=True)
    source = torch.where(ok, rows, good_first[rows % ok.sum().clamp(min=1)])
    return patches[source], labels[source]


def micro_batch_loss(
    model: Handles, b: dict[str, torch.Tensor], cfg: JobConfig, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, bad rows) of one micro-batch, both left on the device: a value read back to
    the host (`.item()`, `if tensor`, boolean indexing) stalls the GPU until its queue
    drains. Bad rows stay in the batch with zero weight, and the loss is the mean over the
    good ones; a batch of only bad rows still runs forward and backward at zero loss: every
    DDP rank must, or the others hang."""
    ok, patches, labels = b["ok"], b["patches"], b["label"].clamp(min=0)
    if cfg.train.mixup or cfg.train.cutmix:
        patches, labels = good_rows_in_place_of_bad(patches, labels, ok)
    raw = model.vit
    with autocast(patches.device):
        patches, targets = mix_batch(
            raw.normalize(patches),
            labels,
            num_classes,
            raw.config.grid_size,
            cfg.train.mixup,
            cfg.train.cutmix,
            cfg.train.label_smoothing,
        )
        per_row = F.cross_entropy(model.compute(patches), targets, reduction="none")
    loss = torch.where(ok, per_row, 0.0).sum() / ok.sum().clamp(min=1)
    return loss, (~ok).sum()


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
            loss, skipped = micro_batch_loss(model, b, cfg, num_classes)
            (loss / accum).backward()
        rep.add(loss.detach(), len(b["ok"]), skipped)
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
    (`save_to` writes it into a new directory, which a runner that uploads in the background
    deletes when done, and the loop deletes otherwise)."""
    if not end_of_epoch and runner.epoch_reports_only:
        return
    if not (end_of_epoch and runner.rank == 0):
        runner.report(metrics, None)
        return
    directory = staging_dir()
    handed_over = False  # to Ray, which deletes it once stored
    try:
        runner.report(metrics, runner.make_checkpoint(str(save_to(directory))))
        handed_over = runner.uploads_in_background
    finally:
        if not handed_over:  # stored already, or never to be: a failed save (a full disk)
            shutil.rmtree(directory, ignore_errors=True)


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
    vit.grad_checkpointing = cfg.train.grad_checkpointing
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
    if runner.device.type == "cuda":  # TF32 for the matmuls autocast leaves in float32
        torch.set_float32_matmul_precision("high")
    for orphan in remove_orphans():  # a killed worker's unstored checkpoint, on this node
        logging.getLogger(__name__).warning("removed %s, left by a worker that ended", orphan)

    model, optimizer, scheduler, step = build_model(cfg, plan, runner)
    evaluated_as = Preprocessing(*cfg.data.eval_transform)

    def save_to(out: Path) -> Path:
        return save(
            model.vit,
            optimizer,
            scheduler,
            step=step,
            out=out,
            class_names=plan.class_names,
            mlflow_run_id=plan.mlflow_run_id,
            preprocessing=evaluated_as,
        )

    # a subset when given (the same rows every time), the whole split at the end
    subset = runner.val_subset is not None
    val = runner.val_subset if subset else runner.val
    if fits_in_cache(cfg.data, cfg.data.val_subset if subset else plan.val_rows):
        val = CachedBatches(val)
    last_val = runner.val if subset else val
    rep = Reporter(
        rank=runner.rank,
        micro_batch=cfg.micro_batch,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=plan.total_steps,
        report_every=cfg.train.report_every,
        sink=runner.metrics,
        progress=runner.progress,
        start_step=step,
        device=runner.device,
        train_flops_per_image=3 * forward_flops(model.vit.config),  # the backward: 2 forwards
        peak_flops=cluster_peak_flops(runner.device),
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
                    shard = last_val if step == plan.total_steps else val
                    metrics.update(evaluate(model.compute, shard, cfg.micro_batch, runner.device))
                rep.publish(metrics, step)
                report(metrics, end_of_epoch, runner, save_to)
                rep.reset()
        if step == epoch_start:
            raise RuntimeError(
                f"an epoch of rank {runner.rank} yielded no batch of {cfg.micro_batch} rows "
                f"({plan.train_rows} train rows over {cfg.scaling.num_workers} worker(s)); "
                "lower train.batch_size or train.grad_accum, or add data"
            )
