"""The Ray that vitray starts itself: a local Ray for a job, or `vitray cluster local up`."""

from __future__ import annotations

import os


def node_env(cpus: int | None = None) -> dict[str, str]:
    """Settings for a Ray node of `cpus` CPUs, passed to its raylet as RAY_* variables.

    Ray kills idle worker processes above a soft limit, by default the node's *available*
    CPUs: 0 while train workers or Tune trials hold them all. Every epoch's decode tasks
    then started new worker processes that re-imported torch (5 s of CPU each on this
    2-core machine; a Tune trial's epoch went from 5 to 14 s). Idle workers are kept up to
    a limit that a node's decode tasks never reach instead.
    """
    cpus = cpus or os.cpu_count() or 1
    return {"RAY_num_workers_soft_limit": str(max(32, 4 * cpus))}


def ensure_ray() -> None:
    """Join RAY_ADDRESS (a cluster, or inside a Ray job) if set; else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        for key, value in node_env().items():
            os.environ.setdefault(key, value)  # the raylet started below inherits them
    ray.init(address=address, log_to_driver=True)
