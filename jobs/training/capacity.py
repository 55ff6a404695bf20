"""What a job holds on the cluster, and a check that the cluster can hold it at all."""

from __future__ import annotations

from jobs.config import JobConfig


def worker_resources(cfg: JobConfig) -> dict[str, float]:
    """What one Ray Train worker holds."""
    return {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}


def check_capacity(cfg: JobConfig) -> None:
    """Fail now rather than wait forever. Ray queues work that no node can hold, and train
    workers that take the CPUs a decode task needs leave the job silent, not failed (on 2
    CPUs: one worker of 1.5 CPUs and decode tasks of 1.0)."""
    import ray

    if cfg.scaling.autoscaling:
        return
    worker, workers = worker_resources(cfg), cfg.scaling.num_workers
    need = {kind: amount * workers for kind, amount in worker.items()}
    need["CPU"] += cfg.data.cpus_per_task
    have = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    largest = {kind: max((n.get(kind, 0) for n in nodes), default=0) for kind in need}
    problems = [
        f"{need[k]:g} {k} in all ({workers} worker(s) x {worker[k]:g}"
        + (f" + one decode task of {cfg.data.cpus_per_task:g}" if k == "CPU" else "")
        + f"), the cluster has {have.get(k, 0):g}"
        for k in need
        if need[k] > have.get(k, 0) + 1e-9
    ] + [
        f"{amount:g} {k} per worker, the largest node has {largest[k]:g}"
        for k, amount in worker.items()
        if amount > largest[k] + 1e-9
    ]
    if problems:
        raise ValueError(
            "this Ray cluster cannot hold the job, which would wait forever: it needs "
            + "; ".join(problems)
            + ". Lower scaling.num_workers, scaling.cpus_per_worker or data.cpus_per_task, "
            "or set scaling.autoscaling=true on a cluster that adds nodes on demand"
        )
