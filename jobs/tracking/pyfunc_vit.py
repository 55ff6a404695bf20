"""The MLflow model of a vitray checkpoint, logged as code (MLflow 3's models-from-code):
MLflow keeps this file with the model and runs it when the model loads, so nothing is
pickled. Loading needs `vit` importable, as it needs torch."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import set_model

from vit import load_checkpoint


class ViTClassifier(mlflow.pyfunc.PythonModel):
    """Input: float32 images (B, C, H, W) normalised with the checkpoint's mean and std, or
    uint8 patches (B, N, P*P*C). Output: logits (B, classes)."""

    def load_context(self, context: Any) -> None:
        self.model = load_checkpoint(context.artifacts["checkpoint"]).eval()

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
        with torch.no_grad():
            return self.model(torch.from_numpy(np.asarray(model_input))).numpy()


set_model(ViTClassifier())
