"""A search config is checked before Ray starts, and the check agrees with Ray: every
combination of search algorithm, scheduler and distribution that `check_search` accepts,
Ray Tune runs to a pick (the trials a plain function reporting as ours do), and every one it
refuses, Ray refuses or runs to no pick. Refusals exit 2 naming the key, no run opened."""

from __future__ import annotations

import itertools

import pytest

from jobs.cli import main
from jobs.config import ConfigError, load_config
from jobs.training.search.driver import build_tuner
from jobs.training.search.space import check_search
from jobs.training.search.watchdog import WATCHDOG

from helpers import search_config

DISTRIBUTIONS = {
    "loguniform": {"loguniform": [1e-4, 1e-2]},
    "uniform": {"uniform": [1e-4, 1e-2]},
    "randint": {"randint": [2, 4]},
    "choice": {"choice": [1e-3, 3e-3]},
    "grid": {"grid": [1e-3, 3e-3]},
}
KEYS = {"randint": "train.warmup_steps"}  # a key that takes integers; train.lr otherwise


def config(tmp_path, digits_dir, search: str, scheduler: str, dist: str, **tune):
    key = KEYS.get(dist, "train.lr")
    path = search_config(
        tmp_path, digits_dir / "digits", "", f"{search}-{scheduler}-{dist}", epochs=2,
        space={key: DISTRIBUTIONS[dist]}, search=search, scheduler=scheduler, num_samples=1,
        **tune,
    )  # fmt: skip
    return load_config(path, ["mlflow.enabled=false"])


def ray_runs(cfg) -> bool:
    def trial(sample: dict) -> None:  # nested: pickled by value to Ray's workers
        """Reports as our trials do, at each epoch's end."""
        from ray import tune

        for epoch in (1, 2):
            tune.report({"val_top1": 0.5, "val_top5": 0.9, "loss": 1.0, "epoch": epoch})

    WATCHDOG.reset(float("inf"), float("inf"))  # a search earlier in the session set it
    try:
        results = build_tuner(cfg, trial, concurrent=1).fit()
    except Exception:
        return False
    # with FIFO, Tune runs a search whose metric no trial reports; it fails at the pick
    return not any(r.error for r in results) and all(cfg.tune.metric in r.metrics for r in results)


COMBINATIONS = [
    *[(s, sch, d, {}) for s, sch, d in itertools.product(
        ["random", "optuna"], ["asha", "fifo"], DISTRIBUTIONS)],
    ("random", "fifo", "uniform", {"grace_period": 3}),  # FIFO has no rungs
    ("random", "fifo", "uniform", {"metric": "val_top5"}),
    ("random", "fifo", "uniform", {"metric": "loss", "mode": "min"}),
    ("random", "fifo", "uniform", {"metric": "val_loss", "mode": "min"}),  # never reported
]  # fmt: skip


@pytest.mark.parametrize("search, scheduler, dist, tune", COMBINATIONS)
def test_check_search_accepts_exactly_what_ray_runs(
    ray_local, digits_dir, tmp_path, search, scheduler, dist, tune
):
    cfg = config(tmp_path, digits_dir, search, scheduler, dist, **tune)
    try:
        check_search(cfg)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == ray_runs(cfg)


@pytest.mark.parametrize(
    "tune, names",
    [
        ({"search": "optuna", "space": {"train.lr": {"grid": [1e-3, 3e-3]}}},
         "tune.space.train.lr: tune.search optuna does not take grid"),
        ({"grace_period": 3}, "tune.grace_period 3 is above train.epochs 2"),  # the schema's
        ({"metric": "val_acc"}, "tune.metric 'val_acc': trials report val_top1, val_top5, loss"),
        ({"metric": "loss"}, "tune.mode max: loss is better lower"),
        ({"space": {"train.lrate": {"choice": [1e-3]}}}, "train.lrate is not a config key"),
        ({"space": {"train.batch_size": {"choice": [64, 0]}}},
         "tune.space.train.batch_size: a trial with train.batch_size=0"),
        ({"space": {}}, "tune.space is empty"),
    ],
)  # fmt: skip
def test_a_search_ray_would_refuse_exits_2_naming_the_key_before_any_run(
    digits_dir, tmp_path, capsys, tune, names
):
    path = search_config(tmp_path, digits_dir / "digits", "", "refused", epochs=2, **tune)
    store = tmp_path / "mlflow.db"
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--config", str(path), "--set", f"mlflow.tracking_uri=sqlite:///{store}"])
    assert exit_.value.code == 2
    assert names in capsys.readouterr().err
    assert not store.exists() and not (tmp_path / "runs").exists()  # no run, no Ray
