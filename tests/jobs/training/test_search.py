"""The search's contracts with Ray when trials have several workers (Train V2): a trial
holds its driver only, concurrency is capped by what the cluster holds, a trial's data
runs outside its placement group, and the chosen model is the checkpoint a trial reported,
or the search fails saying there is nothing to register."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from jobs.config import load_config
from jobs.training.search.driver import finish
from jobs.training.search.pick import NothingToRegister, select_best
from jobs.training.search.resources import concurrent_trials, trial_resources
from jobs.training.search.trial import trial_trainer
from jobs.training.search.watchdog import Watchdog

from helpers import search_config

TWO_WORKERS = ["scaling.num_workers=2", "scaling.cpus_per_worker=0.25"]


@pytest.fixture
def cfg(tmp_path, digits_dir):
    """The digits search config of tests/e2e/test_tune.py, no tracking."""
    path = search_config(tmp_path, digits_dir / "digits", "", "search")
    return lambda *sets: load_config(path, ["mlflow.enabled=false", *sets])


def test_a_multi_worker_trial_reserves_its_driver_only(cfg):
    """Its TorchTrainer reserves the workers; reserving them in the trial as well booked
    every GPU twice."""
    assert trial_resources(cfg(*TWO_WORKERS)).bundles == [{"CPU": 1.0}]
    gpu = trial_resources(cfg("scaling.num_workers=4", "scaling.use_gpu=true"))
    assert gpu.required_resources == {"CPU": 1.0}
    one = trial_resources(cfg())  # runs its worker itself: the worker plus a data bundle
    assert one.bundles == [{"CPU": 0.75}, {"CPU": 0.25}]


@pytest.mark.parametrize(
    "resources, sets, expected",
    [
        ({"CPU": 64.0, "GPU": 8.0}, ["scaling.use_gpu=true", "tune.max_concurrent=8"], 4),
        ({"CPU": 3.5, "GPU": 8.0}, ["scaling.use_gpu=true", "tune.max_concurrent=8"], 2),
        ({"CPU": 2.0}, ["tune.max_concurrent=4"], 1),  # driver 1 + 2 x 0.25 + decode 0.25
        ({"CPU": 8.0}, ["tune.max_concurrent=3"], 3),
        ({"CPU": 2.0}, ["tune.max_concurrent=4", "scaling.autoscaling=true"], 4),
    ],
)
def test_concurrent_trials_are_capped_by_what_the_cluster_holds(
    cfg, monkeypatch, resources, sets, expected
):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert concurrent_trials(cfg(*TWO_WORKERS, *sets)) == expected


def test_a_multi_worker_trials_data_runs_outside_its_placement_group(ray_local, cfg):
    """A trial's group is its driver's single CPU, held by the driver: decode tasks pinned
    into it (as a dataset built in the trial is) never run."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from jobs.training.fit import build_datasets
    from jobs.training.plan import make_plan

    job = cfg(*TWO_WORKERS)
    plan, _ = make_plan(job)

    @ray.remote(num_cpus=1)
    class Driver:  # as Tune places a trial: in its group, capturing what it starts
        def first_batch(self, outside: bool) -> int:
            from jobs.training.search.trial import datasets_outside_trial

            if outside:
                datasets = ray.get(datasets_outside_trial.remote(job, plan))
            else:
                datasets = build_datasets(job, plan)
            return len(next(iter(datasets["train"].iter_batches(batch_size=8)))["label"])

    group = placement_group([{"CPU": 1.0}])
    ray.get(group.ready(), timeout=120)
    strategy = PlacementGroupSchedulingStrategy(group, 0, placement_group_capture_child_tasks=True)
    driver = Driver.options(scheduling_strategy=strategy).remote()
    try:
        assert ray.get(driver.first_batch.remote(outside=True), timeout=180) == 8
        with pytest.raises(GetTimeoutError):  # built in the trial: waits forever
            ray.get(driver.first_batch.remote(outside=False), timeout=20)
    finally:
        ray.kill(driver)
        remove_placement_group(group)


def test_the_chosen_model_is_the_reported_checkpoint_or_the_search_fails(ray_local, cfg, tmp_path):
    """Trials that drive a TorchTrainer report no Tune checkpoint, only the path of their
    trainer's (`checkpoint_path` in their reports). The search takes the model from that
    path; when the chosen trial reported none, it fails saying so, instead of finishing
    with nothing registered."""
    from ray import tune

    from jobs.training.plan import make_plan

    saved = tmp_path / "trainer" / "checkpoint_000002"
    saved.mkdir(parents=True)
    (saved / "model.safetensors").write_bytes(b"weights")

    def trial(config: dict) -> None:
        report = {"val_top1": config["val"], "step": 20, "epoch": 2}
        if config["val"] > 0.8:
            report["checkpoint_path"] = str(saved)
        tune.report(report)

    results = tune.Tuner(
        trial,
        param_space={"val": tune.grid_search([0.9, 0.5])},
        tune_config=tune.TuneConfig(metric="val_top1", mode="max"),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="reported"),
    ).fit()
    job = cfg()
    plan, _ = make_plan(job)
    dog = Watchdog(budget_s=60, stall_s=60)
    outcome = finish(job, plan, results, None, None, dog)
    assert outcome.best_metric == 0.9
    with outcome.best_checkpoint.as_directory() as d:
        assert Path(d).samefile(saved)

    without = [r for r in results if r.metrics["val_top1"] == 0.5]
    with pytest.raises(NothingToRegister, match=r"nothing to register: the chosen trial \S+ "
                       r"\(val_top1 0.5000\) reported no checkpoint") as error:  # fmt: skip
        finish(job, plan, without, None, None, dog)
    assert "checkpoint_path" in str(error.value)


@pytest.mark.parametrize("metric, mode", [("val_top1", "max"), ("val_loss", "min")])
def test_a_multi_worker_trial_keeps_its_checkpoints_by_the_searchs_metric(cfg, metric, mode):
    """Its trainer prunes checkpoints past `run.num_to_keep` by a score: by val_top1 alone,
    the peak of a search on another metric could be deleted before the search picks it."""
    from ray.train import UserCallback

    from jobs.training.plan import make_plan

    trial = cfg(*TWO_WORKERS, f"tune.metric={metric}", f"tune.mode={mode}")
    plan, _ = make_plan(trial, start=None)
    kept = trial_trainer(trial, plan, {}, None, UserCallback()).run_config.checkpoint_config
    assert (kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (metric, mode)


def test_a_trial_hands_tune_every_report_its_trainer_made_the_last_one_too(ray_local, tmp_path):
    """A trainer whose last report comes just as it ends: each report with a checkpoint
    reaches Tune in order with the trial's run, the rest do not, and a trainer that fails
    fails the trial with its error."""
    from types import SimpleNamespace

    from ray import tune
    from ray.util.queue import Queue

    from jobs.training.search.trial import EpochReports, forward_reports

    class Trainer:
        def __init__(self, reports: EpochReports, fail: bool) -> None:
            self.reports, self.fail = reports, fail

        def fit(self) -> None:
            for epoch in (1, 2, 3):
                self.reports.after_report(None, [{"epoch": epoch - 0.5}], None)
                saved = SimpleNamespace(path=f"/checkpoints/{epoch}")
                self.reports.after_report(None, [{"epoch": epoch}], saved)
            if self.fail:
                raise RuntimeError("rank 1 ran out of memory")

    def trial(config: dict) -> None:
        queue = Queue(actor_options={"num_cpus": 0})
        forward_reports(Trainer(EpochReports("run-1", queue), config["fail"]), queue)

    results = tune.Tuner(
        trial,
        param_space={"fail": tune.grid_search([False, True])},
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="forward"),
    ).fit()
    ok, failed = sorted(results, key=lambda r: r.error is not None)
    history = ok.metrics_dataframe
    assert list(history["epoch"]) == [1, 2, 3]
    assert list(history["checkpoint_path"]) == [f"/checkpoints/{e}" for e in (1, 2, 3)]
    assert set(history["mlflow_run_id"]) == {"run-1"}
    assert "rank 1 ran out of memory" in str(failed.error)


@dataclass
class Trial:
    """What select_best reads of a ray.tune Result: reports of (step, val_top1)."""

    name: str
    reports: list[tuple[int, float]]

    @property
    def metrics(self) -> dict:
        step, val = self.reports[-1]
        return {"step": step, "val_top1": val}

    @property
    def metrics_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self.reports, columns=["step", "val_top1"])

    @property
    def checkpoint(self) -> str:
        return f"{self.name} final"

    def get_best_checkpoint(self, metric: str, mode: str) -> str:
        return f"{self.name} peak"


def test_the_search_picks_the_final_model_of_the_longest_trials_not_a_lucky_epoch():
    stopped = Trial("stopped", [(19, 0.95), (38, 0.99)])  # ASHA stopped it at its rung
    lucky = Trial("lucky", [(38, 0.99), (76, 0.97), (190, 0.975)])  # peaked early
    steady = Trial("steady", [(38, 0.96), (76, 0.97), (190, 0.98)])
    trials = [stopped, lucky, steady]
    assert select_best(trials, "val_top1", "max", "final") == (steady, "steady final", 0.98)
    assert select_best(trials, "val_top1", "max", "peak") == (stopped, "stopped peak", 0.99)
    assert select_best(trials, "val_top1", "min", "final")[0] is lucky


def test_watchdog_budget_and_stall_rules():
    dog = Watchdog(budget_s=60, stall_s=10)
    dog.alive["a"] = time.monotonic()
    dog.names["a"] = "a {'train.lr': 0.1}"
    assert not dog.check()
    dog.alive["a"] -= 11
    assert dog.check() and dog.stalled == "a {'train.lr': 0.1}"
    dog.reset(budget_s=0, stall_s=10)
    assert dog.check() and "time budget" in dog.reason and dog.stalled is None


H100_NODE = {"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 1.0}
GPU = ["scaling.use_gpu=true"]


@pytest.mark.parametrize(
    "nodes, sets, expected",
    [
        ([{"CPU": 2.0}], [], 0.25),  # CPU trials: one decode task
        ([H100_NODE], [*GPU, "scaling.cpus_per_worker=1"], 7.0),  # B/16 needs 6.3 cores
        # a GPU's share of its node: 8 CPUs a GPU, 6 of them the worker's
        ([H100_NODE], [*GPU, "scaling.cpus_per_worker=6"], 2.0),
        ([H100_NODE], [*GPU, "tune.trial_decode_cpus=3"], 3.0),
        # a card with no known peak: one decode task
        ([{"CPU": 64.0, "GPU": 8.0, "accelerator_type:T4": 1.0}], GPU, 0.25),
    ],
)
def test_a_one_gpu_trial_keeps_the_decode_cpus_its_gpu_consumes(
    cfg, monkeypatch, nodes, sets, expected
):
    """One decode CPU fed a one-GPU trial a fraction of what it trains: under auto the data
    bundle holds the cores B/16 at 224 px needs at 50% MFU (6.3 at the measured rate), at
    most its GPU's share of the node, so that every GPU can still run a trial."""
    import jobs.training.search.resources as resources
    from vit import ViTConfig

    monkeypatch.setattr(resources, "alive_nodes", lambda: nodes)
    b16 = ViTConfig.from_preset("b/16", image_size=224)
    assert trial_resources(cfg(*sets), b16).bundles[1] == {"CPU": expected}


def test_a_small_model_on_a_gpu_still_lets_every_gpu_run_a_trial(cfg, monkeypatch):
    """28 px images train so fast that no node could feed them: the bundle stops at the
    GPU's share of the node, and 8 trials run on 8 GPUs."""
    import ray

    import jobs.training.search.resources as resources
    from vit import ViTConfig

    monkeypatch.setattr(resources, "alive_nodes", lambda: [H100_NODE])
    monkeypatch.setattr(ray, "cluster_resources", lambda: H100_NODE)
    small = ViTConfig.from_preset("micro/4", image_size=28)
    sets = [*GPU, "scaling.cpus_per_worker=2", "tune.max_concurrent=8"]
    assert trial_resources(cfg(*sets), small).bundles[1] == {"CPU": 6.0}
    assert concurrent_trials(cfg(*sets), small) == 8


def test_decode_cpus_no_node_holds_are_refused_by_name(cfg, monkeypatch):
    import jobs.training.search.resources as resources

    monkeypatch.setattr(resources, "alive_nodes", lambda: [H100_NODE])
    with pytest.raises(ValueError, match="tune.trial_decode_cpus: 80 CPUs.*no node has more"):
        trial_resources(cfg(*GPU, "tune.trial_decode_cpus=80"))
