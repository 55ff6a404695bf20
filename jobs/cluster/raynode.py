"""The Ray that vitray starts itself: a local Ray for a job, or `vitray cluster local up`."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from jobs.secrets import load_job_credentials, mask_process_output


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
        # Ray Train starts an actor per run that watches for nodes a cloud autoscaler
        # drains; the nodes vitray starts itself are this machine's, never drained. Without
        # it, a one-epoch run took ~4 s less CPU (docs/design.md#ray-trains-preemption-watcher)
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }


SETUP_HOOK = "jobs.cluster.raynode.setup_worker"  # every worker of a Ray vitray runs on

# Ray's notices that a vitray user cannot act on, in every vitray process: token auth is
# vitray's own choice; the progress bars are off because jobs print their own progress
# lines; Tune says where it wrote its state after every search. Ray's warnings still show.
RAY_NOTICES = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.data._internal.progress": logging.ERROR,
    "ray.tune.tune": logging.WARNING,
}


def quiet_ray_notices() -> None:
    """RAY_NOTICES' loggers turned down, and the deprecation warnings that Ray's own
    internals raise against Ray's own APIs (Ray Data's in Ray Train, each run) dropped."""
    for name, level in RAY_NOTICES.items():
        logging.getLogger(name).setLevel(level)
    # (by module, not RayDeprecationWarning itself: importing Ray here would slow every command)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")


def setup_worker() -> None:
    """Ray's `worker_process_setup_hook`: a worker's output masked (jobs.secrets) and quiet
    as the driver's, and the worker bound to its own Ray: Ray Train's placement-group
    cleaner asks Ray's state API for "the" cluster, which fails with a traceback when a
    second Ray runs on the machine (two local runs) unless RAY_ADDRESS names it."""
    import ray

    mask_process_output()
    load_job_credentials()
    quiet_ray_notices()
    sys.unraisablehook = quiet_exit_in_finalizers
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # whatever it inherited


def quiet_exit_in_finalizers(unraisable: Any) -> None:
    """Python's default report of an exception a finalizer raised, but for SystemExit: Ray
    stops a worker on SIGTERM by raising it, and when that lands in a weakref callback Python
    prints its traceback as "Exception ignored in", at random, on the user's console."""
    if not isinstance(unraisable.exc_value, SystemExit):
        sys.__unraisablehook__(unraisable)


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
    runtime_env = {"worker_process_setup_hook": SETUP_HOOK}
    ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
