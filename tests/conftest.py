"""Shared fixtures: the test session's environment, a real local Ray, a real MLflow server,
prepared digits, a pretrained model, and real image bytes of every awkward kind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.bench.s3server import moto_server
from jobs.cluster.raynode import SETUP_HOOK, node_env
from jobs.config import CONFIGS

from helpers import (
    MlflowServer,
    decompression_bomb_png,
    encode,
    free_port,
    photo,
    start_mlflow,
    stop_group,
    wait_healthy,
)

# The fixtures that start something: a test using any of them (directly or through another
# fixture) is marked, so that `make test-fast` leaves it out by the mark.
STARTS = {
    "ray_local": "ray",
    "mlflow_server": "server",
    "mlflow_with_auth": "server",
    "restartable_mlflow": "server",
    "s3_server": "server",
}


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for mark in {STARTS[name] for name in used & STARTS.keys()}:
            item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(scope="session", autouse=True)
def session_env():
    """The environment of every Ray this session starts, set up as `vitray` sets up a local
    one (before Ray starts, so that its processes inherit it), and undone at the end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_DISABLE_USAGE_STATS", "1")
        for key, value in node_env(2).items():
            if key not in os.environ:
                mp.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session, 2 CPUs, no dashboard."""
    import ray

    # its workers set up (masked, quiet) as those of every Ray vitray joins or starts are
    hook = {"worker_process_setup_hook": SETUP_HOOK}
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=hook
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow server on 127.0.0.1 (SQLite, local artifacts), stopped by its group."""
    port = free_port()
    proc = start_mlflow(tmp_path_factory.mktemp("mlflow"), port)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri)
        yield uri
    finally:
        stop_group(proc)


@pytest.fixture(scope="session")
def mlflow_with_auth(tmp_path_factory):
    """The MLflow server of `cluster local up --mlflow-auth`, alone (no Ray), stopped by its
    recorded pid: yields its state directory and state (URI, admin user, password file)."""
    from jobs.cluster.local import cluster_env, start_mlflow, stop

    state_dir = tmp_path_factory.mktemp("cluster")
    state = {"processes": [], "temp_dirs": []}
    start_mlflow(state_dir, state, cluster_env(state_dir), auth=True)
    try:
        yield state_dir, state
    finally:
        stop(state_dir, state)


@pytest.fixture
def restartable_mlflow(tmp_path):
    """An MLflow server of this test's own, started; the test may stop and restart it."""
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on 127.0.0.1, stopped by its group.
    Yields the endpoint URL; `s3_env` points the AWS variables at it."""
    with moto_server() as (endpoint, _):
        yield endpoint


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    """The standard AWS variables aimed at the local S3 server (boto3, pyarrow and every
    process started from here read them); yields the endpoint."""
    for key, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    yield s3_server


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """builtin:digits prepared once: <dir>/digits; tests make their own subfolders."""
    from pipeline.prepare import prepare

    base = tmp_path_factory.mktemp("pre")
    prepare("builtin:digits", base / "digits", progress=False)
    return base


@pytest.fixture(scope="session")
def pretrained(ray_local, digits_dir) -> Path:
    """A micro/4 digits model pretrained at 16 px for 400 steps (in this process: the
    loop every job runs, without Ray Train's start-up; no MLflow). Batch 64 at lr 1e-3:
    measured val ~0.89; batch 32 at the demo's 3e-3 sat near chance for 6 epochs."""
    from jobs.config import load_config
    from jobs.training.inprocess import train_in_process

    cfg = load_config(
        CONFIGS / "demo-pretrain.yaml",
        [
            f"data.dataset={digits_dir / 'digits'}",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=1",
            "train.batch_size=64",
            "train.lr=0.001",
            "train.max_steps=400",
            "mlflow.enabled=false",
        ],
    )
    out = digits_dir / "pretrained"
    train_in_process(cfg, keep=out)
    return out


@pytest.fixture(scope="session")
def awkward_images() -> dict[str, tuple[bytes, bool]]:
    """name -> (encoded bytes, usable?) for every case the pipeline must handle."""
    rgb = Image.fromarray(photo())
    good_jpeg = encode(rgb, "JPEG", quality=90)
    sixteen = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    return {
        "jpeg": (good_jpeg, True),
        "png_rgba": (encode(rgb.convert("RGBA"), "PNG"), True),
        "grayscale_jpeg": (encode(rgb.convert("L"), "JPEG"), True),
        "cmyk_jpeg": (encode(rgb.convert("CMYK"), "JPEG"), True),
        "png_16bit": (encode(sixteen, "PNG"), True),
        "palette_gif": (encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"), True),
        "truncated_jpeg": (good_jpeg[: len(good_jpeg) // 2], False),
        "zero_bytes": (b"", False),
        "text_named_jpg": (b"this is a text file, not an image\n", False),
        "decompression_bomb": (decompression_bomb_png(), False),
    }
