"""What a person sees: `vitray demo` (shortened to 2 epochs and 2 trials) prints vitray's
own lines, Tune's status tables and warnings a user can act on, and none of the notices of
Ray's and MLflow's internals that it printed before (docs/benchmarks.md counts the lines of
the whole demo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# Seen in the demo's console before, none actionable by its user.
NOISE = {
    "Ray Data's progress-bar notice": "Progress bars disabled",
    "Ray's deprecation warnings against its own APIs": "RayDeprecationWarning",
    "a FutureWarning from DDP's arguments": "FutureWarning",
    "Tune's snapshot warning": "snapshotting has been triggered",
    "MLflow's type-hint advice": "Add type hints",
    "MLflow's INFO lines": "INFO mlflow",
    "Ray's token-auth notice": "Token authentication is enabled",
    "Tune's state-written INFO line": "Wrote the latest version of all result files",
    "Ray's C++ log lines": "core_worker.cc",
    "the raylet's warning on worker processes started": "worker processes have been started",
    "MLflow's registration lines": "Successfully registered model",
    "TensorBoard's command for Tune's duplicate event files": "tensorboard --logdir",
    "Ray's deduplication of the trials' progress lines": "repeated",
    "a traceback (Ray's SIGTERM in a stopped worker's finalizer)": "Traceback",
}

# What may be printed: vitray's own lines, Tune's status blocks, Ray's line naming the
# dashboard; anything else is a line the user cannot place.
ALLOWED = [
    r"$",
    r"\s*[╭│├╰]",  # Tune's tables
    r"(Trial status|Current time|Logical resource usage|Current best trial|View detailed "
    r"results here):? ",
    r"Trial \S+ (started with configuration|completed after|finished iteration|saved a)",
    r"\(run_trial pid=\d+\) run_trial_\w+: step \d+/\d+ epoch ",  # a trial's progress
    r"\S+ \S+\s+INFO worker\.py:\d+ -- Started a local Ray instance\. View the dashboard",
    r"INFO vit\.",
    r"(prepare|wrote|pretrain|step|fine-tune start|data from the weights' preprocessing|"
    r"MLflow run|tune|test top-1|registered|vitray demo finished|open the MLflow UI):? ",
    r"  (pretrain|fine-tune|test top-1|registered|experiment|search run|best trial run) ",
]


def test_the_demo_console_is_vitrays_lines_and_tunes_tables(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= {"RAY_DISABLE_USAGE_STATS": "1", "VITRAY_DATA": str(tmp_path / "data")}
    demo = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "demo", "--set", "train.epochs=2",
         "--set", "tune.num_samples=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    console = re.sub(r"\x1b\[[0-9;]*m", "", demo.stdout + demo.stderr)
    assert demo.returncode == 0, console[-4000:]
    seen = {what: text for what, text in NOISE.items() if text in console}
    assert seen == {}, console
    strangers = [line for line in console.splitlines() if not any_match(ALLOWED, line)]
    assert strangers == [], console
    assert "vitray demo finished" in console and "Trial status:" in console


def any_match(patterns: list[str], line: str) -> bool:
    return any(re.match(pattern, line) for pattern in patterns)
