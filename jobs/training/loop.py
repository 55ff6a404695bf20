"""The training loop: pretraining, fine-tuning and every Tune trial share it.

`run_training` takes a `Runner`, the few things that differ between where it runs: Ray
Train calls `train_loop_per_worker(config)` on each worker (datasets built on the driver,
one shard per worker, DDP); a single-worker Tune trial runs the loop in the trial itself
(see jobs/training/search.py). Rank 0 alone logs metrics to MLflow and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from jobs.config import JobConfig, TrainSection
from jobs.training.mix import mix_batch
from pipeline.dataset import fits_in_cache
from vit import ViT, ViTConfig, save_checkpoint
from vit.checkpoint import WEIGHTS_FILE, load_state_dict_checked

TRAIN_STATE = "train_state.pt"


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(
    model: ViT, weight_decay: float, lr: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Decoupled weight decay on matrices only (not norms, biases, tokens, posemb), and
    layer-wise lr decay (BEiT/timm): lr x layer_decay^(depth + 1 - layer)."""
    depth = model.config.depth
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.ndim > 1 and not name.endswith(("pos_embed", "cls_token"))
        layer = layer_id(name, depth) if layer_decay < 1 else depth + 1
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr": lr * layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: ViT, t: TrainSection, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, t.weight_decay, t.lr, t.layer_decay)
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        if t.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if t.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def unwrap(model: torch.nn.Module) -> ViT:
    """With one worker Ray does not wrap the model in DDP."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def all_sum(values: list[float]) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


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
            logits = model(b["patches"][ok])
            labels = b["label"][ok]
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += float((top[:, 0] == labels).sum())
            correct5 += float((top == labels[:, None]).any(dim=1).sum())
            seen += len(labels)
    correct1, correct5, seen, skipped = all_sum([correct1, correct5, seen, skipped])
    model.train()
    return {
        "val_top1": correct1 / max(seen, 1),
        "val_top5": correct5 / max(seen, 1),
        "val_images": seen,
        "val_skipped": skipped,
    }


def restore(model: ViT, optimizer, scheduler, checkpoint: Any) -> int:
    """Resume from the runner's latest checkpoint, if any; returns the step reached."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        load_state_dict_checked(model, load_file(Path(d) / WEIGHTS_FILE))
        state = torch.load(Path(d) / TRAIN_STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def save(model: ViT, optimizer, scheduler, step: int, meta: dict, out: Path) -> Path:
    save_checkpoint(model, out, class_names=meta.get("class_names"))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "mlflow_run_id": meta.get("mlflow_run_id") or "",
    }
    torch.save(state, out / TRAIN_STATE)
    return out


class MetricsLog:
    """Rank 0's MLflow client, bound to the run the driver opened."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.client, self.run_id = None, run_id
        if run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


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
    runner = Runner(
        rank=ray.train.get_context().get_world_rank(),
        device=ray.train.torch.get_device(),
        train=ray.train.get_dataset_shard("train"),
        val=ray.train.get_dataset_shard("val"),
        report=lambda metrics, checkpoint: ray.train.report(metrics, checkpoint=checkpoint),
        make_checkpoint=ray.train.Checkpoint.from_directory,
        checkpoint=ray.train.get_checkpoint(),
        prepare_model=ray.train.torch.prepare_model,
    )
    run_training(config, runner)


def initial_weights(meta: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The fine-tune's starting weights: put in the object store once by the driver."""
    init = meta.get("init_weights")
    return ray.get(init) if isinstance(init, ray.ObjectRef) else init


def run_training(config: dict[str, Any], runner: Runner) -> None:
    cfg = JobConfig.model_validate(config["job"])
    meta = config["meta"]
    total_steps, steps_per_epoch = meta["total_steps"], meta["steps_per_epoch"]
    rank, device = runner.rank, runner.device
    torch.manual_seed(cfg.train.seed + rank)

    model = ViT(ViTConfig.from_dict(meta["vit"]))
    init = initial_weights(meta)
    if init is not None:
        load_state_dict_checked(model, init)
    optimizer, scheduler = build_optimizer(model, cfg.train, total_steps)
    step = restore(model, optimizer, scheduler, runner.checkpoint)
    model = runner.prepare_model(model.to(device))
    if cfg.train.compile:
        model = torch.compile(model)
    log = MetricsLog(meta.get("tracking_uri"), meta.get("mlflow_run_id") if rank == 0 else None)
    micro, accum = cfg.micro_batch, cfg.train.grad_accum
    use_bf16 = device.type == "cuda"
    grid = unwrap(model).config.grid_size
    val = CachedBatches(runner.val) if fits_in_cache(cfg.data, meta.get("val_rows")) else runner.val
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    loss_sum = images = skipped = 0.0
    wait = 0.0
    window_start = time.perf_counter()
    run_start, start_step = time.perf_counter(), step
    model.train()
    while step < total_steps:
        batches = iter(
            runner.train.iter_torch_batches(
                batch_size=micro,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                drop_last=True,
                device=device,
                prefetch_batches=2,
            )
        )
        epoch_done = False
        while step < total_steps and not epoch_done:
            for i in range(accum):  # one optimizer step over `accum` micro-batches
                t0 = time.perf_counter()
                b = next(batches, None)
                wait += time.perf_counter() - t0
                if b is None:
                    epoch_done = True
                    break
                ok = b["ok"]
                skipped += float((~ok).sum())
                sync = i == accum - 1 or not ddp
                context = contextlib.nullcontext() if sync else model.no_sync()
                weight = 1.0
                if not ok.any():  # every rank must still run backward, or DDP hangs
                    ok, weight = torch.ones_like(ok), 0.0
                patches, labels = b["patches"][ok], b["label"][ok].clamp(min=0)
                with context, torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
                    patches, targets = mix_batch(
                        unwrap(model).normalize(patches),
                        labels,
                        meta["num_classes"],
                        grid,
                        cfg.train.mixup,
                        cfg.train.cutmix,
                        cfg.train.label_smoothing,
                    )
                    loss = weight * F.cross_entropy(model(patches), targets) / accum
                loss.backward()
                loss_sum += loss.item() * accum
                images += len(ok)
            if epoch_done and i == 0:
                break
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if step % cfg.train.report_every == 0 or end_of_epoch:
                elapsed = time.perf_counter() - window_start
                loss_total, images_total, skipped_total = all_sum([loss_sum, images, skipped])
                metrics = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": loss_total / max(images_total / micro, 1),
                    "lr": scheduler.get_last_lr()[-1],
                    "images_per_s": images_total / elapsed,
                    "data_wait_fraction": wait / elapsed,
                    "skipped_images": skipped_total,
                }
                if end_of_epoch:
                    metrics.update(evaluate(model, val, micro, device))
                if rank == 0:
                    log.log(metrics, step)
                    rate = (step - start_step) / (time.perf_counter() - run_start)
                    eta = format_eta((total_steps - step) / max(rate, 1e-9))
                    extra = f" val_top1 {metrics['val_top1']:.4f}" if end_of_epoch else ""
                    # Not print(): Ray Train 2.60 patches it in its workers to log the line
                    # and also print it, so every line showed twice.
                    sys.stdout.write(
                        f"step {step}/{total_steps} epoch {metrics['epoch']:.2f} "
                        f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                        f"{metrics['images_per_s']:.0f} img/s ETA {eta}{extra}\n"
                    )
                    sys.stdout.flush()
                if end_of_epoch or not runner.epoch_reports_only:
                    with tempfile.TemporaryDirectory() as tmp:
                        checkpoint = None
                        if end_of_epoch and rank == 0:
                            out = save(unwrap(model), optimizer, scheduler, step, meta, Path(tmp))
                            checkpoint = runner.make_checkpoint(str(out))
                        runner.report(metrics, checkpoint)
                loss_sum = images = skipped = wait = 0.0
                window_start = time.perf_counter()
