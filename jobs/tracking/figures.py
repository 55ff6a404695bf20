"""`vitray visualize CHECKPOINT`: the paper's Figures 6 and 7 for any checkpoint, as PNG
files and (optionally) artifacts of an MLflow run. `pretrain`/`finetune` call
`log_figures` on their best checkpoint at the end of training."""

from __future__ import annotations

from pathlib import Path

import torch

from jobs.tracking import plots
from pipeline.config import DataConfig
from vit import ViT, load_checkpoint
from vit.analysis import (
    attention_rollout,
    embedding_filters,
    mean_attention_distance,
    posemb_similarity,
)
from vit.patches import unpatchify


def sample_batch(model: ViT, data: DataConfig, n: int) -> torch.Tensor:
    """`n` validation images as uint8 patches, preprocessed as evaluation does; labels
    unchecked (a model without a classifier has no classes to check them against)."""
    from pipeline.dataset import first_rows

    rows = first_rows(data, "val", model.config.patch_size, n)
    return torch.from_numpy(rows["patches"][rows["ok"]])


def figures(
    model: ViT,
    patches: torch.Tensor | None,
    before: tuple[torch.Tensor, tuple[int, int]] | None = None,
) -> dict:
    """name -> matplotlib Figure; attention figures only when images are given."""
    c = model.config
    out = {
        "patch_embedding_filters.png": plots.embedding_filters(
            embedding_filters(model.patch_embed.weight, c.patch_size, c.in_chans)
        )
    }
    if c.posemb == "learn":
        sim = posemb_similarity(model.pos_embed, c.grid_size, c.posemb_prefix_tokens)
        out["posemb_similarity.png"] = plots.posemb_similarity(sim, f"grid {c.grid_size}")
    if before is not None:
        pos_embed, grid = before
        sim = posemb_similarity(pos_embed, grid, c.posemb_prefix_tokens)
        out["posemb_similarity_before_resize.png"] = plots.posemb_similarity(
            sim, f"before resize: grid {grid}"
        )
    if patches is not None and len(patches):
        model.eval()
        with torch.no_grad():
            attention = model.forward_intermediates(patches)["attention"]
        distances = [
            mean_attention_distance(a, c.grid_size, c.patch_size, c.num_prefix_tokens)
            for a in attention
        ]
        out["attention_distance.png"] = plots.attention_distance(distances, c.patch_size)
        maps = attention_rollout(attention, c.grid_size, c.num_prefix_tokens)
        images = unpatchify(patches[:8], c.patch_size, c.grid_size).numpy()
        out["attention_rollout.png"] = plots.attention_maps(images, maps[:8])
    return out


def log_figures(
    checkpoint_dir: str | Path,
    data: DataConfig | None,
    run_id: str | None,
    uri: str,
    out: Path,
    before: tuple[torch.Tensor, tuple[int, int]] | None = None,
) -> list[Path]:
    """Write every figure under `out`; log them to `run_id` under figures/ when given.
    `before`: a fine-tune's position embeddings and grid before the resize, drawn too."""
    model = load_checkpoint(checkpoint_dir).eval()
    patches = sample_batch(model, data, 16) if data is not None else None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(model, patches, before).items():
        fig.savefig(out / name, dpi=120)
        plots.close(fig)
        written.append(out / name)
    if run_id:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        for path in written:
            client.log_artifact(run_id, str(path), "figures")
    return written
