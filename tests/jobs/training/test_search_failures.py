"""Every way a search ends early marks its parent MLflow run FAILED, with why at the top of
its description, and raises: Tune raising, no trial reporting the metric, a pick without a
checkpoint, a stalled trial, Ctrl-C or SIGTERM inside Tune (trials left unfinished) and
SIGTERM after it.
Tune itself is replaced by a tuner that ends each way; Ray, MLflow and the driver are real."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pandas as pd
import pytest

from jobs.config import load_config
from jobs.tracking.runs import DESCRIPTION_TAG, recorded_run_id
from jobs.training.search import driver
from jobs.training.search.pick import NothingToRegister
from jobs.training.search.watchdog import WATCHDOG, SearchStopped

from helpers import search_config, tracked_search


def result(val_top1: float | None, error: Exception | None = None) -> SimpleNamespace:
    """What the driver reads of a ray.tune Result: a trial's last report, no checkpoint."""
    metrics = {} if val_top1 is None else {"val_top1": val_top1, "step": 10, "epoch": 1}
    return SimpleNamespace(
        metrics=metrics,
        metrics_dataframe=pd.DataFrame([metrics]),
        error=error,
        checkpoint=None,
        path="/runs/search/run_trial_0",
        config={"train.lr": 1e-3},
    )


def stall() -> list:
    WATCHDOG.stalled = "run_trial_0 {'train.lr': 0.001}"
    WATCHDOG.reason = f"trial {WATCHDOG.stalled} reported nothing for 241 s"
    return [result(0.5)]


def terminate() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # `ray job stop`, a pod deleted
    time.sleep(5)
    raise AssertionError("SIGTERM did not stop the search")


def terminate_inside_tune() -> list:
    """SIGTERM while Tune runs: its own interrupt (as Ctrl-C), which it answers by saving
    the search's state and returning with trials unfinished."""
    from ray.tune.tune import _setup_signal_catching  # what Tuner.fit() installs

    interrupted = _setup_signal_catching()
    os.kill(os.getpid(), signal.SIGTERM)
    assert interrupted.wait(5), "SIGTERM did not reach Tune's handler"
    return []


def raise_(error: BaseException):
    raise error


ENDINGS = {
    "tune raised": (lambda: raise_(RuntimeError("the Ray head went away")), RuntimeError,
                    "RuntimeError: the Ray head went away"),
    "no trial reported": (lambda: [result(None, ValueError("bad lr"))], RuntimeError,
                          "no trial reported val_top1; errors: ['bad lr']"),
    "no checkpoint": (lambda: [result(0.9)], NothingToRegister,
                      "nothing to register: the chosen trial run_trial_0 (val_top1 0.9000)"),
    "stalled": (stall, SearchStopped, "reported nothing for 241 s"),
    "SIGTERM after Tune": (lambda: [result(0.9)], KeyboardInterrupt,
                           "interrupted; run the same command again"),
}  # fmt: skip


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_search_that_ends_early_fails_its_parent_run_saying_why(
    ray_local, digits_dir, mlflow_server, tmp_path, monkeypatch, ending
):
    from mlflow import MlflowClient

    fit, raised, reason = ENDINGS[ending]
    monkeypatch.setattr(driver, "build_tuner", lambda *_: SimpleNamespace(fit=fit))
    monkeypatch.setattr(driver, "unfinished_trials", lambda run_dir: [])
    if ending == "SIGTERM after Tune":  # while the pick is scored and logged
        monkeypatch.setattr(driver, "finish", lambda *_: terminate())
    cfg = load_config(search_config(tmp_path, digits_dir / "digits", mlflow_server, "ends"))
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(raised):
        tracked_search(cfg)
    assert signal.getsignal(signal.SIGTERM) is previous  # handed back
    run = MlflowClient(mlflow_server).get_run(recorded_run_id(str(tmp_path / "runs" / "ends")))
    assert run.info.status == "FAILED"
    about = run.data.tags[DESCRIPTION_TAG]
    assert about.startswith("**Failed:** ") and reason in about.splitlines()[0], about
    assert "`vitray " in about  # the command that resumes it stays


@pytest.mark.parametrize("fit", [lambda: [], terminate_inside_tune], ids=["Ctrl-C", "SIGTERM"])
def test_a_search_tune_returned_from_with_trials_unfinished_is_interrupted(
    ray_local, digits_dir, mlflow_server, tmp_path, monkeypatch, fit
):
    """Ctrl-C or SIGTERM inside `tuner.fit()`: Tune saves its state and returns; afterwards
    Ctrl-C works again (Tune leaves its handler installed)."""
    from mlflow import MlflowClient

    monkeypatch.setattr(driver, "build_tuner", lambda *_: SimpleNamespace(fit=fit))
    monkeypatch.setattr(driver, "unfinished_trials", lambda run_dir: ["a", "b"])
    before = signal.getsignal(signal.SIGINT)
    cfg = load_config(search_config(tmp_path, digits_dir / "digits", mlflow_server, "ctrl-c"))
    with pytest.raises(SearchStopped, match="interrupted with 2 trial"):
        tracked_search(cfg)
    assert signal.getsignal(signal.SIGINT) is before
    run = MlflowClient(mlflow_server).get_run(recorded_run_id(str(tmp_path / "runs" / "ctrl-c")))
    assert run.info.status == "FAILED"
    assert "interrupted with 2 trial(s) unfinished" in run.data.tags[DESCRIPTION_TAG]
