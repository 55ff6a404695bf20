"""Every matplotlib figure vitray draws, in one place; each returns a Figure to save or log."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files and MLflow artifacts only; never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def trial_curves(curves: dict[str, list[tuple[float, float]]], metric: str) -> Figure:
    """One line per Tune trial: `metric` against epochs; stopped trials end early."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(curves.items()):
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of every trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def params_vs_metric(rows: list[dict[str, Any]], params: list[str], metric: str) -> Figure:
    """One scatter per searched parameter: its sampled value against the trial's metric."""
    cols = min(3, max(1, len(params)))
    nrows = math.ceil(max(1, len(params)) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, params, strict=False):
        points = [(r[name], r[metric]) for r in rows if r.get(metric) is not None]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _ in points)
        labels = sorted({str(x) for x, _ in points})
        xs = [x if numeric else labels.index(str(x)) for x, _ in points]
        ax.scatter(xs, [y for _, y in points])
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif points and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)


def grid_of_images(images: Any, title: str, cols: int = 7, cmap: str | None = None) -> Figure:
    """Small images (K, H, W[, C]) in a grid, no axes."""
    k = len(images)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images, strict=False):
        image = image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image
        ax.imshow(image, cmap=cmap or ("gray" if image.ndim == 2 else None))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def embedding_filters(components: Any) -> Figure:
    """The paper's Figure 7 (left): principal components of the patch embedding."""
    return grid_of_images(components.numpy(), "patch embedding: principal components")


def posemb_similarity(similarity: Any, title: str = "position embedding similarity") -> Figure:
    """Figure 7 (centre): one cosine-similarity map per patch position, laid out as the grid."""
    gh, gw = similarity.shape[:2]
    fig, axes = plt.subplots(gh, gw, figsize=(gw * 0.7 + 0.8, gh * 0.7 + 0.5), squeeze=False)
    for i in range(gh):
        for j in range(gw):
            ax = axes[i, j]
            image = ax.imshow(similarity[i, j].numpy(), vmin=-1, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity")
    fig.suptitle(title)
    return fig


def attention_distance(distances: Any, patch: int) -> Figure:
    """Figure 7 (right): mean attention distance of every head, against depth."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for depth, heads in enumerate(distances):
        ax.scatter([depth] * len(heads), heads.numpy(), s=14)
    ax.set_xlabel("network depth (block)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title(f"attention distance per head (patch {patch} px)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def attention_maps(images: Any, maps: Any) -> Figure:
    """Figure 6: input images above their attention-rollout maps, overlaid."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(n * 1.6, 3.4), squeeze=False)
    for k in range(n):
        image = images[k]
        image = image.squeeze(-1) if image.shape[-1] == 1 else image
        h, w = image.shape[:2]
        for row in (0, 1):
            axes[row, k].imshow(image, cmap="gray" if image.ndim == 2 else None)
            axes[row, k].axis("off")
        axes[1, k].imshow(maps[k].numpy(), cmap="jet", alpha=0.5, extent=(0, w, h, 0))
    fig.suptitle("attention rollout")
    fig.tight_layout()
    return fig


def confusion_matrix(matrix: Any, class_names: list[str]) -> Figure:
    """Rows: true class; columns: predicted; counts annotated when the matrix is small."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, n * 0.45 + 1.5), max(3.5, n * 0.45 + 1)))
    image = ax.imshow(matrix, cmap="Blues")
    ticks = range(n) if n <= 40 else []
    ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=90)
    ax.set_yticks(ticks, [class_names[i] for i in ticks])
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i][j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig
