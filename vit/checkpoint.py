"""Checkpoint directories: `model.safetensors` + `config.json` (never pickle for weights).

`config.json` holds the ViTConfig (image size, and the mean and std the model normalises
by), the class names, and the source's resize and crop (`preprocessing`: null when unknown,
absent in older checkpoints). Loading at another image size resizes the position embeddings;
loading with another class count replaces the head.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vit.config import Preprocessing, Size, ViTConfig, to_2tuple
from vit.model import ViT
from vit.resize import INTERPOLATION_PRESETS, resize_pos_embed

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointMismatchError(ValueError):
    """The weights do not fit the architecture; the message lists every key that differs."""


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`load_state_dict(strict=True)` that names all missing, unexpected and misshapen keys."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    problems = [f"missing keys: {missing}"] * bool(missing)
    problems += [f"unexpected keys: {unexpected}"] * bool(unexpected)
    problems += [f"shape mismatch: {m}" for m in misshapen]
    if problems:
        raise CheckpointMismatchError("weights do not match the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)


Weights = tuple[dict[str, Any], dict[str, torch.Tensor]]  # (ViTConfig dict, state dict)


def model_weights(model: ViT) -> Weights:
    """A model as plain data, for another process (Ray's object store): no class pickled."""
    return model.config.to_dict(), model.state_dict()


def model_from_weights(weights: Weights) -> ViT:
    """The model `model_weights` took apart."""
    config, state = weights
    model = ViT(ViTConfig.from_dict(config))
    model.load_state_dict(state)
    return model


def save_checkpoint(
    model: ViT,
    directory: str | Path,
    class_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {
        "model": model.config.to_dict(),
        "class_names": class_names,
        "preprocessing": preprocessing.to_dict() if preprocessing else None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """config.json as a dict: `model` (the ViTConfig fields), `class_names`, `preprocessing`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a vitray checkpoint (no {CONFIG_FILE})")
    return json.loads(path.read_text())


def read_preprocessing(directory: str | Path) -> Preprocessing | None:
    """The resize and crop the checkpoint's weights were evaluated with; None when unknown."""
    found = read_checkpoint_meta(directory).get("preprocessing")
    try:
        return Preprocessing.from_dict(found) if found else None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: preprocessing: {e}") from e


def adapt_state_dict(
    state: dict[str, torch.Tensor],
    source: ViTConfig,
    target: ViTConfig,
    interpolation: str = "timm",
) -> dict[str, torch.Tensor]:
    """Weights of `source` made to fit `target`: position embeddings resized, head dropped."""
    state = dict(state)
    if "pos_embed" in state and source.grid_size != target.grid_size:
        state["pos_embed"] = resize_pos_embed(
            state["pos_embed"],
            target.grid_size,
            source.grid_size,
            source.posemb_prefix_tokens,
            **INTERPOLATION_PRESETS[interpolation],
        )
        log.info(
            "resized position embeddings: grid %s -> %s (%s interpolation)",
            "x".join(map(str, source.grid_size)),
            "x".join(map(str, target.grid_size)),
            interpolation,
        )
    if source.num_classes != target.num_classes:
        state = {k: v for k, v in state.items() if not is_head(k)}
    return state


def is_head(key: str) -> bool:
    """A classifier's weight: the head, and a distilled DeiT's second head."""
    return key.split(".")[0] in ("head", "head_dist")


def load_checkpoint(
    directory: str | Path,
    image_size: Size | None = None,
    num_classes: int | None = None,
    interpolation: str | None = None,
    map_location: str | torch.device = "cpu",
) -> ViT:
    """A ViT from a checkpoint directory, optionally at a new image size or class count.
    `interpolation` (vit.resize's presets): how its position embeddings are resized; by
    default as the weights' source does (`posemb_interpolation`: timm's for vitray's)."""
    directory = Path(directory)
    source = ViTConfig.from_dict(read_checkpoint_meta(directory)["model"])
    interpolation = interpolation or source.posemb_interpolation
    target = source
    if image_size is not None:
        target = target.replace(image_size=to_2tuple(image_size))
    if num_classes is not None:
        target = target.replace(num_classes=num_classes)
    state = load_file(directory / WEIGHTS_FILE, device=str(map_location))
    state = adapt_state_dict(state, source, target, interpolation)
    model = ViT(target).to(map_location)
    if source.num_classes != target.num_classes:
        head = {k: v for k, v in model.state_dict().items() if is_head(k)}
        state.update(head)  # the new head keeps its zero init
    load_state_dict_checked(model, state)
    return model
