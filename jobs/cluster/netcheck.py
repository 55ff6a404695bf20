"""`vitray cluster check`: the all-reduce bandwidth of the cluster's training workers before a
long run. DDP all-reduces every gradient every step; a slow link between two nodes (no EFA,
NCCL over TCP, a wrong interface) slows every step of a multi-node run and shows nowhere
else. One Ray Train worker per GPU (NCCL), or one per node without GPUs (gloo), times an
all-reduce over all of them and one between each pair of nodes."""

from __future__ import annotations

import itertools
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from jobs.training.report import sync


def timed_all_reduce(tensor: torch.Tensor, iterations: int, group: Any = None) -> float:
    """Seconds per all-reduce of `tensor`, after one untimed warm-up."""
    dist.all_reduce(tensor, group=group)
    sync(tensor.device)
    start = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(tensor, group=group)
    sync(tensor.device)
    return (time.perf_counter() - start) / iterations


def bus_gbps(size_bytes: int, seconds: float, ranks: int) -> float:
    """NCCL's bus bandwidth: what each link carries in a ring all-reduce, comparable
    across rank counts (nccl-tests' busbw): size x 2(n-1)/n over the time."""
    return size_bytes * 2 * (ranks - 1) / ranks / seconds / 1e9


def measure(config: dict[str, Any]) -> None:
    """Ray Train's loop on every worker: the whole group, then each pair of nodes' first
    workers; rank 0 reports GB/s."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    size = config["size_mib"] * 2**20
    tensor = torch.ones(size // 4, dtype=torch.float32, device=device)
    # Ray's node ids, not Ray Train's node ranks: those count IP addresses
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    leaders = list(dict.fromkeys(nodes.index(node) for node in nodes))  # each node's first rank
    metrics = {"ranks": world, "nodes": len(leaders)}
    seconds = timed_all_reduce(tensor, config["iterations"])
    metrics["all_ranks_bus_gbps"] = bus_gbps(size, seconds, world)
    for (a, first), (b, second) in itertools.combinations(enumerate(leaders), 2):
        pair = [first, second]
        group = dist.new_group(pair)  # every rank makes every group, in the same order
        if rank in pair:
            seconds = timed_all_reduce(tensor, config["iterations"], group)
            found = {f"node {a}-{b} bus_gbps": bus_gbps(size, seconds, 2)}
        else:
            found = {}
        dist.destroy_process_group(group)  # each NCCL communicator holds GPU memory
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, found)
        for item in gathered:
            metrics.update(item)
    if rank == 0:  # Ray Train keeps no metrics of a report without a checkpoint
        config["results"].put(metrics)


def check(size_mib: int, iterations: int, workers: int | None, cpus_per_worker: float) -> dict:
    """Run `measure` on the cluster Ray joins; returns rank 0's report and prints it."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from jobs.cluster.raynode import ensure_ray

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    hosts = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    nodes = len([r for r in hosts if r.get("CPU", 0) >= cpus_per_worker])
    workers = workers or gpus or nodes
    most = gpus or nodes  # one per GPU; without GPUs one per node (STRICT_SPREAD)
    if not 2 <= workers <= most:
        have = f"{gpus} GPU(s)" if gpus else f"{nodes} node(s) with {cpus_per_worker:g} CPUs"
        raise ValueError(
            f"cluster check runs 2 or more workers, one per GPU (without GPUs one per node), "
            f"and this cluster has {have} for --workers {workers}"
        )
    backend = "nccl" if gpus else "gloo"
    print(
        f"all-reduce of {size_mib} MiB x {iterations} over {workers} worker(s) "
        f"({backend}, {'one per GPU' if gpus else 'spread over the nodes'})",
        flush=True,
    )
    results = Queue(maxsize=1, actor_options={"num_cpus": 0})
    with tempfile.TemporaryDirectory(prefix="vitray-check-") as storage:
        trainer = TorchTrainer(
            measure,
            train_loop_config={"size_mib": size_mib, "iterations": iterations, "results": results},
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=gpus > 0,
                resources_per_worker={"CPU": cpus_per_worker},
                # one per GPU, nodes filled; without GPUs one per node, each pair a link
                placement_strategy="PACK" if gpus else "STRICT_SPREAD",
            ),
            run_config=RunConfig(
                name="vitray-cluster-check",
                storage_path=storage,
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        trainer.fit()
    metrics = results.get(timeout=60)
    results.shutdown()
    print(f"{metrics['ranks']} ranks on {metrics['nodes']} node(s)")
    print(f"  all ranks: {metrics['all_ranks_bus_gbps']:.2f} GB/s bus bandwidth")
    for key, value in sorted(metrics.items()):
        if key.startswith("node "):
            print(f"  {key.removesuffix(' bus_gbps')}: {value:.2f} GB/s")
    return metrics
