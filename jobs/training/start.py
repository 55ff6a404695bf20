"""A fine-tune's starting point: the source checkpoint at the new resolution, new head.

The paper's recipe (section 3.2): keep the patch size, so the sequence grows; 2-D
interpolate the learned position embeddings to the new grid; replace the head with a
zero-initialised one for the new classes. The resized checkpoint is written and logged to
MLflow before training, tagged with where it came from, so the start is inspectable. The
source's normalisation stays in the model's config (mean, std), and its resize and crop
(`Start.preprocessing`, when the source declared them) in the checkpoint and the start, for
the job's data config to follow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from jobs.config import JobConfig
from vit import (
    Preprocessing,
    ViTConfig,
    load_checkpoint,
    read_checkpoint_meta,
    read_preprocessing,
    save_checkpoint,
)
from vit.checkpoint import WEIGHTS_FILE


@dataclass
class Start:
    config: ViTConfig  # the architecture trained from here on
    state: dict[str, torch.Tensor]
    directory: Path  # the resized checkpoint, as written
    tags: dict[str, str]
    before: tuple[torch.Tensor, tuple[int, int]] | None = None  # posemb and grid, pre-resize
    preprocessing: Preprocessing | None = None  # the source's resize and crop, if declared


def grid_text(config: ViTConfig) -> str:
    return "x".join(map(str, config.grid_size))


def preprocessing_text(config: ViTConfig, preprocessing: Preprocessing | None) -> str:
    numbers = ", ".join(f"{m:.4g}/{s:.4g}" for m, s in zip(config.mean, config.std, strict=True))
    if preprocessing is None:
        return f"mean/std {numbers}, resize and crop not declared"
    p = preprocessing
    return f"mean/std {numbers}, {p.interpolation} resize, {p.crop_mode} crop {p.crop_fraction:.4g}"


def data_for_start(cfg: JobConfig, start: Start | None) -> JobConfig:
    """A fine-tune feeds images as its weights saw them: the resize and crop they declare
    fill the data keys the config leaves unset (and the job says so)."""
    if start is None or start.preprocessing is None:
        return cfg
    data = cfg.data.with_preprocessing(start.preprocessing.to_dict())
    if data != cfg.data:
        interpolation, fraction, mode = data.eval_transform
        print(
            f"data from the weights' preprocessing: {interpolation} resize, {mode} crop "
            f"{fraction:g} (set data.interpolation / eval_crop_fraction / eval_crop_mode to "
            "choose otherwise)",
            flush=True,
        )
    return cfg.model_copy(update={"data": data})


def resized_start(
    cfg: JobConfig,
    class_names: list[str],
    fetch: Callable[[str, str], Path],
    workdir: str,
) -> Start:
    """Fetch `init.checkpoint` (`fetch(ref, directory)` makes it a local checkpoint), resize
    it to `data.image_size`, fit the head to the data's classes."""
    num_classes = len(class_names)
    source_dir = fetch(cfg.init.checkpoint, f"{workdir}/source")
    source_meta = read_checkpoint_meta(source_dir)
    source = ViTConfig.from_dict(source_meta["model"])
    preprocessing = read_preprocessing(source_dir)
    cfg.check_patch(source.patch_size)
    same_classes = source_meta.get("class_names") == class_names
    if cfg.init.keep_head and not same_classes:
        raise ValueError(
            "init.keep_head: the checkpoint's classes differ from the dataset's; a new head "
            "is needed (set init.keep_head=false)"
        )
    interpolation = cfg.init.interpolation or source.posemb_interpolation
    model = load_checkpoint(
        source_dir,
        image_size=cfg.data.size_hw,
        num_classes=num_classes,
        interpolation=interpolation,
    )
    if not cfg.init.keep_head:  # the paper: a zero-initialised head, even for equal classes
        model.reset_head(num_classes)
    config = model.config.replace(**cfg.model.overrides)  # e.g. drop_path for the fine-tune
    directory = save_checkpoint(
        model, Path(workdir) / "init", class_names=class_names, preprocessing=preprocessing
    )
    tags = {
        "vitray.init.source": cfg.init.checkpoint,
        "vitray.init.old_grid": grid_text(source),
        "vitray.init.new_grid": grid_text(config),
        "vitray.init.interpolation": interpolation,
        "vitray.init.head": "kept" if cfg.init.keep_head else "new, zero-initialised",
        "vitray.init.preprocessing": preprocessing_text(config, preprocessing),
    }
    print(
        f"fine-tune start: {cfg.init.checkpoint} grid {tags['vitray.init.old_grid']} -> "
        f"{tags['vitray.init.new_grid']} ({interpolation}), head "
        f"{tags['vitray.init.head']}; {tags['vitray.init.preprocessing']}",
        flush=True,
    )
    source_posemb = load_file(source_dir / WEIGHTS_FILE).get("pos_embed")
    before = (source_posemb, source.grid_size) if source_posemb is not None else None
    return Start(config, model.state_dict(), Path(directory), tags, before, preprocessing)


@contextmanager
def start_workdir(path: str) -> Iterator[str]:
    """Where a run writes the checkpoint it starts from: `path`, beside its checkpoints,
    when storage is a filesystem (kept, to look at later); a temp dir removed when the run
    ends when storage is object storage (`s3://...`: the driver's disk is no run's storage,
    and a fetched model left there would fill it run by run)."""
    if "://" not in path:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vitray-start-") as tmp:
        yield tmp
