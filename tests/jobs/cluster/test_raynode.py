"""The Ray that vitray starts: it keeps a data task's worker process between epochs, and its
workers stay quiet when Ray stops them."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, free_port


def test_a_task_worker_survives_an_idle_gap_while_training_holds_every_cpu(ray_local):
    """As in a Tune trial: the trial's placement group holds both CPUs, its data tasks
    run in a bundle of it. Ray's default soft limit (the free CPUs: none) killed the idle
    worker within a second, so the next epoch's task paid a new process and torch import."""
    ray = ray_local
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0.25)
    def worker_pid() -> int:
        return os.getpid()

    group = placement_group([{"CPU": 1.75}, {"CPU": 0.25}])
    ray.get(group.ready(), timeout=60)
    try:
        in_group = worker_pid.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, 1)
        )
        pid = ray.get(in_group.remote(), timeout=120)
        time.sleep(3)  # Ray's idle-worker killer acts on workers idle for 1 s
        assert psutil.pid_exists(pid), "Ray killed the idle worker: next epoch starts a new one"
    finally:
        remove_placement_group(group)


@pytest.mark.ray
def test_a_local_run_starts_its_own_ray_whatever_cluster_ran_here_before():
    """Without RAY_ADDRESS a command starts its own Ray. Ray's default would join the
    cluster recorded in <temp>/ray/ray_current_cluster: one left by an earlier `ray start`
    (here: nothing listens there), and the command waited for it forever."""
    temp = tempfile.mkdtemp(prefix="vr-")  # short: Ray's socket paths are limited
    try:
        (Path(temp) / "ray").mkdir()
        (Path(temp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        env = {**os.environ, "RAY_TMPDIR": temp, "RAY_DISABLE_USAGE_STATS": "1"}
        env.pop("RAY_ADDRESS", None)
        code = (
            "import ray; from jobs.cluster.raynode import ensure_ray; ensure_ray(); "
            "print('nodes', len(ray.nodes())); ray.shutdown()"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "nodes 1" in done.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)


FINALIZERS_RAISE = """
import sys, weakref
from jobs.cluster.raynode import quiet_exit_in_finalizers
sys.unraisablehook = quiet_exit_in_finalizers
class Box: pass
def stop(_):  # what Ray's SIGTERM handler does when the signal lands in a finalizer
    raise SystemExit(1)
def fail(_):
    raise KeyError("a real error")
for callback in (stop, fail):
    box = Box(); ref = weakref.ref(box, callback); del box
print("went on")
"""


def test_a_workers_exit_in_a_finalizer_is_quiet_and_other_errors_still_show():
    run = subprocess.run(
        [sys.executable, "-c", FINALIZERS_RAISE], capture_output=True, text=True, timeout=60
    )
    assert run.stdout == "went on\n"
    assert "SystemExit" not in run.stderr
    assert "Exception ignored in" in run.stderr and "KeyError: 'a real error'" in run.stderr


def test_a_worker_names_its_own_ray_for_rays_state_api(ray_local):
    """With two Rays on one machine (two local runs), Ray's state API in a worker (Ray
    Train's placement-group cleaner) cannot tell which is its own unless RAY_ADDRESS says."""
    ray = ray_local
    seen = ray.get(ray.remote(num_cpus=0.25)(lambda: os.environ.get("RAY_ADDRESS")).remote())
    assert seen == ray.get_runtime_context().gcs_address
