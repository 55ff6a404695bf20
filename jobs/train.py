"""The training loop every worker runs: pretraining and fine-tuning share it.

Ray Train calls `train_loop_per_worker(config)` on each worker. Datasets are built on the
driver; each worker streams its split. Rank 0 alone logs metrics to MLflow and writes
checkpoints; every rank seeds itself and reports every `report_every` steps.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from jobs.config import JobConfig, TrainSection
from jobs.mix import mix_batch
from vit import ViT, save_checkpoint
from vit.checkpoint import WEIGHTS_FILE, load_state_dict_checked

TRAIN_STATE = "train_state.pt"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decoupled weight decay on matrices only: not on norms, biases, tokens, posemb."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module, t: TrainSection, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, t.weight_decay)
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


def restore(model: ViT, optimizer, scheduler) -> int:
    """Resume from Ray Train's latest checkpoint, if any; returns the step reached."""
    checkpoint = ray.train.get_checkpoint()
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = JobConfig.model_validate(config["job"])
    meta = config["meta"]
    total_steps, steps_per_epoch = meta["total_steps"], meta["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.train.seed + rank)
    device = ray.train.torch.get_device()

    model = ViT(cfg.vit_config(meta["num_classes"]))
    if meta.get("init_weights"):
        load_state_dict_checked(model, load_file(meta["init_weights"]))
    optimizer, scheduler = build_optimizer(model, cfg.train, total_steps)
    step = restore(model, optimizer, scheduler)
    model = ray.train.torch.prepare_model(model)
    if cfg.train.compile:
        model = torch.compile(model)
    log = MetricsLog(meta.get("tracking_uri"), meta.get("mlflow_run_id") if rank == 0 else None)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    micro, accum = cfg.micro_batch, cfg.train.grad_accum
    use_bf16 = device.type == "cuda"
    grid = unwrap(model).config.grid_size

    loss_sum = images = skipped = 0.0
    wait = 0.0
    window_start = time.perf_counter()
    run_start, start_step = time.perf_counter(), step
    model.train()
    while step < total_steps:
        batches = iter(
            train_shard.iter_torch_batches(
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
                sync = i == accum - 1 or not isinstance(
                    model, torch.nn.parallel.DistributedDataParallel
                )
                context = model.no_sync() if not sync else torch.enable_grad()
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
                loss_sum += float(loss) * accum
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
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": images_total / elapsed,
                    "data_wait_fraction": wait / elapsed,
                    "skipped_images": skipped_total,
                }
                checkpoint = None
                if end_of_epoch:
                    metrics.update(evaluate(model, val_shard, micro, device))
                with tempfile.TemporaryDirectory() as tmp:
                    if end_of_epoch and rank == 0:
                        checkpoint = ray.train.Checkpoint.from_directory(
                            save(unwrap(model), optimizer, scheduler, step, meta, Path(tmp))
                        )
                    if rank == 0:
                        log.log(metrics, step)
                        rate = (step - start_step) / (time.perf_counter() - run_start)
                        eta = format_eta((total_steps - step) / max(rate, 1e-9))
                        extra = f" val_top1 {metrics['val_top1']:.4f}" if end_of_epoch else ""
                        print(
                            f"step {step}/{total_steps} epoch {metrics['epoch']:.2f} "
                            f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                            f"{metrics['images_per_s']:.0f} img/s ETA {eta}{extra}",
                            flush=True,
                        )
                    ray.train.report(metrics, checkpoint=checkpoint)
                loss_sum = images = skipped = wait = 0.0
                window_start = time.perf_counter()
