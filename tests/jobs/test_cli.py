"""The command line: a path that does not exist is a usage error (exit 2) that names it."""

import pytest

from jobs.cli import main
from jobs.config import CONFIGS

MISSING = "/nonexistent/vitray-input"


@pytest.mark.parametrize(
    "argv",
    [
        ["info", MISSING],
        ["convert", "--from", "timm", MISSING, "OUT"],
        ["convert", "--to", "timm", MISSING, "OUT"],
        ["prepare", MISSING, "OUT"],
        ["visualize", MISSING],
        ["evaluate", MISSING, "--data", "builtin:digits"],
        ["predict", MISSING, "--input", "builtin:digits", "--output", "OUT"],
        ["pretrain", "--config", MISSING],
        ["pretrain", "--config", str(CONFIGS / "demo-pretrain.yaml"),
         "--set", f"data.dataset={MISSING}", "--set", "mlflow.enabled=false"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)  # fmt: skip
def test_a_missing_path_exits_2_naming_it(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert MISSING in capsys.readouterr().err


@pytest.mark.parametrize("debug", ["", "1"])
@pytest.mark.parametrize("code", [2, 1])
def test_vitray_debug_prints_the_traceback_of_every_error(
    capsys, tmp_path, monkeypatch, code, debug
):
    """Exit 2 (bad input) and exit 1 (a run that failed: here, its run directory held by
    another run) print one line; with VITRAY_DEBUG=1 the traceback above it."""
    from jobs.training.runlock import run_lock

    monkeypatch.setenv("VITRAY_DEBUG", debug)
    monkeypatch.chdir(tmp_path)
    argv = ["pretrain", "--config", str(CONFIGS / "demo-pretrain.yaml"), "--set",
            f"run.storage_path={tmp_path}", "--set", "run.name=held", "--set",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    if code == 2:
        argv[2] = MISSING
    with run_lock(str(tmp_path / "held")), pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code
    assert ("Traceback (most recent call last)" in err) == bool(debug), err
    assert (
        err.rstrip()
        .splitlines()[-1]
        .startswith(f"vitray pretrain: {'error' if code == 2 else 'failed'}: ")
    )


def test_the_console_filters_skip_rays_internal_lines_and_keep_every_progress_line():
    """Ray's deduplicator drops what RAY_DEDUP_LOGS_SKIP_REGEX matches and never folds what
    RAY_DEDUP_LOGS_ALLOW_REGEX matches; these are the lines each pattern is for."""
    import re

    from jobs.cli import CPP_LOG_LINE, PROGRESS_LINE, WORKER_START_WARNING

    skip = re.compile(f"{CPP_LOG_LINE}|{WORKER_START_WARNING}")
    raylet = (
        "WARNING: 8 PYTHON worker processes have been started on node: 21e7 with address: "
        "192.0.2.2, which is 4x the maximum expected startup concurrency (2)."
    )
    cpp = "[2026-12-05 10:00:00,123 E 123 456] core_worker.cc:512: PreemptionWatcher ..."
    progress = "run_trial_5b3f4_00000: step 10/38 epoch 0.53 loss 2.2979 lr 2.92e-02 146 img/s"
    assert skip.search(raylet) and skip.search(cpp)
    assert not skip.search(progress) and not skip.search("vitray tune: error: bad config")
    assert re.search(PROGRESS_LINE, progress) and not re.search(PROGRESS_LINE, raylet)
