"""Shared builders for the tests: jobs run as the commands run them."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from jobs.cluster.local import MLFLOW_SERVER_ENV
from jobs.config import CONFIGS, JobConfig, load_config
from jobs.tracking.mlflow_tracker import MlflowTracker
from jobs.training.fit import Outcome, fit
from jobs.training.search.driver import search
from jobs.training.search.outcome import SearchOutcome

ROOT = Path(__file__).resolve().parents[1]  # the repository


def tracked_fit(cfg: JobConfig, **kwargs: Any) -> Outcome:
    """`vitray pretrain`/`finetune`: fit with the config's MLflow tracker."""
    return fit(cfg, MlflowTracker(cfg.mlflow), **kwargs)


def tracked_search(cfg: JobConfig) -> SearchOutcome:
    """`vitray tune`: a search with the config's MLflow tracker."""
    return search(cfg, MlflowTracker(cfg.mlflow))


def pretrain_config(tmp: Path, uri: str, **sets: Any) -> JobConfig:
    """The demo pretraining, small and quick to learn: checkpoints under tmp/runs, the
    prepared digits beside tmp (`digits_dir`), tracked at `uri`; `sets` override keys."""
    overrides = {
        "train.batch_size": 64,
        "train.lr": 0.001,
        "train.warmup_steps": 5,
        "train.report_every": 5,
        "run.storage_path": str(tmp / "runs"),
        "mlflow.tracking_uri": uri,
        "data.dataset": str(tmp.parent / "digits"),
        **sets,
    }
    return load_config(CONFIGS / "demo-pretrain.yaml", [f"{k}={v}" for k, v in overrides.items()])


def kill_a_train_worker_after_its_first_checkpoint(run_dir: Path) -> None:
    """SIGKILL to a Ray Train worker once a checkpoint of `run_dir` is stored."""
    import psutil

    deadline = time.time() + 600
    while not list(run_dir.glob("checkpoint_*/train_state.pt")) and time.time() < deadline:
        time.sleep(0.5)
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
    ]
    assert workers, "no Ray Train worker process found"
    workers[-1].kill()


def ended_pid() -> int:
    """The pid of a process that has run and ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> np.ndarray:
    """A real photo crop (scikit-learn's sample images), (H, W, 3) uint8."""
    from sklearn.datasets import load_sample_images

    img = load_sample_images().images[seed % 2]
    w, h = size
    return np.asarray(Image.fromarray(img).resize((w, h)))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decompression_bomb_png() -> bytes:
    """A tiny PNG whose header declares 100000 x 100000 pixels."""
    raw = zlib.compress(b"\x00" * 16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def search_config(tmp: Path, digits: Path, uri: str, name: str, epochs: int = 3, **tune) -> Path:
    """A small digits search (micro/4 with 2 blocks at 16 px, 2 trials of one worker) as a
    YAML file under `tmp`; `tune` overrides keys of its tune section."""
    tree = {
        "model": {"preset": "micro/4", "overrides": {"depth": 2}},
        "data": {
            "dataset": str(digits),
            "image_size": 16,
            "hflip": False,
            "crop_scale": [0.6, 1.0],
            "eval_crop_fraction": 1.0,
            "shuffle_buffer": 256,
            "cpus_per_task": 0.25,
        },
        "train": {"batch_size": 128, "epochs": epochs, "lr": 0.003, "warmup_steps": 3},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.75},
        "run": {"name": name, "storage_path": str(tmp / "runs")},
        "mlflow": {"tracking_uri": uri, "experiment": "vitray-tune-test"},
        "tune": {
            "space": {"train.lr": {"loguniform": [3e-4, 3e-3]}},
            "num_samples": 2,
            "max_concurrent": 2,
            "grace_period": 1,
            "reduction_factor": 2,
            "time_budget_s": 600,
            "stall_timeout_s": 240,
            **tune,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def start_mlflow(root: Path, port: int) -> subprocess.Popen:
    """A real MLflow server on 127.0.0.1:`port` (SQLite and artifacts under `root`) in its
    own session, for `stop_group`; started again on the same `root`, it serves the same
    runs."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        env={**os.environ, **MLFLOW_SERVER_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


class MlflowServer:
    """A real MLflow server that a test stops and starts again: the same port, the same
    store, as when an operator restarts it."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_mlflow(self.root, self.port)
        wait_healthy(self.uri)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def crash(self) -> None:
        """SIGKILL to its group: gone at once, no shutdown."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


def stop_group(proc: subprocess.Popen, seconds: float = 30) -> None:
    """Stop a server we started in its own session: SIGTERM to its process group, then
    SIGKILL if a loaded machine has not let it exit in time."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=seconds)


def wait_healthy(base: str, seconds: float = 180, path: str = "/health") -> None:
    """Wait for a server to answer `path` (an MLflow server's /health by default; a loaded
    2-core machine takes a minute)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}{path}", timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{base} did not answer {path} within {seconds:.0f} s")


NAMES = ["ant", "bee", "cow", "doe", "eel", "fox"]  # the classes of `register_animals`


def register_animals(tmp: Path) -> tuple[str, Path]:
    """(tracking URI, checkpoint) of a 6-class micro ViT at 32 px, random weights with a head
    that is not zero (a fresh head answers 1/6 for all), declaring bicubic resizing and a
    squash crop, registered as animals@champion in a SQLite store under `tmp`."""
    import mlflow
    import torch

    from jobs.tracking.model import log_vit_model, register_vit_model
    from vit import Preprocessing, ViT, ViTConfig, save_checkpoint

    torch.manual_seed(0)
    model = ViT(ViTConfig.from_preset("micro/4", depth=1, num_classes=6, image_size=32))
    with torch.no_grad():
        model.head.weight.normal_(std=2.0)
    preprocessing = Preprocessing("bicubic", 0.9, "squash")
    checkpoint = save_checkpoint(model, tmp / "ckpt", NAMES, preprocessing=preprocessing)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the store's artifacts: ./mlruns
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            model_uri = log_vit_model(checkpoint)
        register_vit_model(model_uri, "animals", "champion", uri, "test", {})
    return uri, checkpoint


def mlflow_job_runners(pid: int) -> list[str]:
    """The command lines of the GenAI job runner and task consumers under the MLflow server
    `pid`: none when MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false reached it."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "mlflow.server.jobs" in command:
            found.append(command)
    return found


def files_holding(secret: str, root: Path) -> list[str]:
    """Every file under `root` whose bytes hold `secret` (text or not)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


VIT_FAMILIES = {  # ViTConfig options of the later ViTs, as each family has them
    "deit3": dict(layer_scale=1e-5, no_embed_class=True),
    "dinov2 with registers": dict(layer_scale=1.0, reg_tokens=4, no_embed_class=True),
    "openai clip": dict(norm_pre=True, act="quick_gelu", patch_bias=False, norm_eps=1e-5),
    "siglip": dict(pool="map", class_token=False, act="gelu_tanh"),
    "reg4 gap": dict(pool="gap", fc_norm=True, reg_tokens=4),
    "distilled deit": dict(dist_token=True),
    "qk norm": dict(qk_norm=True, qkv_bias=False),
    "dinov2 giant": dict(layer_scale=1e-5, mlp="swiglu_packed"),
    "no final norm": dict(final_norm=False),
    "beit3 sub-ln": dict(sub_norm=True),
    "aimv2": dict(
        norm="rmsnorm",
        patch_norm=True,
        proj_bias=False,
        qkv_bias=False,
        mlp="swiglu_packed",
        class_token=False,
        pool="gap",
    ),  # fmt: skip
}
