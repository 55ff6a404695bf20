"""A vitray checkpoint as an MLflow model: registrable, loadable with `mlflow.pyfunc`.

The weights stay a safetensors checkpoint (an artifact of the model); only this small
wrapper class is serialised by MLflow, never the weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import infer_signature

from vit import load_checkpoint, read_checkpoint_meta


class ViTClassifier(mlflow.pyfunc.PythonModel):
    """Input: float32 images (B, C, H, W) normalised with the checkpoint's mean and std, or
    uint8 patches (B, N, P*P*C). Output: logits (B, classes)."""

    def load_context(self, context: Any) -> None:
        self.model = load_checkpoint(context.artifacts["checkpoint"]).eval()

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
        with torch.no_grad():
            return self.model(torch.from_numpy(np.asarray(model_input))).numpy()


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
            python_model=ViTClassifier(),
            artifacts=artifacts,
            signature=infer_signature(example, output),
            input_example=example,
        )
    return info.model_uri
