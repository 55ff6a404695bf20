"""The shared training loop, in this process, fed from tensors: no Ray cluster, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.config import CONFIGS, load_config
from jobs.training.loop import Runner, run_training
from jobs.training.plan import TrainPlan
from vit import ViTConfig, load_checkpoint


class TensorShard:
    """A dataset shard held as tensors, iterated as Ray's `iter_torch_batches` does."""

    def __init__(self, patches: torch.Tensor, labels: torch.Tensor) -> None:
        self.patches, self.labels = patches, labels

    def iter_torch_batches(self, batch_size, drop_last=False, device=None, **_):
        n = len(self.labels)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            rows = slice(i, min(i + batch_size, stop))
            yield {
                "patches": self.patches[rows],
                "label": self.labels[rows],
                "ok": torch.ones(len(self.labels[rows]), dtype=torch.bool),
            }


def separable_shard(vit: ViTConfig, n: int, seed: int) -> TensorShard:
    """Two classes the model can learn in a few steps: dark images vs bright ones."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels == 1, 200, 40)[:, None, None]
    noise = torch.randint(-30, 30, (n, vit.num_patches, vit.patch_dim), generator=g)
    return TensorShard((base + noise).clamp(0, 255).to(torch.uint8), labels)


def job(**sets: object) -> dict:
    values = {"scaling.num_workers": 1, "train.batch_size": 16, "train.warmup_steps": 0, **sets}
    cfg = load_config(CONFIGS / "demo-pretrain.yaml", [f"{k}={v}" for k, v in values.items()])
    return cfg


def plan_for(cfg, train_rows: int) -> TrainPlan:
    steps = train_rows // cfg.micro_batch // cfg.train.grad_accum
    return TrainPlan(
        vit=cfg.vit_config(2),
        class_names=("dark", "bright"),
        split_rows={"train": train_rows, "val": 32},
        steps_per_epoch=steps,
        total_steps=steps * cfg.train.epochs,
    )


def runner_for(plan: TrainPlan, reports: list, saved: Path | None = None, checkpoint=None):
    def keep(directory: str) -> Path | None:
        if saved is None:
            return None
        import shutil

        shutil.copytree(directory, saved, dirs_exist_ok=True)
        return saved

    return Runner(
        rank=0,
        device=torch.device("cpu"),
        train=separable_shard(plan.vit, plan.train_rows, seed=0),
        val=separable_shard(plan.vit, plan.val_rows, seed=1),
        report=lambda metrics, ckpt: reports.append((metrics, ckpt)),
        make_checkpoint=keep,
        checkpoint=checkpoint,
    )


def test_plan_round_trips_through_a_dict():
    cfg = job()
    plan = plan_for(cfg, 64).replace(mlflow_run_id="abc")
    again = TrainPlan.from_dict(plan.to_dict())
    assert again == plan and again.num_classes == 2
    assert isinstance(plan.to_dict()["vit"], dict)  # plain values for Ray


def test_loop_learns_reports_every_n_steps_and_checkpoints_each_epoch(tmp_path):
    cfg = job(**{"train.epochs": 3, "train.report_every": 2, "train.lr": 0.003})
    plan = plan_for(cfg, 64)  # 4 steps an epoch
    reports: list = []
    run_training(
        {"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()},
        runner_for(plan, reports, saved=tmp_path / "last"),
    )
    steps = [m["step"] for m, _ in reports]
    assert steps == [2, 4, 6, 8, 10, 12]
    epoch_ends = [(m, c) for m, c in reports if "val_top1" in m]
    assert [m["step"] for m, _ in epoch_ends] == [4, 8, 12]
    assert all(c is not None for _, c in epoch_ends)  # a checkpoint with each epoch's report
    assert epoch_ends[-1][0]["val_top1"] == 1.0
    assert load_checkpoint(tmp_path / "last").config.num_classes == 2


def test_grad_accum_steps_over_micro_batches_and_partial_tail():
    """20 rows in micro-batches of 4 with 2 per step: 5 micro-batches make 3 optimizer steps
    (the last on one micro-batch); the plan counts the 2 full ones as the epoch."""
    cfg = job(**{"train.batch_size": 8, "train.grad_accum": 2, "train.epochs": 1})
    plan = plan_for(cfg, 20).replace(total_steps=3)
    reports: list = []
    run_training(
        {"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner_for(plan, reports)
    )
    assert [m["step"] for m, _ in reports] == [2, 3]


def test_an_epoch_without_a_batch_is_an_error_not_a_loop():
    cfg = job(**{"train.batch_size": 16})
    plan = plan_for(cfg, 64).replace(
        split_rows={"train": 8, "val": 32}, steps_per_epoch=1, total_steps=5
    )
    runner = runner_for(plan, [])
    runner.train = separable_shard(plan.vit, 8, seed=0)  # fewer rows than one micro-batch
    with pytest.raises(RuntimeError, match="yielded no batch of 16 rows"):
        run_training({"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner)


def test_resume_continues_from_the_checkpointed_step(tmp_path):
    import ray.train

    cfg = job(**{"train.epochs": 2, "train.report_every": 100})
    plan = plan_for(cfg, 64)
    first: list = []
    run_training(
        {"job": cfg.model_dump(mode="json"), "plan": plan.replace(total_steps=4).to_dict()},
        runner_for(plan, first, saved=tmp_path / "epoch1"),
    )
    resumed: list = []
    checkpoint = ray.train.Checkpoint.from_directory(str(tmp_path / "epoch1"))
    run_training(
        {"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()},
        runner_for(plan, resumed, checkpoint=checkpoint),
    )
    assert [m["step"] for m, _ in first] == [4]
    assert [m["step"] for m, _ in resumed] == [8]  # only the second epoch ran
