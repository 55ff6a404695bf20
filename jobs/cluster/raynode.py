"""The Ray that vitray starts itself: a local Ray for a job, or `vitray cluster local up`."""

from __future__ import annotations

import os


def node_env(cpus: int | None = None) -> dict[str, str]:
    """Settings for a Ray node of `cpus` CPUs, inherited by its processes as environment.

    Ray kills idle worker processes above a soft limit, by default the node's *available*
    CPUs: 0 while train workers or Tune trials hold them all. Every epoch's decode tasks
    then started new worker processes that re-imported torch (5 s of CPU each on a 2-core
    machine; a Tune trial's epoch took 14 s instead of 5). Idle workers are kept up to a
    limit that a node's decode tasks do not reach instead.
    """
    cpus = cpus or os.cpu_count() or 1
    return {
        "RAY_num_workers_soft_limit": str(max(32, 4 * cpus)),
        # Ray Train's controller polls its workers every 2 s, and each report waits for a
        # poll (docs/design.md#ray-train-health-check-interval).
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        # Ray Data logs "Dataset ... execution finished" at INFO each time a dataset runs:
        # every epoch of every split, from its actors, between the progress lines.
        "RAY_DATA_LOG_LEVEL": "WARNING",
    }


MASK_HOOK = "jobs.secrets.mask_process_output"


def set_node_env(cpus: int | None = None) -> None:
    """Apply `node_env` to this process, keeping what the user set, before it starts a
    local Ray: the raylet and its workers inherit the environment."""
    for key, value in node_env(cpus).items():
        os.environ.setdefault(key, value)


def ensure_ray() -> None:
    """Join RAY_ADDRESS (a cluster, or inside a Ray job) if set; else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")  # empty means unset, as for Ray itself
    if not address:
        set_node_env()
        # "local", not None: with None, Ray joins whatever cluster last started on this
        # machine (its /tmp/ray/ray_current_cluster), another user's or a stopped one.
        address = "local"
    # The job's workers, on every node, mask passwords too: their output reaches the
    # console and Ray's logs. Inside a submitted job, Ray merges this into the job's own
    # runtime_env (which sets no hook: a key set twice would be a conflict).
    runtime_env = {"worker_process_setup_hook": MASK_HOOK}
    ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
