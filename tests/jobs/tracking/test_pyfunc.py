"""The registered MLflow model as people use it: `mlflow.pyfunc.load_model(...).predict` on
images (encoded bytes, base64, uint8 arrays of any size, a list or a DataFrame) answers with
class names, applies the checkpoint's own preprocessing, and matches `vitray predict` on the
same files; a bad image is a row with an error, not a failed batch."""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import NAMES, encode, photo, register_animals


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[str, Path]:
    return register_animals(tmp_path_factory.mktemp("pyfunc"))


@pytest.fixture(scope="module")
def served(registered):
    mlflow.set_tracking_uri(registered[0])
    return mlflow.pyfunc.load_model("models:/animals@champion")


def images() -> dict[str, object]:
    pixels = photo((75, 50))
    png = encode(Image.fromarray(pixels), "PNG")
    return {
        "jpeg": encode(Image.fromarray(photo((64, 48), seed=1)), "JPEG", quality=90),
        "png": png,
        "base64 png": base64.b64encode(png).decode(),
        "base64 bytes": base64.b64encode(png),  # as MLflow's `inputs` JSON hands them over
        "array": pixels,  # the PNG's own pixels: the same answer
        "gray array": np.asarray(Image.fromarray(photo((20, 33))).convert("L")),
        "rgba array": np.dstack([photo((40, 40)), np.full((40, 40), 255, np.uint8)]),
        "not an image": b"GIF89a but no more",
        "float array": np.zeros((8, 8, 3), np.float32),
    }


def test_images_of_every_kind_get_class_names_and_bad_ones_an_error(served):
    given = images()
    out = served.predict(pd.DataFrame({"image": list(given.values())}))
    assert list(out.columns) == ["label", "score", "top_labels", "top_scores", "error"]
    rows = dict(zip(given, out.to_dict("records"), strict=True))
    for name in ("jpeg", "png", "base64 png", "base64 bytes", "array", "gray array", "rgba array"):
        row = rows[name]
        assert row["error"] is None, (name, row)
        assert row["label"] in NAMES and row["label"] == row["top_labels"][0]
        assert len(row["top_labels"]) == 5 and len(set(row["top_labels"])) == 5  # top-5
        assert row["score"] == row["top_scores"][0]
        assert row["top_scores"] == sorted(row["top_scores"], reverse=True)
    assert rows["png"] == rows["base64 png"] == rows["base64 bytes"] == rows["array"]
    assert "not a readable image" in rows["not an image"]["error"]
    assert "float32" in rows["float array"]["error"]
    for name in ("not an image", "float array"):
        assert rows[name]["label"] is None and rows[name]["score"] is None


def test_a_list_and_top_k_and_the_tensor_switch(served, registered):
    from vit import load_checkpoint

    png = images()["png"]
    listed = served.predict([png, png], params={"top_k": 2})
    assert len(listed) == 2 and all(len(t) == 2 for t in listed["top_labels"])
    assert listed["label"][0] == served.predict(pd.DataFrame({"image": [png]}))["label"][0]

    # `input: tensor`: images already resized and normalised, as the model took them before
    tensors = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    out = served.predict(pd.DataFrame({"image": list(tensors)}), params={"input": "tensor"})
    with torch.no_grad():
        probs = load_checkpoint(registered[1])(torch.from_numpy(tensors)).softmax(-1).numpy()
    assert list(out["label"]) == [NAMES[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(out["score"].astype(float), probs.max(1), rtol=1e-5)


def test_the_signature_and_example_say_what_the_model_takes(served):
    signature = served.metadata.signature
    assert [c.type.name for c in signature.inputs.inputs] == ["binary"]
    assert [c.name for c in signature.outputs.inputs] == [
        "label", "score", "top_labels", "top_scores", "error"
    ]  # fmt: skip
    assert {p.name: p.default for p in signature.params.params} == {"top_k": 5, "input": "images"}
    example = served.input_example
    assert Image.open(__import__("io").BytesIO(example["image"][0])).size == (32, 32)


def test_the_model_answers_as_vitray_predict_does_on_the_same_files(
    ray_local, served, registered, tmp_path
):
    """One preprocessing for both: the checkpoint's bicubic resize and squash crop."""
    from jobs.inference.predict import predict
    from pipeline.config import DataConfig
    from vit import read_checkpoint_meta

    folder = tmp_path / "images" / "any"
    folder.mkdir(parents=True)
    given = {name: v for name, v in images().items() if name in ("jpeg", "png")}
    for i in range(6):
        for name, data in given.items():
            big = Image.open(__import__("io").BytesIO(data)).resize((90 + 7 * i, 60 + 5 * i))
            (folder / f"{i}-{name}.{'jpg' if name == 'jpeg' else 'png'}").write_bytes(
                encode(big.convert("RGB"), "JPEG" if name == "jpeg" else "PNG")
            )
    data = DataConfig.for_checkpoint(
        str(tmp_path / "images"), read_checkpoint_meta(registered[1]), cpus_per_task=0.5
    )
    predict(str(registered[1]), data, str(tmp_path / "out"), top_k=3)
    batch = pd.read_parquet(tmp_path / "out").sort_values("id")
    files = [folder.parent / i for i in batch["id"]]
    mine = served.predict([f.read_bytes() for f in files], params={"top_k": 3})
    assert [list(t) for t in batch["top_labels"]] == list(mine["top_labels"])
    np.testing.assert_allclose(
        np.stack(batch["top_scores"]), np.stack(mine["top_scores"]), atol=1e-6
    )
