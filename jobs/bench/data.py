"""`vitray bench data`: images/s through decode + crop + flip + patchify, four ways, one run.

1. the Ray Data pipeline (`build_dataset`), iterated as a train worker does;
2. a torch DataLoader with one worker per core over the same row groups, read by the same
   reader (`pipeline.readers`), and the same transform code;
3. our transform kernel in one plain process;
4. torchvision's standard training transform in one plain process (decode_jpeg +
   RandomResizedCrop + flip): the per-core anchor users know;
5. our kernel in one process per core at once, no loader: what the cores deliver together,
   the ceiling for any loader (`core_scaling` = that / one core's rate).
Shared machines drift by 20% within minutes, so each pair is interleaved: the kernel and
torchvision take turns on every batch, Ray Data and the DataLoader take turns by epoch
(after one Ray warm-up epoch), and each reports its best epoch. Then untimed Ray epochs, on
a fresh Ray with a small object store, report the peak memory (PSS) of all processes while
streaming more data than the store holds (flat = no accumulation).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import psutil
import torch

from jobs.bench.common import write_result
from jobs.cluster.raynode import set_node_env
from jobs.training.mfu import gpu_images_per_s
from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, describe_dataset, quiet_progress
from pipeline.prepare import prepare
from pipeline.readers import Unit, batches, plan_units, read_unit
from pipeline.sources import Source, data_home
from pipeline.transforms import preprocess_batch
from vit import ViTConfig, forward_flops


def unit_batches(
    source: Source, units: list[Unit], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `units`, read as the Ray tasks read them, `batch_size` at a time."""
    for unit in units:
        yield from batches(read_unit(source, unit), batch_size)


class RowGroupStream(torch.utils.data.IterableDataset):
    """The DataLoader baseline: worker k takes row groups k, k+W, ... (the read units of
    Ray Data too: by whole shards, one shard kept one worker idle) and runs our kernel."""

    def __init__(self, source: Source, units: list[Unit], cfg: DataConfig, batch_size: int) -> None:
        self.source, self.units, self.cfg, self.batch_size = source, units, cfg, batch_size

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = torch.utils.data.get_worker_info()
        units = self.units[info.id :: info.num_workers] if info else self.units
        for batch in unit_batches(self.source, units, self.batch_size):
            yield preprocess_batch(batch, self.cfg, 16, train=True)


def rate(images: int, seconds: float) -> float:
    return round(images / seconds, 1)


def bench_kernel_vs_torchvision(
    source: Source, units: list[Unit], cfg: DataConfig, batch: int
) -> tuple[float, float]:
    """Both transforms on every batch, in alternating order: (kernel, torchvision) img/s."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    transform = v2.Compose(
        [v2.RandomResizedCrop(cfg.image_size, antialias=True), v2.RandomHorizontalFlip()]
    )

    def torchvision(b: dict[str, np.ndarray]) -> None:
        for data in b["image"]:
            transform(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)))

    def kernel(b: dict[str, np.ndarray]) -> None:
        preprocess_batch(b, cfg, 16, train=True)

    seconds, n = {kernel: 0.0, torchvision: 0.0}, 0
    for i, b in enumerate(unit_batches(source, units, batch)):
        for fn in (kernel, torchvision) if i % 2 == 0 else (torchvision, kernel):
            start = time.perf_counter()
            fn(b)
            seconds[fn] += time.perf_counter() - start
        n += len(b["label"])
    return rate(n, seconds[kernel]), rate(n, seconds[torchvision])


def _kernel_pass(
    source: Source, units: list[Unit], cfg: DataConfig, batch: int
) -> tuple[int, float]:
    torch.set_num_threads(1)
    start, n = time.perf_counter(), 0
    for b in unit_batches(source, units, batch):
        preprocess_batch(b, cfg, 16, train=True)
        n += len(b["label"])
    return n, time.perf_counter() - start


def bench_kernel_parallel(
    source: Source, units: list[Unit], cfg: DataConfig, batch: int, cores: int
) -> float:
    """Our kernel in `cores` plain processes at once, each over all row groups: what the cores
    deliver together. Shared or hyperthreaded cores give less than cores x one core, and no
    loader can beat this number."""
    context = multiprocessing.get_context("fork")  # before Ray starts; as DataLoader does
    with ProcessPoolExecutor(cores, mp_context=context) as pool:
        args = ([source] * cores, [units] * cores, [cfg] * cores, [batch] * cores)
        passes = list(pool.map(_kernel_pass, *args))
    return rate(sum(n for n, _ in passes), max(seconds for _, seconds in passes))


def bench_dataloader(
    source: Source, units: list[Unit], cfg: DataConfig, batch: int, workers: int
) -> float:
    loader = torch.utils.data.DataLoader(
        RowGroupStream(source, units, cfg, batch),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4,
    )
    start, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["label"])
    return rate(n, time.perf_counter() - start)


class RayMemory:
    """Samples the memory of this process and its children (the Ray processes) as summed
    PSS, where each shared page counts once over all the processes that map it. Summed RSS
    counts the object store again in every process that touches it: it grew by 0.5 GiB over
    three epochs here while PSS stayed flat. Reading PSS costs about 60 ms per sample, so it
    runs in epochs of its own, apart from the timed ones."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                total += getattr(info, "pss", info.rss)  # PSS is Linux-only
            self.samples.append(total)
            time.sleep(0.5)

    def __enter__(self) -> RayMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def ray_epoch(ds: Any, batch: int) -> float:
    """One epoch iterated as a train worker does: img/s."""
    start, n = time.perf_counter(), 0
    for b in ds.iter_torch_batches(batch_size=batch, prefetch_batches=4):
        n += len(b["label"])
    return rate(n, time.perf_counter() - start)


def ray_epoch_memory(ds: Any, batch: int) -> int:
    """One epoch iterated as a train worker does: the peak memory (MiB) of all processes."""
    with RayMemory() as memory:
        ray_epoch(ds, batch)
    return round(max(memory.samples) / 2**20)


@contextlib.contextmanager
def local_ray(cores: int, object_store_mib: int | None = None) -> Iterator[None]:
    import ray

    set_node_env(cores)  # as `ensure_ray` starts a job's local Ray
    store = object_store_mib * 2**20 if object_store_mib else None
    ray.init(
        num_cpus=cores, object_store_memory=store, include_dashboard=False, log_to_driver=False
    )
    try:
        yield
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = args.cores or os.cpu_count() or 1
    gpu_img_s = gpu_demand(args)  # an unknown card or preset stops here, not after the bench
    cfg = DataConfig(
        dataset=f"builtin:photos?n={args.images}",
        image_size=args.size,
        cpus_per_task=args.cpus_per_task,
    )
    out = data_home() / "bench" / f"photos-{args.images}"
    if not (out / "manifest.json").is_file():  # 32 MB shards: several per core, as at scale
        prepare(cfg.dataset, out, shard_size="32MB")
    cfg = cfg.model_copy(update={"dataset": str(out)})
    info = describe_dataset(cfg)
    files = info.source.split_files("train")
    data_mib = sum(os.path.getsize(f) for f in files) / 2**20
    patches_mib = info.split_rows["train"] * args.size * args.size * 3 / 2**20
    source = info.source
    units = plan_units(source, files)
    print(
        f"{info.split_rows['train']} train images in {len(files)} shards, {len(units)} row groups"
        f" ({data_mib:.0f} MiB encoded, {patches_mib:.0f} MiB as patches)",
        flush=True,
    )
    torch.set_num_threads(1)  # kernel and torchvision are per-core numbers
    kernel, tv = bench_kernel_vs_torchvision(source, units, cfg, args.batch)
    print(f"kernel: {kernel} img/s, torchvision: {tv} img/s (interleaved)", flush=True)
    parallel = bench_kernel_parallel(source, units, cfg, args.batch, cores)
    print(f"kernel in {cores} processes at once: {parallel} img/s", flush=True)
    with local_ray(cores):  # Ray's default object store, as a training job gets it
        ds = quiet_progress(build_dataset(cfg, "train", 16))
        warmup = ray_epoch(ds, args.batch)
        print(f"ray data warm-up epoch: {warmup} img/s", flush=True)
        ray_rates, dl_rates = [], []
        for epoch in range(args.epochs):
            dl_rates.append(bench_dataloader(source, units, cfg, args.batch, cores))
            ray_rates.append(ray_epoch(ds, args.batch))
            print(
                f"epoch {epoch + 1}: ray data {ray_rates[-1]} img/s, "
                f"dataloader ({cores} workers) {dl_rates[-1]} img/s",
                flush=True,
            )
    memory = []
    if args.memory_epochs:
        with local_ray(cores, args.object_store_mib):
            ds = quiet_progress(build_dataset(cfg, "train", 16))
            for epoch in range(args.memory_epochs):
                memory.append(ray_epoch_memory(ds, args.batch))
                print(
                    f"memory epoch {epoch + 1} ({args.object_store_mib} MiB object store): "
                    f"peak PSS of all processes {memory[-1]} MiB",
                    flush=True,
                )
    ray_img_s, dl = max(ray_rates), max(dl_rates)
    feed = cores_per_gpu(args, gpu_img_s, ray_img_s / cores)
    return write_result(
        {
            **feed,
            "benchmark": "data",
            "images": info.split_rows["train"],
            "size": args.size,
            "cores": cores,
            "ray_img_s": ray_img_s,
            "ray_epochs_img_s": ray_rates,
            "ray_warmup_epoch_img_s": warmup,
            "dataloader_img_s": dl,
            "dataloader_epochs_img_s": dl_rates,
            "kernel_img_s": kernel,
            "torchvision_img_s": tv,
            "ratio_vs_dataloader": round(ray_img_s / dl, 3),
            "efficiency": round(ray_img_s / (cores * kernel), 3),
            "kernel_vs_torchvision": round(kernel / tv, 3),
            "kernel_parallel_img_s": parallel,
            "core_scaling": round(parallel / kernel, 3),
            "dataloader_efficiency": round(dl / (cores * kernel), 3),
            "efficiency_vs_parallel_kernel": round(ray_img_s / parallel, 3),
            "object_store_mib": args.object_store_mib,
            "memory_epochs_patches_mib": round(patches_mib * args.memory_epochs),
            "peak_pss_mib_per_memory_epoch": memory,
        },
        args.json,
    )


def gpu_demand(args: argparse.Namespace) -> float:
    """Images/s one `--card` trains `--preset` at `--size` and `--at-mfu` of its peak."""
    train_flops = 3 * forward_flops(ViTConfig.from_preset(args.preset, image_size=args.size))
    return gpu_images_per_s(train_flops, args.card, args.at_mfu)


def cores_per_gpu(
    args: argparse.Namespace, gpu_img_s: float, img_s_per_core: float
) -> dict[str, Any]:
    """The decode cores one GPU needs: its images/s over the images/s one core of this
    machine decoded through Ray Data. A cluster with fewer decode cores per GPU than this
    starves its GPUs."""
    cores = gpu_img_s / img_s_per_core
    print(
        f"{args.preset} at {args.size} px on one {args.card} at {args.at_mfu:.0%} MFU trains "
        f"{gpu_img_s:,.0f} img/s: {cores:.1f} decode cores per GPU at the "
        f"{img_s_per_core:,.0f} img/s per core measured here",
        flush=True,
    )
    return {
        "preset": args.preset,
        "card": args.card,
        "at_mfu": args.at_mfu,
        "gpu_img_s": round(gpu_img_s),
        "ray_img_s_per_core": round(img_s_per_core),
        "cores_per_gpu": round(cores, 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=4000, help="builtin:photos images")
    parser.add_argument("--size", type=int, default=224, help="output image size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--epochs", type=int, default=3, help="timed epochs of each (after a Ray warm-up epoch)"
    )
    parser.add_argument(
        "--memory-epochs",
        type=int,
        default=3,
        help="untimed Ray epochs after the timed ones, each reporting its peak memory",
    )
    parser.add_argument("--cores", type=int, help="workers / Ray CPUs (default: all cores)")
    parser.add_argument(
        "--cpus-per-task", type=float, default=1.0, help="CPU fraction of each Ray decode task"
    )
    parser.add_argument(
        "--object-store-mib",
        type=int,
        default=256,
        help="Ray object store of the memory epochs, smaller than the data they stream (the "
        "timed epochs run with Ray's default store, as training jobs do: at 256 MiB Ray "
        "spilled a quarter of the blocks to disk)",
    )
    parser.add_argument(
        "--preset", default="b/16", help="the model whose GPU the decode cores must feed"
    )
    parser.add_argument(
        "--card",
        default="H100 SXM",
        help="the GPU, as torch names it or a part of that (H100 PCIe, A100, L4, ...)",
    )
    parser.add_argument(
        "--at-mfu", type=float, default=0.5, help="the GPU's utilisation to feed (0.5: 50%%)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the result here")
