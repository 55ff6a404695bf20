"""A checkpoint logged as an MLflow model and registered, on a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient

from jobs.tracking.metrics import retrying
from jobs.tracking.model import log_vit_model, register_vit_model
from vit import ViT, ViTConfig, save_checkpoint


@pytest.fixture
def logged(tmp_path, monkeypatch) -> tuple[str, str]:
    """(tracking URI, logged model URI) of a micro ViT logged into a run of a SQLite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the store's artifacts: ./mlruns
    model = ViT(ViTConfig.from_preset("micro/4", depth=1, num_classes=10, image_size=16))
    checkpoint = save_checkpoint(model, tmp_path / "ckpt", [str(i) for i in range(10)])
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        return uri, log_vit_model(checkpoint)


def test_a_registration_retried_after_a_lost_answer_adds_no_second_version(logged, monkeypatch):
    """The first try registers the version, then the server goes away before the alias is
    set; the retry finds that version instead of making version 2."""
    uri, model_uri = logged
    real = MlflowClient.update_model_version
    outage = iter([ConnectionError("server gone")])

    def flaky(self, *args, **kwargs):
        for error in outage:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "update_model_version", flaky)
    version = retrying(
        "registering digits",
        lambda: register_vit_model(model_uri, "digits", "champion", uri, "best", {}),
    )
    client = MlflowClient(uri)
    assert [v.version for v in client.search_model_versions("name = 'digits'")] == [1]
    assert client.get_model_version_by_alias("digits", "champion").version == version.version
    again = register_vit_model(model_uri, "digits-2", "champion", uri, "best", {})
    assert again.version == 1 and again.name == "digits-2"  # another name: its own version


def test_registering_prints_one_line_of_ours_and_a_second_model_is_version_2(
    logged, tmp_path, capfd
):
    uri, model_uri = logged
    with mlflow.start_run():
        second = log_vit_model(tmp_path / "ckpt")
    capfd.readouterr()
    register_vit_model(model_uri, "digits", "champion", uri, "best", {})
    latest = register_vit_model(second, "digits", "champion", uri, "better", {"seed": "1"})
    out, err = capfd.readouterr()
    assert out.splitlines() == [
        "registered models:/digits/1 as @champion",
        "registered models:/digits/2 as @champion",
    ]
    assert err == ""  # none of MLflow's own "Successfully registered model" lines
    version = MlflowClient(uri).get_model_version_by_alias("digits", "champion")
    assert int(latest.version) == int(version.version) == 2
    assert (version.description, version.tags) == ("better", {"seed": "1"})
    # each logged model links its version, as MLflow's own registration does for the UI
    links = MlflowClient(uri).get_logged_model(second.removeprefix("models:/")).tags
    assert json.loads(links["mlflow.modelVersions"]) == [{"name": "digits", "version": 2}]
