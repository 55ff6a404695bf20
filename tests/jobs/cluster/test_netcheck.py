"""`vitray cluster check` refuses what Ray could never place (tests/e2e/test_cluster.py runs
it on two nodes)."""

import pytest

from jobs.cluster.netcheck import bus_gbps, check


def test_a_check_that_ray_could_never_place_is_refused_before_it_waits(ray_local):
    """One node and no GPU: two workers one per node would wait forever for a second."""
    with pytest.raises(ValueError, match="one per GPU .* 1 node\\(s\\) with 0.5 CPUs"):
        check(size_mib=1, iterations=1, workers=None, cpus_per_worker=0.5)


def test_bus_bandwidth_is_what_each_link_of_a_ring_carries():
    """nccl-tests' busbw: 2 ranks move the tensor once each way; 8 move 2 x 7/8 of it."""
    assert bus_gbps(10**9, 1.0, 2) == pytest.approx(1.0)
    assert bus_gbps(10**9, 1.0, 8) == pytest.approx(1.75)
