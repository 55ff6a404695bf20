"""`vitray predict CHECKPOINT --input DATA --output DIR`: batch inference on Ray Data.

The same read/decode/patchify tasks as training (eval transforms), then an actor pool of
models (one GPU each when there are GPUs), then Parquet: id, label (when the source has
one), the top-k class names and scores, and `ok` (false for an image that did not decode:
reported, not fatal).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from jobs.inference.classify import Classifier
from jobs.tracking.checkpoints import local_checkpoint
from vit import load_checkpoint, model_from_weights, model_weights, read_checkpoint_meta


class Predictor:
    """One model per actor; weights come from the object store, so any node can host it."""

    def __init__(self, weights: Any, top_k: int) -> None:
        import ray

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        model, class_names = model_from_weights(weights[0]), weights[1]
        self.classifier = Classifier(model, class_names, data=None)  # fed patches, not images
        self.k = min(top_k, model.config.num_classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["ok"]
        n = len(ok)
        scores = np.zeros((n, self.k), dtype=np.float32)
        labels = np.full((n, self.k), "", dtype=object)
        if ok.any():
            labels[ok], scores[ok] = self.classifier.top_k(
                torch.from_numpy(batch["patches"][ok]), self.k
            )
        return pa.table(  # plain Arrow lists: any Parquet reader gets them as they are
            {
                "id": pa.array(batch["id"].tolist(), pa.string()),
                "label": pa.array(batch["label"], pa.int64()),
                "ok": pa.array(ok, pa.bool_()),
                "top_labels": pa.array(labels.tolist(), pa.list_(pa.string())),
                "top_scores": pa.array(scores.tolist(), pa.list_(pa.float32())),
            }
        )


def predict(
    checkpoint: str,
    data: Any,
    output: str,
    split: str = "all",
    top_k: int = 5,
    batch_size: int = 256,
    actors: int = 1,
    uri: str | None = None,
) -> dict[str, int]:
    """Write predictions for every image of `split` under `output`; returns counts."""
    import ray

    from jobs.cluster.raynode import ensure_ray
    from pipeline.dataset import build_dataset

    with local_checkpoint(checkpoint, uri) as directory:
        model = load_checkpoint(directory)
        class_names = read_checkpoint_meta(directory).get("class_names")
    ensure_ray()
    weights = ray.put((model_weights(model), class_names))
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    # The source's own labels are passed through, never checked against the model's classes.
    ds = build_dataset(data, split, model.config.patch_size, keep_ids=True, check_labels=False)
    predictions = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"weights": weights, "top_k": top_k},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_gpus=gpus,
        num_cpus=0 if gpus else data.cpus_per_task,
    )
    predictions.write_parquet(output)
    written = ray.data.read_parquet(output).select_columns(["ok"]).to_pandas()["ok"]
    counts = {"images": int(len(written)), "bad": int((~written).sum())}
    print(f"wrote {counts['images']} predictions to {output}; {counts['bad']} bad image(s)")
    return counts
