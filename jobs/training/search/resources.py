"""What one trial holds and how many run at once.

A single-worker trial runs the training loop itself: on Ray 2.60, trials that build a
TorchTrainer and get stopped early by ASHA leak their worker resources and the next trial
waits forever (docs/design.md#tune-trials), while plain function trials release everything
when stopped. Its Ray Data tasks run inside the trial's placement group, in a bundle of
their own, so data and training never wait on each other.

A trial that asks for several workers is a thin driver of about one CPU that builds a
TorchTrainer: in Ray Train V2 the trainer reserves its workers' placement group itself, so
reserving them in the trial's group as well would book every GPU twice. As Tune no longer
sees the workers, the search caps how many trials run at once by what the cluster holds.
"""

from __future__ import annotations

import math
from typing import Any

import ray

from jobs.config import JobConfig
from jobs.training.capacity import alive_nodes, node_cards, worker_resources
from jobs.training.mfu import DECODE_IMG_S_PER_CORE, gpu_images_per_s, peak_tflops
from vit import ViTConfig, forward_flops

TRIAL_DRIVER_CPUS = 1.0  # a trial that drives a TorchTrainer (Ray's Train V2 Tune guide)


def driver_cpus(cfg: JobConfig) -> float:
    """CPUs a trial holds beside its workers: a multi-worker trial's driver."""
    return TRIAL_DRIVER_CPUS if cfg.scaling.num_workers > 1 else 0.0


def trial_resources(cfg: JobConfig, vit: ViTConfig | None = None) -> Any:
    """The trial's placement group: a single-worker trial's worker and its data bundle, or
    a multi-worker trial's driver alone (its trainer reserves the workers)."""
    from ray import tune

    if cfg.scaling.num_workers > 1:
        return tune.PlacementGroupFactory([{"CPU": driver_cpus(cfg)}])
    data = {"CPU": trial_decode_cpus(cfg, vit)}
    return tune.PlacementGroupFactory([worker_resources(cfg), data])


def trial_decode_cpus(cfg: JobConfig, vit: ViTConfig | None = None) -> float:
    """CPUs of a single-worker trial's data bundle: `tune.trial_decode_cpus`, or under auto
    one decode task on CPUs and, on a GPU, the cores one GPU training `vit` at 50% MFU
    consumes (a single decode CPU fed a one-GPU trial a fraction of what it trains), at most
    a GPU's share of its node beside the worker: one trial per GPU must still fit. A number
    no node holds beside the worker is an error: Tune would wait for it forever."""
    chosen, one_task = cfg.tune.trial_decode_cpus, cfg.data.cpus_per_task
    if cfg.scaling.num_workers > 1 or (chosen == "auto" and (not cfg.scaling.use_gpu or not vit)):
        return one_task  # a trial with a trainer decodes outside it; a CPU trial needs one
    worker = worker_resources(cfg)
    hosts = [n for n in alive_nodes() if n.get("GPU", 0) >= worker.get("GPU", 0)]
    if chosen != "auto":
        room = max((n.get("CPU", 0) - worker["CPU"] for n in hosts), default=None)
        if room is not None and chosen > room + 1e-9 and not cfg.scaling.autoscaling:
            raise ValueError(
                f"tune.trial_decode_cpus: {chosen:g} CPUs beside a worker of "
                f"{worker['CPU']:g}, but no node has more than {room:g} to spare"
            )
        return max(chosen, one_task)
    card = next((c for c in node_cards(hosts) if peak_tflops(c)), None)
    if card is None:
        return one_task
    demand = gpu_images_per_s(3 * forward_flops(vit), card) / DECODE_IMG_S_PER_CORE
    share = max(n.get("CPU", 0) / n["GPU"] for n in hosts) - worker["CPU"]
    return max(one_task, min(float(math.ceil(demand)), math.floor(share)))


def trial_footprint(cfg: JobConfig, vit: ViTConfig | None = None) -> dict[str, float]:
    """What one running trial holds in all: its workers, its decode CPUs, its driver."""
    need = {k: v * cfg.scaling.num_workers for k, v in worker_resources(cfg).items()}
    need["CPU"] += trial_decode_cpus(cfg, vit) + driver_cpus(cfg)
    return need


def concurrent_trials(cfg: JobConfig, vit: ViTConfig | None = None) -> int:
    """`tune.max_concurrent`, capped by how many trials the cluster holds at once (its GPUs
    over a trial's, and its CPUs). Tune does not see a multi-worker trial's workers: trials
    started beyond that would hold their drivers and wait for workers. Under
    `scaling.autoscaling` the cluster grows on demand, and the config's number stands."""
    if cfg.scaling.autoscaling:
        return cfg.tune.max_concurrent
    have = ray.cluster_resources()
    need = trial_footprint(cfg, vit)
    fits = min(int(have.get(k, 0) / v + 1e-9) for k, v in need.items() if v)
    return max(1, min(cfg.tune.max_concurrent, fits))
