"""The Ray that vitray starts keeps a data task's worker process between epochs."""

import os
import time

import psutil


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
