"""The MLflow searches that resume uses, against a real server, with quotes of both kinds
in the run name, the experiment and the storage path."""

from __future__ import annotations

from jobs.config import CONFIGS, load_config
from jobs.tracking.runs import RUN_DIR_TAG, RUN_RECORD, new_run, open_run, open_trial_run

QUOTED = 'it\'s "quoted"'
NEAR_MISS = "it_s _quoted_"  # what a LIKE pattern with wildcards for the quotes also matches


def test_a_run_found_by_its_quoted_run_dir_is_resumed_and_recorded(tmp_path, mlflow_server):
    """A run directory that holds no record yet: its unfinished run is found by its tag."""
    from mlflow import MlflowClient

    run_dir = str(tmp_path / QUOTED / QUOTED)
    cfg = load_config(
        CONFIGS / "demo-pretrain.yaml",
        [
            f"run.name={QUOTED}",
            f"mlflow.experiment={QUOTED}",
            f"mlflow.tracking_uri={mlflow_server}",
        ],
    )
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(QUOTED)
    left = client.create_run(experiment, tags={RUN_DIR_TAG: run_dir}, run_name=QUOTED)
    other = run_dir.replace(QUOTED, NEAR_MISS)
    client.create_run(experiment, tags={RUN_DIR_TAG: other}, run_name=QUOTED)  # newer

    rows = {"train": 1, "val": 1}
    assert open_run(cfg, mlflow_server, run_dir, "pretrain", rows) == left.info.run_id
    assert (tmp_path / QUOTED / QUOTED / RUN_RECORD).is_file()
    client.set_terminated(left.info.run_id, "FAILED")
    assert open_run(cfg, mlflow_server, run_dir, "pretrain", rows) == left.info.run_id
    assert client.get_run(left.info.run_id).info.status == "RUNNING"


def test_a_trial_with_a_quoted_name_finds_its_own_run_again(mlflow_server):
    cfg = load_config(CONFIGS / "demo-pretrain.yaml", [f"mlflow.experiment={QUOTED}"])
    parent = new_run(mlflow_server, QUOTED, QUOTED, {})
    rows = {"train": 1257, "val": 180}
    near = open_trial_run(cfg, mlflow_server, parent, f"{NEAR_MISS}_00000", rows)
    trial = open_trial_run(cfg, mlflow_server, parent, f"{QUOTED}_00000", rows)
    assert trial != near
    assert open_trial_run(cfg, mlflow_server, parent, f"{QUOTED}_00000", rows) == trial
