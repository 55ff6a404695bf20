"""A training loop fed from tensors: a dataset shard as Ray's iterator gives it, a small
config, its plan and runner, and two DDP ranks over gloo."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch

from jobs.config import CONFIGS, load_config
from jobs.training.loop import Runner, run_training
from jobs.training.plan import TrainPlan
from vit import ViTConfig


class TensorShard:
    """A dataset shard held as tensors, iterated as Ray's `iter_torch_batches` does."""

    def __init__(
        self, patches: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor | None = None
    ) -> None:
        self.patches, self.labels = patches, labels
        self.ok = torch.ones(len(labels), dtype=torch.bool) if ok is None else ok

    def iter_torch_batches(self, batch_size, drop_last=False, device=None, **_):
        n = len(self.labels)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            rows = slice(i, min(i + batch_size, stop))
            batch = {"patches": self.patches[rows], "label": self.labels[rows], "ok": self.ok[rows]}
            yield {k: v.to(device) for k, v in batch.items()} if device else batch


def separable_shard(vit: ViTConfig, n: int, seed: int) -> TensorShard:
    """Two classes the model can learn in a few steps: dark images vs bright ones."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels == 1, 200, 40)[:, None, None]
    noise = torch.randint(-30, 30, (n, vit.num_patches, vit.patch_dim), generator=g)
    return TensorShard((base + noise).clamp(0, 255).to(torch.uint8), labels)


def with_bad_rows(shard: TensorShard, every: int) -> TensorShard:
    """Every `every`-th row bad, as the pipeline leaves one: zero patches, label -1."""
    ok = torch.arange(len(shard.labels)) % every != 0
    patches = torch.where(ok[:, None, None], shard.patches, 0)
    return TensorShard(patches, torch.where(ok, shard.labels, -1), ok)


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


def ddp_worker(rank: int, tmp: Path, device: str, sets: dict) -> None:
    """One of two gloo ranks training on its own half of the data, on `device` (both ranks
    on one GPU: gloo reduces CUDA tensors, where NCCL needs a GPU per rank)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/group", rank=rank, world_size=2)
    cfg = job(**{"scaling.num_workers": 2, "train.batch_size": 16, "train.grad_accum": 2, **sets})
    plan = plan_for(cfg, 40).replace(steps_per_epoch=3, total_steps=3)
    wrapped = []
    runner = runner_for(plan, [])
    runner.rank, runner.device = rank, torch.device(device)
    runner.train = separable_shard(plan.vit, 20, seed=rank)  # 5 micro-batches of 4: 2, 2, 1
    runner.prepare_model = lambda m: (
        wrapped.append(torch.nn.parallel.DistributedDataParallel(m)) or wrapped[0]
    )
    run_training({"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner)
    state = {k: v.cpu() for k, v in wrapped[0].module.state_dict().items()}
    torch.save(state, tmp / f"rank{rank}.pt")
    dist.destroy_process_group()


def assert_identical_replicas(tmp: Path, device: str, **sets: object) -> None:
    """Two DDP ranks (spawned, not forked: a fork of a process whose OpenMP threads ran hangs
    in them) end with bit-identical weights."""
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=ddp_worker, args=(r, tmp, device, sets)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=600)
    assert [p.exitcode for p in ranks] == [0, 0]
    a, b = (torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
