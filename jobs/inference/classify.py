"""Images to class names with a vitray checkpoint, in this process.

Images go through the checkpoint's own preprocessing: the eval side of
`pipeline.transforms.preprocess_batch` with the data config the checkpoint declares
(`DataConfig.for_checkpoint`: its size, channels, resize filter and crop), the function
that `vitray predict` and `vitray evaluate` run on Ray Data. The MLflow model and the batch
predictor both answer through `Classifier`.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.decode import BadImage
from pipeline.transforms import preprocess_batch
from vit import ViT, load_checkpoint, read_checkpoint_meta

DEFAULT_TOP_K = 5  # class names per image, as timm's and torchvision's examples print


def encoded(value: Any) -> bytes:
    """An image as encoded bytes: bytes as given, unless they are base64 text (MLflow's
    `inputs` JSON hands base64 over undecoded; raw JPEG, PNG, GIF, BMP, TIFF and WebP bytes
    always hold a byte outside base64's alphabet); a str as base64 (JSON serving sends
    bytes so); a uint8 array (H, W) or (H, W, C) of any size as an uncompressed PNG,
    lossless, so that it decodes to exactly its pixels. Raises BadImage for anything else."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return data
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadImage(f"a string that is not base64 of an image: {e}") from e
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3) or value.shape[-1:] == (2,):
            raise BadImage(
                f"an array of {value.dtype} {value.shape}: expected uint8 (H, W) or (H, W, C) "
                "with C 1, 3 or 4"
            )
        pixels = value[..., 0] if value.ndim == 3 and value.shape[2] == 1 else value
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG", compress_level=0)
        return out.getvalue()
    raise BadImage(f"a {type(value).__name__}: expected encoded image bytes, base64 or uint8")


class Classifier:
    """A model, its class names and its preprocessing; top-k class names and probabilities
    (bf16 autocast on CUDA)."""

    def __init__(
        self, model: ViT, class_names: Sequence[str] | None, data: DataConfig | None
    ) -> None:
        """`data`: the preprocessing of `classify`; None for a classifier fed patches."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        n = model.config.num_classes
        self.names = np.array(list(class_names) if class_names else [str(i) for i in range(n)])
        self.data = data

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> Classifier:
        meta = read_checkpoint_meta(directory)
        data = DataConfig.for_checkpoint("-", meta)
        return cls(load_checkpoint(directory), meta.get("class_names"), data)

    def top_k(self, inputs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(names (B, k), probabilities (B, k)) for uint8 patches or normalised images."""
        k = min(k, len(self.names))
        bf16 = self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=bf16):
            probs = self.model(inputs.to(self.device)).float().softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        return self.names[top.indices.cpu().numpy()], top.values.cpu().numpy()

    def classify(self, images: Sequence[Any], k: int = DEFAULT_TOP_K) -> pd.DataFrame:
        """One row per image: label, score, top_labels, top_scores, and error (None, or why
        that image has no answer: the others still get theirs)."""
        cells, errors = [], []
        for value in images:
            try:
                cells.append(encoded(value))
                errors.append(None)
            except BadImage as e:
                cells.append(None)
                errors.append(str(e))
        column = np.empty(len(cells), dtype=object)
        column[:] = cells
        batch = preprocess_batch(
            {"image": column},
            self.data,
            self.model.config.patch_size,
            train=False,
            keep_errors=True,
        )
        errors = [
            mine or theirs or None for mine, theirs in zip(errors, batch["error"], strict=True)
        ]
        return self.rows(torch.from_numpy(batch["patches"]), batch["ok"], errors, k)

    def classify_tensors(self, images: np.ndarray, k: int = DEFAULT_TOP_K) -> pd.DataFrame:
        """Images already resized and normalised, float32 (B, C, H, W): the model's input
        before 1.0 of the MLflow model, kept behind its `input: tensor` param."""
        images = np.asarray(images, dtype=np.float32)
        return self.rows(
            torch.from_numpy(images), np.ones(len(images), bool), [None] * len(images), k
        )

    def rows(self, inputs: torch.Tensor, ok: np.ndarray, errors: list, k: int) -> pd.DataFrame:
        n = len(ok)
        labels: list[Any] = [None] * n
        scores: list[float | None] = [None] * n  # null, not NaN, in JSON
        tops: list[list] = [[] for _ in range(n)]
        top_scores: list[list] = [[] for _ in range(n)]
        if ok.any():
            names, probs = self.top_k(inputs[torch.from_numpy(ok)], k)
            for i, row in enumerate(np.flatnonzero(ok)):
                labels[row], scores[row] = str(names[i, 0]), float(probs[i, 0])
                tops[row], top_scores[row] = names[i].tolist(), probs[i].astype(float).tolist()
        columns = {"label": labels, "score": scores, "top_labels": tops, "top_scores": top_scores}
        return pd.DataFrame(
            {name: pd.Series(v, dtype=object) for name, v in columns.items()}
        ).assign(error=pd.Series(errors, dtype=object))
