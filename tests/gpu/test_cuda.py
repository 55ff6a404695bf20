"""`make gpu-check`: what only a CUDA GPU shows. Training in bf16, eager and compiled, with a
worker killed and resumed; micro-batches that never wait for the GPU; a Tune search of two
trials on one GPU; `vitray predict` on the GPU; the model benchmark's MFU. Real local Ray,
real MLflow server, real digits shards, as the CPU end-to-end tests. Skipped without CUDA."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from jobs.config import CONFIGS, JobConfig, load_config
from jobs.training.mfu import peak_tflops
from vit import load_checkpoint

from helpers import (
    kill_a_train_worker_after_its_first_checkpoint,
    pretrain_config,
    search_config,
    tracked_fit,
    tracked_search,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: torch.cuda.is_available() is False",
    ),
]

DEMO = CONFIGS / "demo-pretrain.yaml"


def gpu_job(tmp: Path, uri: str, **sets: object) -> JobConfig:
    """The demo pretraining on digits, one worker on the GPU."""
    return pretrain_config(tmp, uri, **{"scaling.use_gpu": True, "scaling.num_workers": 1, **sets})


def test_micro_batches_run_in_bf16_and_never_wait_for_the_gpu():
    """CUDA's sync debug mode raises at any call that waits for the GPU (`.item()`, `if
    tensor`, a boolean index, a blocking copy): a step's micro-batches, bad rows, mixup and
    CutMix included, make none. The logits come out in bf16."""
    from jobs.training.loop import Runner, accumulate, autocast, build_model
    from jobs.training.plan import TrainPlan
    from jobs.training.report import Reporter

    sets = ["train.batch_size=32", "train.grad_accum=2", "train.mixup=0.8", "train.cutmix=1.0"]
    cfg = load_config(DEMO, sets)
    plan = TrainPlan(
        vit=cfg.vit_config(10),
        class_names=tuple("0123456789"),
        split_rows={"train": 64, "val": 0},
        steps_per_epoch=1,
        total_steps=1,
    )
    device = torch.device("cuda")
    runner = Runner(
        rank=0,
        device=device,
        train=None,
        val=None,
        report=lambda metrics, checkpoint: None,
        make_checkpoint=str,
        checkpoint=None,
    )
    model, *_ = build_model(cfg, plan, runner)
    rep = Reporter(
        rank=0,
        micro_batch=cfg.micro_batch,
        steps_per_epoch=1,
        total_steps=1,
        report_every=100,
        sink=None,
        progress=None,
        start_step=0,
        device=device,
    )
    rows, n, dim = cfg.micro_batch, plan.vit.num_patches, plan.vit.patch_dim
    g = torch.Generator().manual_seed(0)

    def batch() -> dict[str, torch.Tensor]:
        ok = torch.rand(rows, generator=g) > 0.25
        labels = torch.where(ok, torch.randint(0, 10, (rows,), generator=g), -1)
        patches = torch.randint(0, 256, (rows, n, dim), dtype=torch.uint8, generator=g)
        return {"patches": patches.to(device), "label": labels.to(device), "ok": ok.to(device)}

    batches = iter([batch() for _ in range(6)])
    assert accumulate(model, batches, cfg, 10, rep) == 2  # warm-up: cuBLAS, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps = [accumulate(model, batches, cfg, 10, rep) for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps == [2, 2] and rep.images == 6 * rows
    with torch.no_grad(), autocast(device):
        assert model.compute(batch()["patches"]).dtype == torch.bfloat16


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_gpu_pretraining_survives_a_killed_worker_and_a_rerun_resumes(
    ray_local, digits_dir, mlflow_server, compile
):
    """One GPU, bf16, with and without torch.compile (inductor): a worker killed after the
    first checkpoint restarts from it and finishes; the rerun with more steps resumes in the
    same MLflow run; the checkpoint loads with clean keys."""
    from mlflow import MlflowClient

    name = "gpu-compiled" if compile else "gpu-eager"
    tmp = digits_dir / name
    tmp.mkdir()
    sets = {"train.max_steps": 60, "train.compile": compile, "run.name": name}
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(done=tracked_fit(gpu_job(tmp, mlflow_server, **sets)))
    )
    thread.start()
    kill_a_train_worker_after_its_first_checkpoint(tmp / "runs" / name)
    thread.join(timeout=900)
    first = outcome["done"]
    assert first.result.metrics["step"] == 60 and first.result.metrics["val_top1"] > 0.25
    run = MlflowClient(mlflow_server).get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["gpu_type"] != "none"
    if peak_tflops(torch.cuda.get_device_name()):  # a card in jobs/training/mfu.py's table
        assert 0 < run.data.metrics["mfu"] < 1  # per report, from the second window on
    model = load_checkpoint(first.result.checkpoint.path)  # every key checked: no _orig_mod.
    assert model.config.num_classes == 10

    again = tracked_fit(gpu_job(tmp, mlflow_server, **{**sets, "train.max_steps": 70}))
    assert again.result.metrics["step"] == 70 and again.mlflow_run_id == first.mlflow_run_id


def test_a_two_trial_search_runs_on_one_gpu(ray_local, digits_dir, mlflow_server, tmp_path):
    """Each trial takes the whole GPU (a worker holds one GPU; there is no fraction to
    set), so the two run one after the other; the best is registered."""
    path = search_config(tmp_path, digits_dir / "digits", mlflow_server, "gpu", register_as="gd")
    outcome = tracked_search(load_config(path, ["scaling.use_gpu=true"]))
    assert len(outcome.results) == 2 and all(r.metrics["step"] > 0 for r in outcome.results)
    assert outcome.registered is not None
    assert load_checkpoint(outcome.best_checkpoint.path).config.num_classes == 10


def test_predict_runs_its_model_on_the_gpu_as_accurately_as_on_the_cpu(
    ray_local, pretrained, digits_dir, tmp_path
):
    """The predict actor takes the cluster's GPU and runs in bf16, and so does the scoring
    of `evaluate` (a task holding the GPU): their top-1 on the test split matches the same
    checkpoint evaluated in float32 on the CPU, within 2% (bf16 flips a few close calls)."""
    import pyarrow.parquet as pq

    from jobs.cli import main
    from jobs.inference.evaluation import predict_split, split_scores
    from pipeline.config import DataConfig
    from vit import read_checkpoint_meta

    assert ray_local.cluster_resources().get("GPU", 0) >= 1
    data = str(digits_dir / "digits")
    out = tmp_path / "predictions"
    main(["predict", str(pretrained), "--input", data, "--split", "test", "--output", str(out)])
    table = pq.read_table(out).to_pandas()
    top1 = table["top_labels"].map(lambda labels: labels[0])
    gpu_top1 = float((top1 == table["label"].astype(str)).mean())
    meta = read_checkpoint_meta(pretrained)
    model, config = load_checkpoint(pretrained), DataConfig.for_checkpoint(data, meta)
    cpu = split_scores(predict_split(model, config, "test", on_gpu=False), "test")["test_top1"]
    assert abs(gpu_top1 - cpu) <= 0.02
    # evaluate's scoring (a search's test split too) runs in a task holding the GPU
    evaluated = split_scores(predict_split(model, config, "test"), "test")["test_top1"]
    assert abs(evaluated - cpu) <= 0.02


def test_bench_model_b16_reports_mfu(tmp_path):
    """`vitray bench model --preset b/16`: a bf16 training step of ours and timm's, with the
    model FLOPs utilisation of each against the card's peak (the table in jobs/training/mfu.py).
    The numbers go to docs/benchmarks.md by hand; here they must exist and be plausible."""
    from jobs.cli import main

    card = torch.cuda.get_device_name()
    if peak_tflops(card) is None:
        pytest.skip(f"no peak bf16 figure for {card} in jobs/training/mfu.py")
    path = tmp_path / "model.json"
    main(["bench", "model", "--preset", "b/16", "--batch", "64", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["device"] == "cuda"
    assert 0 < result["ours_mfu"] < 1 and 0 < result["timm_mfu"] < 1


def test_adamw_is_fused_and_checkpointed_blocks_save_memory_at_the_same_loss():
    """The step `bench model` times is the step training takes (fused AdamW on CUDA), and
    `train.grad_checkpointing` lowers peak memory without changing the loss."""
    from jobs.config import TrainSection
    from jobs.training.optim import build_optimizer
    from vit import ViT, ViTConfig

    model = ViT(ViTConfig.from_preset("b/16", image_size=224, num_classes=10)).cuda()
    optimizer, _ = build_optimizer(model, TrainSection(), total_steps=10)
    assert optimizer.defaults["fused"] is True
    x = torch.randn(32, 3, 224, 224, device="cuda")
    peaks, losses = [], []
    for checkpointed in (False, True):
        model.grad_checkpointing = checkpointed
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        peaks.append(torch.cuda.max_memory_allocated())
        losses.append(float(loss))
        model.zero_grad(set_to_none=True)
    assert peaks[1] < 0.7 * peaks[0], peaks
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_h14_at_518_px_trains_a_useful_micro_batch_with_checkpointed_blocks():
    """The largest preset at DINOv2's size: with `train.grad_checkpointing` a micro-batch of
    8 at 518 px (1,369 tokens) takes a bf16 step within the card's memory, weights, grads
    and AdamW state included."""
    from jobs.config import TrainSection
    from jobs.training.optim import build_optimizer
    from vit import ViT, ViTConfig

    model = ViT(ViTConfig.from_preset("h/14", image_size=518, num_classes=1000)).cuda()
    model.grad_checkpointing = True
    optimizer, _ = build_optimizer(model, TrainSection(), total_steps=10)
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(torch.randn(8, 3, 518, 518, device="cuda")).float().logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    total = torch.cuda.get_device_properties(0).total_memory
    peak = torch.cuda.max_memory_allocated()
    print(f"h/14 at 518 px, micro-batch 8, checkpointed: peak {peak / 2**30:.1f} GiB")
    assert peak < 0.9 * total


@pytest.mark.parametrize("sets", [{}, {"train.compile": True}], ids=["eager", "compiled"])
def test_two_gloo_ranks_on_one_gpu_keep_identical_replicas(tmp_path, sets):
    """DDP's code paths with CUDA tensors on one card: two gloo ranks share it, the epoch
    ends inside a gradient accumulation (no_sync, then a backward that must all-reduce), the
    epoch-end sums reduce on the device, eager and compiled."""
    from loop_fixtures import assert_identical_replicas

    assert_identical_replicas(tmp_path, "cuda", **sets)


def test_a_one_gpu_trial_is_fed_by_the_decode_cpus_it_keeps(tmp_path):
    """A one-GPU trial of B/16 at 224 px on 256-500 px JPEGs (builtin:photos), in a search
    of its own (its own local Ray, every CPU of the machine): `tune.trial_decode_cpus: auto`
    keeps the cores its GPU consumes in the trial, and after the first epoch its reports
    wait for data under a tenth of the time."""
    import os
    import statistics
    import subprocess
    import sys

    import yaml

    tree = {
        "model": {"preset": "b/16"},
        "data": {"dataset": "builtin:photos?n=6000", "image_size": 224, "cpus_per_task": 1.0},
        "train": {"batch_size": 128, "epochs": 3, "warmup_steps": 5, "report_every": 10},
        "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 2},
        "run": {"name": "fed", "storage_path": str(tmp_path / "runs")},
        "mlflow": {"enabled": False},
        "tune": {
            "space": {"train.lr": {"choice": [1e-4]}},
            "num_samples": 1,
            "max_concurrent": 1,
            "scheduler": "fifo",
        },
    }
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["VITRAY_DATA"] = str(tmp_path / "data")
    run = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "tune", "--config", str(tmp_path / "fed.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (held,) = [line for line in run.stdout.splitlines() if "each trial holds" in line]
    print(held)
    (result,) = (tmp_path / "runs" / "fed").glob("*/result.json")
    reports = [json.loads(line) for line in result.read_text().splitlines()]
    waits = [r["data_wait_fraction"] for r in reports if r["epoch"] > 1]
    print(f"data_wait_fraction after the first epoch: {waits}")
    assert waits and statistics.median(waits) < 0.1
