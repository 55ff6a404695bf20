"""The shared training loop, in this process, fed from tensors: no Ray cluster, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.training.loop import run_training
from jobs.training.plan import TrainPlan
from vit import Preprocessing, load_checkpoint, read_preprocessing

from loop_fixtures import (
    assert_identical_replicas,
    job,
    plan_for,
    runner_for,
    separable_shard,
    with_bad_rows,
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


def test_replicas_stay_identical_when_an_epoch_ends_inside_a_gradient_accumulation(tmp_path):
    """5 micro-batches with grad_accum 2: the last step has one micro-batch, and its
    backward must all-reduce, or each rank steps on its own gradients and they drift."""
    assert_identical_replicas(tmp_path, "cpu")


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
