"""The search's watchdog: stops it when its time budget is spent or a running trial goes
silent, and names that trial."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ray.tune import Callback, Stopper


class SearchStopped(RuntimeError):
    """The search stopped before its end: a trial stalled, or it was interrupted."""


@dataclass
class Watchdog:
    """Tracks the last sign of life of every running trial, for the stopper below."""

    budget_s: float
    stall_s: float
    started: float = field(default_factory=time.monotonic)
    alive: dict[str, float] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    stalled: str | None = None

    def reset(self, budget_s: float, stall_s: float) -> None:
        self.budget_s, self.stall_s, self.started = budget_s, stall_s, time.monotonic()
        self.alive, self.names, self.reason, self.stalled = {}, {}, None, None

    def check(self) -> bool:
        now = time.monotonic()
        if now - self.started > self.budget_s:
            self.reason = f"time budget of {self.budget_s:.0f} s spent"
            return True
        for trial_id, seen in self.alive.items():
            if now - seen > self.stall_s:
                self.stalled = self.names.get(trial_id, trial_id)
                self.reason = f"trial {self.stalled} reported nothing for {now - seen:.0f} s"
                return True
        return False


# The driver's watchdog. Tune pickles its callbacks and stopper with the experiment (and
# unpickles them on restore), so the two hooks look the watchdog up instead of holding it.
WATCHDOG = Watchdog(budget_s=float("inf"), stall_s=float("inf"))


class WatchdogFeed(Callback):
    def on_trial_start(self, iteration, trials, trial, **info):
        WATCHDOG.alive[trial.trial_id] = time.monotonic()
        WATCHDOG.names[trial.trial_id] = f"{trial.trial_id} {trial.config}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        WATCHDOG.alive[trial.trial_id] = time.monotonic()

    def on_trial_complete(self, iteration, trials, trial, **info):
        WATCHDOG.alive.pop(trial.trial_id, None)

    on_trial_error = on_trial_complete


class WatchdogStop(Stopper):
    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return WATCHDOG.check()
