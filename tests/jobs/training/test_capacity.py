"""Checks of a job against the Ray cluster it runs on: room for the workers and a decode
task (autoscaling or not), CPUs per worker sized from the nodes, and an MLflow store every
node can reach. Clusters larger than this machine are described through `ray.nodes()`."""

from __future__ import annotations

import pytest

from jobs.config import CONFIGS, load_config
from jobs.training.capacity import check_capacity, check_tracking_store, fit_to_cluster, sized

from helpers import tracked_fit

GPU_NODE = {"CPU": 8.0, "GPU": 1.0}  # a KubeRay GPU pod: Ray's num-cpus is the pod's limit


def config(*sets: str):
    return load_config(CONFIGS / "demo-pretrain.yaml", ["data.dataset=/data/digits", *sets])


@pytest.fixture
def cluster(monkeypatch):
    """Describe the Ray cluster as `ray.nodes()` and `ray.cluster_resources()` report it:
    a list of alive nodes' resources (a dead node is always listed too, and ignored)."""
    import ray

    def describe(*nodes: dict[str, float]) -> None:
        listed = [{"Alive": True, "Resources": n} for n in nodes]
        listed.append({"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}})
        total: dict[str, float] = {}
        for node in nodes:
            for kind, amount in node.items():
                total[kind] = total.get(kind, 0) + amount
        monkeypatch.setattr(ray, "nodes", lambda: listed)
        monkeypatch.setattr(ray, "cluster_resources", lambda: total)

    return describe


def gpu_job(cpus, *sets: str):
    return config(
        "scaling.use_gpu=true",
        "scaling.autoscaling=true",
        f"scaling.cpus_per_worker={cpus}",
        "data.cpus_per_task=1",
        *sets,
    )


def test_autoscaling_still_refuses_workers_that_leave_no_node_room_to_decode(cluster):
    """The KubeRay trap: each GPU pod's CPUs all go to its worker and the head has none,
    so decode tasks never run; autoscaling used to skip the whole check."""
    cluster({"CPU": 0.0}, GPU_NODE, GPU_NODE)
    with pytest.raises(ValueError, match=r"room for one decode task of 1 CPU.*leaves 0 on the "
                       r"largest node that hosts workers \(8 CPU\)") as error:  # fmt: skip
        check_capacity(gpu_job(8))
    assert "CPU-only node group" in str(error.value)


def test_autoscaling_accepts_room_beside_a_worker_or_on_a_cpu_node(cluster):
    cluster({"CPU": 0.0}, GPU_NODE)
    check_capacity(gpu_job(7))  # one CPU of each GPU node left for decoding
    cluster({"CPU": 0.0}, GPU_NODE, {"CPU": 4.0})
    check_capacity(gpu_job(8))  # a CPU-only group decodes
    cluster({"CPU": 2.0})
    check_capacity(gpu_job(8))  # no GPU node yet: added on demand, nothing to judge


def test_a_fixed_cluster_still_checks_totals_and_nodes(cluster):
    cluster({"CPU": 0.0}, GPU_NODE, GPU_NODE)
    with pytest.raises(ValueError, match=r"17 CPU in all .*the cluster has 16"):
        check_capacity(gpu_job(8, "scaling.autoscaling=false"))
    cluster({"CPU": 1.0}, GPU_NODE, GPU_NODE)
    check_capacity(gpu_job(8, "scaling.autoscaling=false"))  # the head decodes


def test_auto_cpus_per_worker_leave_one_decode_task_room_on_the_largest_node(cluster):
    cluster({"CPU": 4.0}, {"CPU": 96.0, "GPU": 8.0}, {"CPU": 96.0, "GPU": 8.0})
    cfg = sized(gpu_job("auto", "scaling.num_workers=16", "train.batch_size=256"))
    assert cfg.scaling.cpus_per_worker == 11.87  # (96 - 1) / 8 workers a node, rounded down
    check_capacity(cfg)
    cluster({"CPU": 0.0}, {"CPU": 2.0})  # a head that runs nothing, and one node
    cpu = config("scaling.cpus_per_worker=auto", "data.cpus_per_task=0.25")
    assert sized(cpu).scaling.cpus_per_worker == 0.87  # (2 - 0.25) / 2 workers
    assert sized(cpu, driver_cpus=1).scaling.cpus_per_worker == 0.37  # a search trial's driver
    check_capacity(sized(cpu))


def test_workers_of_nodes_of_mixed_sizes_fit_each_on_one_node(cluster):
    """Totals and the largest node said yes to two workers of 15 CPUs on nodes of 16, 8
    and 8 CPUs, and the second worker waited forever: auto sized them from the largest."""
    cluster({"CPU": 16.0}, {"CPU": 8.0}, {"CPU": 8.0})
    with pytest.raises(ValueError, match=r"2 worker\(s\) of 15 CPU, each whole on one node, "
                       r"and its nodes \(16, 8, 8 CPU\) hold 1"):  # fmt: skip
        check_capacity(config("scaling.num_workers=2", "scaling.cpus_per_worker=15"))
    cpu = config("scaling.num_workers=2", "scaling.cpus_per_worker=auto", "data.cpus_per_task=1")
    assert sized(cpu).scaling.cpus_per_worker == 7.5  # both on the 16-CPU node, 1 left
    cluster({"CPU": 30.0, "GPU": 1.0}, {"CPU": 10.0, "GPU": 2.0})
    three = ["scaling.num_workers=3", "train.batch_size=96", "scaling.autoscaling=false"]
    with pytest.raises(ValueError, match=r"3 worker\(s\) of 9 CPU and 1 GPU, each whole on "
                       r"one node, and its nodes \(30, 10 CPU; 1, 2 GPU\) hold 2"):  # fmt: skip
        check_capacity(gpu_job(9, *three))  # 28 of 40 CPUs, 3 of 3 GPUs in all
    assert sized(gpu_job("auto", *three)).scaling.cpus_per_worker == 4.5  # (10 - 1) / 2
    check_capacity(sized(gpu_job("auto", *three)))


def test_auto_cpus_per_worker_need_a_node_that_hosts_workers(cluster):
    cluster({"CPU": 4.0})
    with pytest.raises(
        ValueError, match=r"has none yet .*; set scaling.cpus_per_worker to a number"
    ):
        sized(gpu_job("auto"))


@pytest.mark.parametrize("uri", [None, "sqlite:///tmp/mlflow.db", "file:///tmp/mlruns", "mlruns"])
def test_a_store_on_one_disk_is_refused_on_a_cluster_of_several_nodes(cluster, monkeypatch, uri):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(f"mlflow.tracking_uri={uri or 'null'}")
    cluster({"CPU": 2.0}, {"CPU": 2.0})
    with pytest.raises(ValueError, match=r"store on this node's disk, and the Ray cluster has "
                       r"2 nodes.*MLflow server.*http://") as error:  # fmt: skip
        check_tracking_store(cfg)
    assert (uri or "./mlflow.db") in str(error.value)
    cluster({"CPU": 2.0})
    check_tracking_store(cfg)  # one node: the embedded store is everyone's
    with pytest.raises(ValueError, match=r"may add nodes \(scaling.autoscaling\)"):
        check_tracking_store(
            config(f"mlflow.tracking_uri={uri or 'null'}", "scaling.autoscaling=true")
        )


def test_a_tracking_server_is_fine_on_any_cluster(cluster):
    cluster({"CPU": 2.0}, {"CPU": 2.0})
    check_tracking_store(config("mlflow.tracking_uri=http://mlflow.example:5000"))
    check_tracking_store(config("mlflow.enabled=false"))


def test_fit_refuses_a_local_store_on_two_nodes_before_any_run(
    ray_local, digits_dir, tmp_path, monkeypatch
):
    """Through the job itself: a ValueError (the CLI's exit 2) and no MLflow store opened."""
    import ray

    two = [{"Alive": True, "Resources": {"CPU": 2.0}}] * 2
    monkeypatch.setattr(ray, "nodes", lambda: two)
    cfg = load_config(
        CONFIGS / "demo-pretrain.yaml",
        [
            f"data.dataset={digits_dir / 'digits'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"run.storage_path={tmp_path / 'runs'}",
        ],
    )
    with pytest.raises(ValueError, match="2 nodes"):
        tracked_fit(cfg)
    assert not (tmp_path / "mlflow.db").exists()
    monkeypatch.undo()
    assert fit_to_cluster(cfg) == cfg  # the same job on this one-node Ray


def test_a_runs_cluster_tags_count_alive_nodes_and_name_their_cards(cluster, monkeypatch):
    """The run's ray.nodes, ray.gpus and gpu_type tags: a dead node counts for nothing."""
    from types import SimpleNamespace

    import ray

    from jobs.tracking.runs import cluster_tags

    h100 = {"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 1.0}
    cluster({"CPU": 4.0}, h100, {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0})
    context = SimpleNamespace(get_job_id=lambda: "02000000")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    assert cluster_tags() == {
        "ray.job_id": "02000000", "ray.nodes": "3", "ray.gpus": "9", "gpu_type": "A10G,H100"
    }  # fmt: skip
