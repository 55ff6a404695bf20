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
