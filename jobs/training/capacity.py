"""What a job holds on the cluster, and checks that the cluster can hold it at all.

Ray queues work that no node can hold, and train workers that take the CPUs a decode task
needs leave the job silent, not failed (on 2 CPUs: one worker of 1.5 CPUs and decode tasks
of 1.0). A job that cannot run fails here, before any run starts, with what is missing.
"""

from __future__ import annotations

import math
import os
from typing import Any

from jobs.config import JobConfig, with_values


def worker_resources(cfg: JobConfig) -> dict[str, float]:
    """What one Ray Train worker holds (`cpus_per_worker: auto` resolved by `sized`)."""
    cpus = cfg.scaling.cpus_per_worker
    if cpus == "auto":
        raise ValueError("scaling.cpus_per_worker: auto is resolved against the cluster first")
    return {"CPU": cpus, **({"GPU": 1} if cfg.scaling.use_gpu else {})}


def alive_nodes() -> list[dict[str, float]]:
    """The resources of every alive node."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


CARD = "accelerator_type:"  # Ray's resource naming a node's card: accelerator_type:H100


def node_cards(nodes: list[dict[str, float]]) -> list[str]:
    """The kinds of card on `nodes` (resources, as `alive_nodes` gives them), sorted."""
    return sorted({k.removeprefix(CARD) for n in nodes for k in n if k.startswith(CARD)})


def hosts_workers(cfg: JobConfig, node: dict[str, float]) -> bool:
    """A node a worker may land on: one with CPUs, and a GPU for a GPU job (a KubeRay head
    often has neither)."""
    return node.get("CPU", 0) > 0 and (not cfg.scaling.use_gpu or node.get("GPU", 0) >= 1)


def workers_that_fit(cfg: JobConfig, nodes: list[dict[str, float]], cpus: float) -> int:
    """How many workers of `cpus` CPUs (and one GPU each for a GPU job) `nodes` hold: Ray
    places each worker whole on one node, so totals alone overstate it."""
    count = 0
    for node in filter(lambda n: hosts_workers(cfg, n), nodes):
        fit = math.floor(node.get("CPU", 0) / cpus + 1e-9)
        count += min(fit, int(node.get("GPU", 0))) if cfg.scaling.use_gpu else fit
    return count


def sized(cfg: JobConfig, driver_cpus: float = 0.0) -> JobConfig:
    """`cfg` with `scaling.cpus_per_worker: auto` made a number, so that every node keeps
    room for one decode task (and a search trial's driver) beside its workers, and the
    pipeline always runs. On a fixed cluster: the largest size at which the nodes in view,
    whatever their sizes, hold every worker. Under `scaling.autoscaling`: the largest node
    that can host a worker shared by the workers one such node holds (one per GPU; for a
    CPU job, the workers spread evenly over the nodes), more of its kind added on demand."""
    if cfg.scaling.cpus_per_worker != "auto":
        return cfg
    hosts = [n for n in alive_nodes() if hosts_workers(cfg, n)]
    if not hosts:
        raise ValueError(
            "scaling.cpus_per_worker: auto sizes workers from a node that can host one, and "
            "this Ray cluster has none yet (nodes added on demand are not in view); set "
            "scaling.cpus_per_worker to a number"
        )
    workers, reserved = cfg.scaling.num_workers, cfg.data.cpus_per_task + driver_cpus
    spare = [{**n, "CPU": n.get("CPU", 0) - reserved} for n in hosts]
    if cfg.scaling.autoscaling:
        node = max(spare, key=lambda n: n["CPU"])
        gpus = int(node.get("GPU", 0))
        per_node = min(workers, gpus) if cfg.scaling.use_gpu else math.ceil(workers / len(hosts))
        sizes = [node["CPU"] / per_node]
    else:  # each node's spare CPUs split k ways, largest first
        sizes = sorted({n["CPU"] / k for n in spare for k in range(1, workers + 1)}, reverse=True)
    # Ray counts CPUs to 1e-4: keep the size short
    fitting = [
        c
        for c in (math.floor(100 * size) / 100 for size in sizes)
        if c > 0 and (cfg.scaling.autoscaling or workers_that_fit(cfg, spare, c) >= workers)
    ]
    if not fitting:
        raise ValueError(
            f"scaling.cpus_per_worker: auto finds no size at which {workers} worker(s) fit "
            f"and leave each node {reserved:g} CPU (one decode task of "
            f"{cfg.data.cpus_per_task:g}, a trial driver of {driver_cpus:g}): the nodes that "
            f"can host a worker have {describe(hosts)}"
        )
    cpus = fitting[0]
    print(f"scaling.cpus_per_worker: auto -> {cpus:g}", flush=True)
    return with_values(cfg, {"scaling.cpus_per_worker": cpus})


def describe(nodes: list[dict[str, float]]) -> str:
    """'16, 8, 8 CPU' (and '; 8, 1 GPU' when any has GPUs)."""
    text = ", ".join(f"{n.get('CPU', 0):g}" for n in nodes) + " CPU"
    if any(n.get("GPU", 0) for n in nodes):
        text += "; " + ", ".join(f"{n.get('GPU', 0):g}" for n in nodes) + " GPU"
    return text


def check_capacity(cfg: JobConfig, driver_cpus: float = 0.0) -> None:
    """Fail now rather than wait forever: the cluster must hold every worker, `driver_cpus`
    (a search trial's driver) and one decode task.

    A fixed cluster: the totals must fit, and each worker must fit on one node. Under
    `scaling.autoscaling` new nodes may satisfy both, so they are skipped; what new nodes of
    the kinds in view cannot fix is still checked: one decode task must fit beside a worker
    on a node that hosts workers, or on a node that hosts none (a CPU group for decoding).
    A worker that takes all of its node's CPUs, on a cluster whose other nodes are of the
    same kind, fails here with or without autoscaling. When no node in view can host a
    worker yet (GPU nodes started on demand), nothing can be judged and the job starts.
    """
    import ray

    worker, workers, decode = worker_resources(cfg), cfg.scaling.num_workers, cfg.data.cpus_per_task
    nodes = alive_nodes()
    if cfg.scaling.autoscaling:
        problems = decode_room(cfg, nodes)
    else:
        need = {kind: amount * workers for kind, amount in worker.items()}
        need["CPU"] += decode + driver_cpus
        have = ray.cluster_resources()
        largest = {kind: max((n.get(kind, 0) for n in nodes), default=0) for kind in need}
        problems = [
            f"{need[k]:g} {k} in all ({workers} worker(s) x {worker[k]:g}"
            + (f" + one decode task of {decode:g}" if k == "CPU" else "")
            + (f" + a trial driver of {driver_cpus:g}" if k == "CPU" and driver_cpus else "")
            + f"), the cluster has {have.get(k, 0):g}"
            for k in need
            if need[k] > have.get(k, 0) + 1e-9
        ] + [
            f"{amount:g} {k} per worker, the largest node has {largest[k]:g}"
            for k, amount in worker.items()
            if amount > largest[k] + 1e-9
        ]
        fit = workers_that_fit(cfg, nodes, worker["CPU"])
        if not problems and fit < workers:
            gpu = " and 1 GPU" if cfg.scaling.use_gpu else ""
            problems = [
                f"{workers} worker(s) of {worker['CPU']:g} CPU{gpu}, each whole on one node, "
                f"and its nodes ({describe(nodes)}) hold {fit}"
            ]
    if problems:
        raise ValueError(
            "this Ray cluster cannot hold the job, which would wait forever: it needs "
            + "; ".join(problems)
            + ". Lower scaling.num_workers, scaling.cpus_per_worker or data.cpus_per_task "
            "(scaling.cpus_per_worker: auto leaves a decode task room), or set "
            "scaling.autoscaling=true on a cluster that adds nodes on demand"
        )


def decode_room(cfg: JobConfig, nodes: list[dict[str, Any]]) -> list[str]:
    """Under autoscaling: the problem, if no node kind in view leaves a decode task room."""
    cpus, decode = worker_resources(cfg)["CPU"], cfg.data.cpus_per_task
    hosts = [n.get("CPU", 0) for n in nodes if hosts_workers(cfg, n)]
    others = [n.get("CPU", 0) for n in nodes if not hosts_workers(cfg, n)]
    if not hosts or max(hosts) - cpus >= decode - 1e-9 or max(others, default=0) >= decode:
        return []
    return [
        f"room for one decode task of {decode:g} CPU, and a worker of {cpus:g} CPU leaves "
        f"{max(max(hosts) - cpus, 0):g} on the largest node that hosts workers "
        f"({max(hosts):g} CPU) while no other node has {decode:g} (add a CPU-only node group "
        "for decoding)"
    ]


def check_tracking_store(cfg: JobConfig) -> None:
    """Refuse an MLflow store on one node's disk when the job may run on several nodes: the
    cluster has several, or `scaling.autoscaling` may add them (an autoscaling cluster can
    be its head alone at submit time). Rank 0 (or a trial) on another node would open a
    store of its own there, and the runs would be split across disks. A one-node cluster
    that does not grow keeps the embedded store."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not cfg.mlflow.enabled or not local_store(uri):
        return
    count = len(alive_nodes())
    if count > 1 or cfg.scaling.autoscaling:
        store = f"mlflow.tracking_uri {uri}" if uri else "the embedded ./mlflow.db (no URI set)"
        where = f"has {count} nodes" if count > 1 else "may add nodes (scaling.autoscaling)"
        raise ValueError(
            f"{store} is a store on this node's disk, and the Ray cluster "
            f"{where}: a worker on another node would log to a store of its own. "
            "Run an MLflow server every node reaches and set mlflow.tracking_uri (or "
            "MLFLOW_TRACKING_URI) to it, e.g. http://mlflow.example:5000"
        )


def local_store(uri: str | None) -> bool:
    """Whether MLflow keeps `uri`'s runs on one node's disk: SQLite, file:, a plain path, or
    nothing set (the embedded store)."""
    if not uri or uri.startswith(("sqlite:", "file:")):
        return True
    return ":" not in uri and not uri.startswith("databricks")


def fit_to_cluster(cfg: JobConfig, driver_cpus: float = 0.0) -> JobConfig:
    """`cfg` sized for the Ray cluster it runs on, after every check that it can run there."""
    cfg = sized(cfg, driver_cpus)
    check_capacity(cfg, driver_cpus)
    check_tracking_store(cfg)
    return cfg
