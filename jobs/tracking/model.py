"""A vitray checkpoint as an MLflow model: registrable, loadable with `mlflow.pyfunc`.

The weights stay a safetensors checkpoint (an artifact of the model); the wrapper is the
code file `pyfunc_vit.py`, stored with the model: nothing is pickled.
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import infer_signature

from vit import load_checkpoint, read_checkpoint_meta


def requirements() -> list[str]:
    """What loading the model needs, pinned to this environment. Named rather than inferred:
    MLflow infers them by loading the model in a subprocess (seconds per model, and on a
    loaded machine its 120 s timeout, after which it records cloudpickle alone), and it
    left torch out."""
    packages = ("mlflow", "torch", "numpy", "safetensors", "vitray")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def log_vit_model(
    checkpoint_dir: str | Path, name: str = "model", preprocessing: dict | None = None
) -> str:
    """Log into the active run; returns the model URI (`models:/m-...`) to register.

    `preprocessing` (how images become the model's input) is stored with the model as
    preprocessing.json, next to the checkpoint's config.json."""
    config = read_checkpoint_meta(checkpoint_dir)["model"]
    h, w = config["image_size"]
    example = np.zeros((1, config["in_chans"], h, w), dtype=np.float32)
    model = load_checkpoint(checkpoint_dir).eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    artifacts = {"checkpoint": str(checkpoint_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        if preprocessing:
            path = Path(tmp) / "preprocessing.json"
            path.write_text(json.dumps(preprocessing, indent=2))
            artifacts["preprocessing"] = str(path)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_vit.py")),
            artifacts=artifacts,
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=requirements(),
        )
    return info.model_uri


def register_vit_model(
    model_uri: str, name: str, alias: str, uri: str, description: str, tags: dict[str, str]
) -> ModelVersion:
    """A logged model as a new version of `name`, described, with `alias` moved to it: the
    `models:/<name>@<alias>` that a fine-tune's init.checkpoint names keeps working while
    the versions behind it change."""
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    version = registered_from(client, model_uri, name) or mlflow.register_model(
        model_uri, name, tags=tags
    )
    client.update_model_version(version.name, version.version, description=description)
    client.set_registered_model_alias(name, alias, version.version)
    print(f"registered models:/{version.name}/{version.version} as @{alias}", flush=True)
    return version


def registered_from(client: Any, model_uri: str, name: str) -> ModelVersion | None:
    """The version of `name` made from `model_uri` already, if any: a registration retried
    after an outage may have got through the first time with its answer lost, and must not
    add a second version. Searched by run id (a name may hold quotes, which MLflow's filter
    grammar cannot escape) and matched here."""
    run_id = client.get_logged_model(model_uri.removeprefix("models:/")).source_run_id
    made = [
        v
        for v in client.search_model_versions(f"run_id = '{run_id}'")
        if v.name == name and v.source == model_uri
    ]
    return max(made, key=lambda v: int(v.version), default=None)
