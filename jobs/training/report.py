"""Reports: each rank's sums over a window of steps, all-reduced at report time into the
metrics Ray (or Tune) receives; rank 0 also logs the metrics through the sink it was handed
and sends a progress line to where it is shown."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from jobs.training.mfu import mfu
from jobs.training.tracker import MetricsSink


def all_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sums over all ranks, read back to the host in one transfer. The tensor lives on the
    training device: NCCL (Ray's backend with GPUs) reduces CUDA tensors only, and fails on
    a CPU one."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def sync(device: torch.device) -> None:
    """Wait for what the device was given: CUDA runs it asynchronously; a CPU has run it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class Reporter:
    """The window since the last report (loss, images, skipped rows, time spent waiting
    for data), the report schedule, and rank 0's outputs. Loss and skipped rows are summed
    on the training device and read back once per report, never per micro-batch."""

    def __init__(
        self,
        *,
        rank: int,
        micro_batch: int,
        steps_per_epoch: int,
        total_steps: int,
        report_every: int,
        sink: MetricsSink | None,
        progress: Callable[[str, bool], None] | None,
        start_step: int,
        device: torch.device,
        train_flops_per_image: float = 0.0,
        peak_flops: float | None = None,
    ) -> None:
        """`peak_flops`: the summed bf16 peak of every rank's card (jobs.training.mfu), for
        the `mfu` metric; None on CPUs and unknown cards."""
        self.rank, self.micro_batch, self.sink, self.progress = rank, micro_batch, sink, progress
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.report_every, self.device = report_every, device
        self.train_flops_per_image, self.peak_flops = train_flops_per_image, peak_flops
        self.run_start, self.start_step = time.perf_counter(), start_step
        self.first_window = True  # holds the start: compiling, the first batches' decode
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.skipped = torch.zeros((), dtype=torch.float64, device=self.device)
        self.images = self.wait = 0.0
        self.window_start = time.perf_counter()

    def add(self, loss: torch.Tensor, rows: int, skipped: torch.Tensor) -> None:
        """One micro-batch: its loss and bad rows as device tensors, added where they are."""
        self.loss_sum += loss
        self.skipped += skipped
        self.images += rows

    def next_batch(self, batches: Any) -> dict[str, torch.Tensor] | None:
        """The next micro-batch, or None at the end of the epoch; the wait is counted."""
        t0 = time.perf_counter()
        batch = next(batches, None)
        self.wait += time.perf_counter() - t0
        return batch

    def end_of_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def due(self, step: int) -> bool:
        return step % self.report_every == 0 or self.end_of_epoch(step)

    def metrics(self, step: int, lr: float) -> dict[str, float]:
        """The window's metrics, summed over every rank (a collective: all ranks call it).
        The window is timed once the device has run what it was given, and `mfu` leaves out
        the first window after a start, whose time holds compiling and the pipeline's start."""
        sync(self.device)
        elapsed = time.perf_counter() - self.window_start
        loss_total, images_total, skipped_total = all_sum(
            [self.loss_sum, self.images, self.skipped], self.device
        )
        metrics = {
            "step": step,
            "epoch": step / self.steps_per_epoch,
            "loss": loss_total / max(images_total / self.micro_batch, 1),
            "lr": lr,
            "images_per_s": images_total / elapsed,
            "data_wait_fraction": self.wait / elapsed,
            "skipped_images": skipped_total,
        }
        if self.peak_flops and not self.first_window:
            rate = metrics["images_per_s"]
            metrics["mfu"] = mfu(rate, self.train_flops_per_image, self.peak_flops)
        self.first_window = False
        return metrics

    def publish(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0: the metrics to the sink (closed after the last step), and a progress
        line (kept at each epoch's end)."""
        if self.rank != 0:
            return
        if self.sink is not None:
            self.sink.log(metrics, step)
            if step == self.total_steps:
                self.sink.close()
        if self.progress is None:
            return
        rate = (step - self.start_step) / (time.perf_counter() - self.run_start)
        eta = format_eta((self.total_steps - step) / max(rate, 1e-9))
        extra = f" MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""
        extra += f" val_top1 {metrics['val_top1']:.4f}" if "val_top1" in metrics else ""
        self.progress(
            f"step {step}/{self.total_steps} epoch {metrics['epoch']:.2f} "
            f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"{metrics['images_per_s']:.0f} img/s ETA {eta}{extra}",
            "val_top1" in metrics,
        )
