"""The MLflow model of a vitray checkpoint, logged as code (MLflow 3's models-from-code):
MLflow keeps this file with the model and runs it when the model loads, so nothing is
pickled. Loading needs `vitray` importable, as it needs torch.

Input: images, one per row: a DataFrame with an `image` column, or a list of bytes or
strings. Each is encoded image bytes (JPEG, PNG, ...), a base64 string of them (as JSON
serving sends bytes), or (in a DataFrame: MLflow stacks a list of arrays) a uint8 (H, W) or
(H, W, C) array of any size. The model applies its checkpoint's own
preprocessing (`jobs.inference.classify`). Output: a DataFrame of `label` (the class name),
`score` (its probability), `top_labels` and `top_scores` (top-k, `params={"top_k": k}`,
default 5) and `error` (None, or why that row's image has no answer).

`params={"input": "tensor"}`: rows are float32 (C, H, W) images already resized and
normalised with the checkpoint's mean and std, as this model took them before.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import set_model

from jobs.inference.classify import DEFAULT_TOP_K, Classifier


def rows_of(model_input: Any) -> list[Any]:
    """The images of the input, one per row, whatever container they came in."""
    if isinstance(model_input, pd.DataFrame):
        column = model_input["image"] if "image" in model_input else model_input.iloc[:, 0]
        return list(column)
    if isinstance(model_input, dict):
        return list(model_input["image"])
    return list(model_input)


class ViTClassifier(mlflow.pyfunc.PythonModel):
    # MLflow would check `predict`'s type hints (and, with none, advise adding them each time
    # the model loads): the logged signature says what the model takes, and `predict` reads
    # every input kind itself.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.classifier = Classifier.from_checkpoint(context.artifacts["checkpoint"])

    # `model_input` has no type hint: MLflow would read one as a schema of its own.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        params = params or {}
        k = int(params.get("top_k") or DEFAULT_TOP_K)
        if params.get("input", "images") == "tensor":
            return self.classifier.classify_tensors(np.stack(rows_of(model_input)), k)
        return self.classifier.classify(rows_of(model_input), k)


set_model(ViTClassifier())
