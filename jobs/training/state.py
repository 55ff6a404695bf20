"""Training checkpoints: the model as a vitray checkpoint directory, plus the optimiser,
schedule, step and MLflow run in `train_state.pt` (loaded with `weights_only=True`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vit import Preprocessing, ViT, save_checkpoint
from vit.checkpoint import WEIGHTS_FILE, load_state_dict_checked

TRAIN_STATE = "train_state.pt"


def restore(model: ViT, optimizer, scheduler, checkpoint: Any) -> int:
    """Resume from the runner's latest checkpoint, if any; returns the step reached."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        load_state_dict_checked(model, load_file(Path(d) / WEIGHTS_FILE))
        # onto the CPU: Ray Train shows each worker all its node's GPUs, and a bare load
        # puts every rank's copy of the AdamW state on GPU 0; `load_state_dict` below moves
        # it to the parameters' device
        state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def save(
    model: ViT,
    optimizer,
    scheduler,
    *,
    step: int,
    out: Path,
    class_names: tuple[str, ...],
    mlflow_run_id: str | None,
    preprocessing: Preprocessing,
) -> Path:
    """The checkpoint keeps the resize and crop it was evaluated with, for whoever loads it."""
    save_checkpoint(model, out, class_names=list(class_names), preprocessing=preprocessing)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "mlflow_run_id": mlflow_run_id or "",
    }
    torch.save(state, out / TRAIN_STATE)
    return out
