"""What `vitray submit` ships: the project's packages and the files the command names."""

from __future__ import annotations

import shutil

import pytest
import yaml

from jobs.cluster.jobs_api import runtime_env, stage
from jobs.config import CONFIGS, ConfigError


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
    assert shipped["mlflow"]["tracking_uri"] == f"sqlite:///{user_dir / 'mlflow.db'}"


def test_the_clients_mlflow_credentials_travel_to_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    env_vars = runtime_env(None, tmp_path)["env_vars"]
    assert env_vars["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert env_vars["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert env_vars["MLFLOW_TRACKING_TOKEN"] == "t0ken"
    assert runtime_env("vitray:0.1.0", None)["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
