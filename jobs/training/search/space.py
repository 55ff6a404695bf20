"""The config's `tune:` section as Ray Tune's objects: the search space, the scheduler and
the search algorithm; and `check_search`, which builds them before Ray starts so that a
config Ray would refuse stops with exit 2 naming the key, before a parent run is opened."""

from __future__ import annotations

from typing import Any

from jobs.config import ConfigError, JobConfig, with_values

# What every trial reports at each epoch's end (the reports schedulers compare), and the
# direction in which each is better.
SEARCHABLE = {"val_top1": "max", "val_top5": "max", "loss": "min"}


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """YAML distributions -> Ray Tune's, keyed by the dotted config key."""
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),  # YAML's [lo, hi] is inclusive
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {key: make[kind](args) for key, dist in space.items() for kind, args in dist.items()}


def scheduler(cfg: JobConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.train.epochs,
        grace_period=t.grace_period,
        reduction_factor=t.reduction_factor,
        # A trial at train.epochs ends by itself. Stopped there by ASHA instead, a
        # multi-worker trial's process was killed while its trainer shut down, leaving
        # the workers' placement group to Ray's cleaner (which needs the state API).
        stop_last_trials=False,
    )


def search_algorithm(cfg: JobConfig) -> Any:
    """None for random search (Tune's default sampler), else the named algorithm."""
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)
    return None


def values_of(dist: dict[str, list]) -> list[Any]:
    """The values a distribution can give that bound all the others: both ends of a range,
    every listed one."""
    kind, args = next(iter(dist.items()))
    return list(args) if kind in ("choice", "grid") else [args[0], args[1]]


def check_search(cfg: JobConfig) -> None:
    """Raise ConfigError (exit 2) naming the key for a search Ray or the trials would
    refuse once started. (The scheduler's own limits, such as ASHA's grace period within
    train.epochs, are the config schema's.)"""
    t = cfg.tune
    if not t.space:
        raise ConfigError("tune.space is empty: name at least one config key to search")
    if t.metric not in SEARCHABLE:
        raise ConfigError(
            f"tune.metric {t.metric!r}: trials report {', '.join(SEARCHABLE)} at each epoch's "
            "end; the search compares one of them"
        )
    if t.mode != SEARCHABLE[t.metric]:
        better = "higher" if SEARCHABLE[t.metric] == "max" else "lower"
        raise ConfigError(
            f"tune.mode {t.mode}: {t.metric} is better {better}, so the search would pick the "
            f"worst trial; use tune.mode {SEARCHABLE[t.metric]}"
        )
    for key, dist in t.space.items():
        for value in values_of(dist):
            try:
                with_values(cfg, {key: value})
            except ValueError as e:
                raise ConfigError(f"tune.space.{key}: a trial with {key}={value!r}: {e}") from None
    if search_algorithm(cfg) is None:
        return
    for key, dist in t.space.items():  # one key at a time, to name the one refused
        try:
            search_algorithm(cfg).set_search_properties(t.metric, t.mode, search_space({key: dist}))
        except ValueError as e:
            kind = next(iter(dist))
            raise ConfigError(
                f"tune.space.{key}: tune.search {t.search} does not take {kind}: {e} "
                "(use choice, or tune.search random)"
            ) from None
