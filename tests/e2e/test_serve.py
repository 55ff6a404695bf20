"""`mlflow models serve` on a registered vitray model, end to end: a real HTTP POST of a
JPEG and a PNG as base64 (as JSON serving sends bytes) gets class names back, `top_k` as a
request param; a bad image in the batch is a row with an error, not an HTTP error."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from helpers import (
    NAMES,
    encode,
    free_port,
    photo,
    register_animals,
    stop_group,
    wait_healthy,
)

pytestmark = pytest.mark.slow


def venv_path() -> str:
    """PATH with this Python's bin first: MLflow starts `uvicorn` by name, as an activated
    virtualenv has it."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def test_serving_the_champion_answers_class_names_for_base64_images(tmp_path):
    uri, _ = register_animals(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/animals@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": venv_path()},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", path="/ping")
        jpeg = encode(Image.fromarray(photo((64, 48))), "JPEG", quality=90)
        png = encode(Image.fromarray(photo((30, 50), seed=1)), "PNG")
        rows = [base64.b64encode(b).decode() for b in (jpeg, png, b"\x89PNG but cut")]
        status, answer = post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]},
             "params": {"top_k": 3}},
        )  # fmt: skip
        assert status == 200
        good, also_good, bad = answer["predictions"]
        for row in (good, also_good):
            assert row["label"] in NAMES and len(row["top_labels"]) == 3
            assert row["error"] is None and 0 < row["score"] <= 1
        assert bad["label"] is None and "not a readable image" in bad["error"]
        status, listed = post(f"http://127.0.0.1:{port}/invocations", {"inputs": rows[:1]})
        assert status == 200 and listed["predictions"][0]["top_labels"][:3] == good["top_labels"], (
            listed
        )
    finally:
        stop_group(server)
