"""What `vitray submit` ships: the project's packages and the files the command names."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from jobs.cluster.jobs_api import runtime_env, stage
from jobs.config import CONFIGS, ConfigError
from jobs.secrets import load_job_credentials


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user's own directory, away from the project, with a config and things that must
    never leave the machine."""
    home = tmp_path / "work"
    home.mkdir()
    shutil.copy(CONFIGS / "demo-pretrain.yaml", home / "my.yaml")
    (home / ".env").write_text("AWS_SECRET_ACCESS_KEY=hunter2\n")
    (home / "data" / "mine").mkdir(parents=True)
    monkeypatch.chdir(home)
    return home


def test_a_config_in_the_users_directory_travels_resolved(user_dir, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    command = stage(
        ["pretrain", "--config", "my.yaml", "--set", "data.dataset=data/mine", "--set",
         "train.max_steps=7"],
        out,
    )  # fmt: skip
    assert command == ["pretrain", "--config", "inputs/config.yaml"]
    shipped = yaml.safe_load((out / "inputs" / "config.yaml").read_text())
    assert shipped["train"]["max_steps"] == 7
    assert shipped["data"]["dataset"] == str(user_dir / "data" / "mine")  # as the client meant
    assert shipped["run"]["storage_path"] == str(user_dir / "runs")
    assert sorted(p.name for p in out.iterdir()) == ["inputs", "jobs", "pipeline", "vit"]
    assert not list(out.rglob("__pycache__")) and not list(out.rglob(".env"))
    assert (out / "jobs" / "cli.py").is_file()


def test_builtin_datasets_and_mlflow_references_stay_as_they_are(user_dir, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    stage(
        ["finetune", "--config", "my.yaml", "--set", "init.checkpoint=models:/digits@champion"],
        out,
    )
    shipped = yaml.safe_load((out / "inputs" / "config.yaml").read_text())
    assert shipped["data"]["dataset"] == "builtin:digits"
    assert shipped["init"]["checkpoint"] == "models:/digits@champion"


def test_file_arguments_travel_and_directories_become_absolute(user_dir, tmp_path):
    (user_dir / "weights.npz").write_bytes(b"npz")
    out = tmp_path / "job"
    out.mkdir()
    command = stage(["convert", "--from", "jax", "weights.npz", "data/mine"], out)
    assert command[:3] == ["convert", "--from", "jax"]
    assert (out / command[3]).read_bytes() == b"npz"
    assert command[4] == str(user_dir / "data" / "mine")


def test_a_bad_config_fails_on_the_client_before_anything_is_staged(user_dir, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    with pytest.raises(ConfigError, match="train.lrr"):
        stage(["pretrain", "--config", "my.yaml", "--set", "train.lrr=1"], out)
    assert not any(out.iterdir())


def test_equals_forms_and_the_clients_mlflow_store_travel_too(user_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "job"
    out.mkdir()
    command = stage(["pretrain", "--config=my.yaml", "--set=train.max_steps=7"], out)
    assert command == ["pretrain", "--config", "inputs/config.yaml"]
    shipped = yaml.safe_load((out / "inputs" / "config.yaml").read_text())
    assert shipped["train"]["max_steps"] == 7
    # not a mlflow.db in the job's temporary directory on the cluster
    credentials = json.loads((out / "inputs" / "credentials.json").read_text())
    assert credentials["MLFLOW_TRACKING_URI"] == f"sqlite:///{user_dir / 'mlflow.db'}"


def test_the_clients_mlflow_credentials_travel_in_a_file_not_in_rays_runtime_env(
    user_dir, tmp_path, monkeypatch
):
    """Ray's runtime-env agent logs the runtime env whole and the dashboard shows it: the
    URI's password and MLflow's secret variables go in a file only its owner reads, which
    the job's driver and workers load at start."""
    uri = "http://alice:pa@ss@mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    out = tmp_path / "job"
    out.mkdir()
    stage(["pretrain", "--config", "my.yaml", "--set", f"mlflow.tracking_uri={uri}"], out)
    env = runtime_env(None, out)
    shipped = [*env["env_vars"].values(), (out / "inputs" / "config.yaml").read_text()]
    assert not [s for s in ("pa@ss", "s3cret", "t0ken") for text in shipped if s in text]
    credentials = out / env["env_vars"]["VITRAY_CREDENTIALS_FILE"]
    assert credentials.stat().st_mode & 0o077 == 0
    assert json.loads(credentials.read_text()) == {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
        "MLFLOW_TRACKING_TOKEN": "t0ken",
    }

    # the job's process, started in its directory: the client's values win over the node's
    monkeypatch.chdir(out)
    monkeypatch.setenv("VITRAY_CREDENTIALS_FILE", env["env_vars"]["VITRAY_CREDENTIALS_FILE"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://the-nodes-own:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "the-nodes-user")
    load_job_credentials()
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["VITRAY_CREDENTIALS_FILE"] == str(credentials.resolve())
    monkeypatch.setenv("VITRAY_CREDENTIALS_FILE", "inputs/gone.json")
    with pytest.raises(FileNotFoundError, match="gone.json"):  # never a silent other store
        load_job_credentials()

    # an image holds no job directory: its runtime env carries them
    assert runtime_env("vitray:0.1.0", None)["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == "s3cret"


def test_a_tracking_uri_on_the_command_line_travels_with_the_credentials(user_dir, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    uri = "http://alice:pw@mlflow.internal:5000"
    command = stage(["evaluate", "models:/m@champion", "--data", "x", "--tracking-uri", uri], out)
    assert uri not in " ".join(command) and "--tracking-uri" not in command
    credentials = json.loads((out / "inputs" / "credentials.json").read_text())
    assert credentials["MLFLOW_TRACKING_URI"] == uri
    out2 = tmp_path / "job2"
    out2.mkdir()
    command = stage(["demo", "--set", f"mlflow.tracking_uri={uri}"], out2)
    assert command == ["demo"]
    assert (
        json.loads((out2 / "inputs" / "credentials.json").read_text())["MLFLOW_TRACKING_URI"] == uri
    )
    out3 = tmp_path / "job3"
    out3.mkdir()
    with pytest.raises(ValueError, match="entrypoint"):  # no other place to carry it
        stage(["demo", "--set", "data.dataset=s3://key:secret@bucket/images"], out3)
