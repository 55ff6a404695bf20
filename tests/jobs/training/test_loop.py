"""The shared training loop, in this process, fed from tensors: no Ray cluster, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.config import CONFIGS, load_config
from jobs.training.loop import Runner, run_training
from jobs.training.plan import TrainPlan
from vit import Preprocessing, ViTConfig, load_checkpoint, read_preprocessing


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
            yield {
                "patches": self.patches[rows],
                "label": self.labels[rows],
                "ok": self.ok[rows],
            }


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
    # the resize and crop it was evaluated with travel with it
    assert read_preprocessing(tmp_path / "last") == Preprocessing("bilinear", 1.0, "center")


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


# Device and DDP contracts (a GPU or a second process shows what one CPU process hides) ---


def test_sums_over_ranks_reduce_on_the_training_device(monkeypatch):
    """NCCL reduces CUDA tensors only: a CPU tensor failed every GPU job at its first report."""
    import torch.distributed as dist

    from jobs.training import report

    seen = []

    def all_reduce(t):
        seen.append(t.device)
        raise StopIteration  # a meta tensor has no values to read back

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(StopIteration):
        report.all_sum([1.0, 2.0], torch.device("meta"))
    assert seen == [torch.device("meta")]


def test_a_resume_loads_optimizer_state_onto_the_models_device(tmp_path, monkeypatch):
    """The model moves before the optimizer state loads: loaded first, the state stayed on
    the CPU and the first step after a resume mixed devices. The file itself is read onto
    the CPU: every rank of a multi-GPU node loaded the whole AdamW state onto GPU 0."""
    import ray.train

    from jobs.training import state
    from jobs.training.loop import build_model

    load, placed = torch.load, []

    def recording_load(*args, **kwargs):
        placed.append(kwargs.get("map_location"))
        return load(*args, **kwargs)

    monkeypatch.setattr(state.torch, "load", recording_load)

    cfg = job(**{"train.epochs": 1})
    plan = plan_for(cfg, 64)
    run_training(
        {"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()},
        runner_for(plan, [], saved=tmp_path / "epoch1"),
    )
    runner = runner_for(
        plan, [], checkpoint=ray.train.Checkpoint.from_directory(tmp_path / "epoch1")
    )
    runner.device = torch.device("meta")
    model, optimizer, _, step = build_model(cfg, plan, runner)
    assert step == 4 and next(model.vit.parameters()).device.type == "meta"
    moments = [v for s in optimizer.state.values() for v in s.values() if v.ndim > 0]
    assert moments and all(v.device.type == "meta" for v in moments)
    assert placed == ["cpu"]


def test_compiled_training_writes_checkpoints_with_clean_keys(tmp_path, monkeypatch):
    """`train.compile: true` saves the module itself, not the compiled wrapper whose keys
    carry `_orig_mod.` (a checkpoint that no longer loaded). The eager backend stands in
    for inductor: the wrapper is the same, the test needs no C++ toolchain."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))
    cfg = job(**{"train.epochs": 1, "train.compile": "true"})
    plan = plan_for(cfg, 64)
    run_training(
        {"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()},
        runner_for(plan, [], saved=tmp_path / "compiled"),
    )
    model = load_checkpoint(tmp_path / "compiled")  # checks every key and shape
    assert model.config.num_classes == 2


def ddp_worker(rank: int, tmp: Path) -> None:
    """One of two gloo ranks training on its own half of the data."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/group", rank=rank, world_size=2)
    cfg = job(**{"scaling.num_workers": 2, "train.batch_size": 16, "train.grad_accum": 2})
    plan = plan_for(cfg, 40).replace(steps_per_epoch=3, total_steps=3)
    wrapped = []
    runner = runner_for(plan, [])
    runner.rank = rank
    runner.train = separable_shard(plan.vit, 20, seed=rank)  # 5 micro-batches of 4: 2, 2, 1
    runner.prepare_model = lambda m: (
        wrapped.append(torch.nn.parallel.DistributedDataParallel(m)) or wrapped[0]
    )
    run_training({"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner)
    torch.save(wrapped[0].module.state_dict(), tmp / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_replicas_stay_identical_when_an_epoch_ends_inside_a_gradient_accumulation(tmp_path):
    """5 micro-batches with grad_accum 2: the last step has one micro-batch, and its
    backward must all-reduce, or each rank steps on its own gradients and they drift."""
    import multiprocessing

    # spawned, not forked: a fork of a process whose OpenMP threads ran hangs in them
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=ddp_worker, args=(r, tmp_path)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 0]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# The GPU's queue: nothing read back per micro-batch, batches pinned, uploads in the background


@pytest.mark.parametrize(
    "sets", [{}, {"train.mixup": 0.8}, {"train.cutmix": 1.0}], ids=["plain", "mixup", "cutmix"]
)
def test_micro_batches_read_nothing_back_from_the_device_between_reports(sets):
    """The meta device holds no values, so any read of one raises (`.item()`, `if tensor`,
    boolean indexing, a count made a float) where a GPU would stall until its queue drains.
    A step reads nothing: loss and bad-row counts wait on the device for the report."""
    from jobs.training.loop import accumulate, build_model
    from jobs.training.report import Reporter

    cfg = job(**{"train.grad_accum": 2, "train.label_smoothing": 0.1, **sets})
    plan = plan_for(cfg, 64)
    runner = runner_for(plan, [])
    runner.device = torch.device("meta")
    model, *_ = build_model(cfg, plan, runner)
    rep = Reporter(
        rank=0,
        micro_batch=cfg.micro_batch,
        steps_per_epoch=4,
        total_steps=4,
        report_every=100,
        sink=None,
        progress=None,
        start_step=0,
        device=runner.device,
    )
    shard = with_bad_rows(separable_shard(plan.vit, 64, seed=0), every=3)
    batches = (
        {k: v.to("meta") for k, v in b.items()}
        for b in shard.iter_torch_batches(cfg.micro_batch, drop_last=True)
    )
    steps = [accumulate(model, batches, cfg, plan.num_classes, rep) for _ in range(3)]
    assert steps == [2, 2, 2] and rep.images == 6 * cfg.micro_batch
    assert rep.loss_sum.device.type == rep.skipped.device.type == "meta"


def test_bad_rows_weigh_nothing_and_the_loss_is_the_mean_over_good_ones():
    """The masked loss equals the loss over the good rows alone (what filtering them out
    gave), and a micro-batch of only bad rows gives zero loss and zero gradients."""
    import torch.nn.functional as F

    from jobs.training.loop import build_model, micro_batch_loss

    cfg = job(**{"train.label_smoothing": 0.1})
    plan = plan_for(cfg, 64)
    model, *_ = build_model(cfg, plan, runner_for(plan, []))
    model.vit.eval()  # no dropout: the two losses see the same network
    shard = with_bad_rows(separable_shard(plan.vit, 8, seed=0), every=3)
    b = next(shard.iter_torch_batches(8))
    loss, skipped = micro_batch_loss(model, b, cfg, plan.num_classes)
    ok = b["ok"]
    alone = F.cross_entropy(model.vit(b["patches"][ok]), b["label"][ok], label_smoothing=0.1)
    torch.testing.assert_close(loss, alone)
    assert int(skipped) == 3  # rows 0, 3 and 6

    bad = {"patches": b["patches"], "label": torch.full((8,), -1), "ok": torch.zeros(8, dtype=bool)}
    loss, skipped = micro_batch_loss(model, bad, cfg, plan.num_classes)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(skipped) == 8
    grads = [p.grad for p in model.vit.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # every rank still all-reduces


def test_a_mix_never_blends_in_a_bad_row():
    """Mixup and CutMix pair each row with another of the batch: bad rows are first replaced
    by good ones, so a good image is only ever mixed with a good image."""
    from jobs.training.loop import good_rows_in_place_of_bad

    ok = torch.tensor([False, True, False, True, True, False])
    patches = torch.arange(6.0)[:, None, None].expand(6, 2, 3)
    labels = torch.tensor([-1, 1, -1, 0, 1, -1])
    mixed, mixed_labels = good_rows_in_place_of_bad(patches, labels, ok)
    rows = mixed[:, 0, 0].long()
    assert torch.equal(rows[ok], torch.tensor([1, 3, 4]))  # good rows stay where they are
    assert set(rows.tolist()) <= {1, 3, 4} and (mixed_labels >= 0).all()
    none_good = torch.zeros(6, dtype=torch.bool)
    assert good_rows_in_place_of_bad(patches, labels, none_good)[0].shape == patches.shape


def test_batches_are_pinned_for_a_copy_to_the_gpu_that_does_not_block():
    """On CUDA, Ray Data pins each batch so that its non-blocking copy overlaps the step;
    on the CPU nothing is pinned (pinning needs CUDA)."""
    from jobs.training.loop import epoch_batches

    asked: list[dict] = []

    class Recording:
        def iter_torch_batches(self, **kwargs):
            asked.append(kwargs)
            return iter(())

    cfg = job()
    runner = runner_for(plan_for(cfg, 64), [])
    runner.train = Recording()
    for device in ("cuda", "cpu"):
        runner.device = torch.device(device)
        epoch_batches(runner, cfg)
    assert [(a["device"].type, a["pin_memory"]) for a in asked] == [
        ("cuda", True),
        ("cpu", False),
    ]


def test_a_checkpoint_uploaded_in_the_background_keeps_its_directory(tmp_path):
    """Ray's ASYNC upload reads the directory after `report` has returned: the loop must
    leave it (Ray deletes it once stored). A runner that stores it during `report` gets
    it deleted afterwards, so that nothing piles up in the temporary directory."""
    cfg = job(**{"train.epochs": 1})
    plan = plan_for(cfg, 64)
    handed: dict[bool, list[Path]] = {True: [], False: []}
    for background in (True, False):
        runner = runner_for(plan, [])
        runner.make_checkpoint = lambda d, b=background: handed[b].append(Path(d)) or d
        runner.uploads_in_background = background
        run_training({"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner)
    (later,), (stored,) = handed[True], handed[False]
    try:
        assert load_checkpoint(later).config.num_classes == 2  # whole, after the report
        assert not stored.exists()
    finally:
        import shutil

        shutil.rmtree(later, ignore_errors=True)


def test_a_save_that_fails_leaves_no_directory_behind(monkeypatch, tmp_path):
    """A save that fails (a full disk) hands Ray nothing to delete: the loop removes what it
    wrote, or every restart of the run would leave another checkpoint on the full disk."""
    import tempfile

    from jobs.training.loop import report

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runner = runner_for(plan_for(job(), 64), [])
    runner.uploads_in_background = True

    def save_to(directory: Path) -> Path:
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        report({"step": 1}, True, runner, save_to)
    assert list(tmp_path.iterdir()) == []


def test_ray_train_reports_upload_checkpoints_in_the_background(monkeypatch):
    """Every report to Ray Train asks for the ASYNC upload: Ray delivers reports in order,
    so one synchronous report after a checkpoint would wait for its upload."""
    import ray.train

    from jobs.training.loop import report_to_ray_train

    calls: list[dict] = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: calls.append(kw))
    report_to_ray_train({"step": 1}, None)
    assert calls[0]["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.ASYNC
    assert calls[0]["delete_local_checkpoint_after_upload"] is True


def test_a_val_subset_is_evaluated_during_training_and_the_whole_split_at_the_end():
    cfg = job(**{"train.epochs": 3, "train.report_every": 100, "data.val_subset": 8})
    plan = plan_for(cfg, 64)
    reports: list = []
    runner = runner_for(plan, reports)
    runner.val_subset = separable_shard(plan.vit, 8, seed=2)
    run_training({"job": cfg.model_dump(mode="json"), "plan": plan.to_dict()}, runner)
    evaluated = [m["val_images"] for m, _ in reports if "val_top1" in m]
    assert evaluated == [8, 8, plan.val_rows]
