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
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature

from jobs.inference.classify import DEFAULT_TOP_K, encoded
from pipeline.config import DataConfig
from vit import read_checkpoint_meta


def requirements() -> list[str]:
    """What loading the model needs, pinned to this environment. Named rather than inferred:
    MLflow infers them by loading the model in a subprocess (seconds per model, and on a
    loaded machine its 120 s timeout, after which it records cloudpickle alone), and it
    left torch out."""
    packages = ("mlflow", "torch", "numpy", "safetensors", "vitray")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def signature() -> ModelSignature:
    """Images in (one per row: bytes, base64 or uint8 arrays; unnamed, so that a list or a
    DataFrame's `image` column both pass MLflow's check), class names out; see
    pyfunc_vit.py."""
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary")]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "score"),
                ColSpec(Array("string"), "top_labels"),
                ColSpec(Array("double"), "top_scores"),
                ColSpec("string", "error", required=False),
            ]
        ),
        params=ParamSchema(
            [ParamSpec("top_k", "long", DEFAULT_TOP_K), ParamSpec("input", "string", "images")]
        ),
    )


def example_image(data: DataConfig) -> bytes:
    """A PNG of the model's own size and channels, for the model's input example."""
    h, w = data.size_hw
    pixels = np.full((h, w, data.channels), 128, np.uint8).squeeze(-1 if data.channels == 1 else ())
    return encoded(pixels)


def log_vit_model(checkpoint_dir: str | Path, name: str = "model") -> str:
    """Log into the active run; returns the model URI (`models:/m-...`) to register. Its
    preprocessing is the checkpoint's own, written out as preprocessing.json to read."""
    meta = read_checkpoint_meta(checkpoint_dir)
    data = DataConfig.for_checkpoint("-", meta)
    interpolation, crop_fraction, crop_mode = data.eval_transform
    preprocessing = {
        "image_size": list(data.size_hw),
        "channels": data.channels,
        "mean": meta["model"]["mean"],
        "std": meta["model"]["std"],
        "interpolation": f"{interpolation}, antialiased",
        "eval_crop_fraction": crop_fraction,
        "eval_crop_mode": crop_mode,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preprocessing.json"
        path.write_text(json.dumps(preprocessing, indent=2))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_vit.py")),
            artifacts={"checkpoint": str(checkpoint_dir), "preprocessing": str(path)},
            signature=signature(),
            input_example=pd.DataFrame({"image": [example_image(data)]}),
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
    version = registered_from(client, model_uri, name)
    if version is None:
        # The client's calls, not mlflow.register_model: that one prints its own lines
        # ("Successfully registered model ...") under vitray's
        ensure_registered_model(client, name)
        model_id = model_uri.removeprefix("models:/")
        version = client.create_model_version(name, model_uri, tags=tags, model_id=model_id)
        link_versions(client, model_id, version)
    client.update_model_version(version.name, version.version, description=description)
    client.set_registered_model_alias(name, alias, version.version)
    print(f"registered models:/{version.name}/{version.version} as @{alias}", flush=True)
    return version


def link_versions(client: Any, model_id: str, version: ModelVersion) -> None:
    """The logged model's `mlflow.modelVersions` tag, as mlflow.register_model keeps it: the
    logged model's page in the UI links the versions made from it."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    linked.append({"name": version.name, "version": version.version})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})


def ensure_registered_model(client: Any, name: str) -> None:
    """Create `name` in the registry unless it is there (asked by creating it: a name may
    hold quotes, which MLflow's filter grammar cannot escape)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


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
