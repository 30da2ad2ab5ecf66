"""Figures the pipeline logs to MLflow: confusion matrix, sample predictions, model comparison.

Built on `matplotlib.figure.Figure` directly (no pyplot): no global figure state and no GUI
backend, so concurrent tasks in threads can draw safely.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def confusion_figure(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> Figure:
    """Row-normalized confusion matrix (true class rows), with counts in the cells."""
    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = max(4.0, 0.45 * n + 2.0)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 30:
        ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
        ax.set_yticks(range(n), labels=list(classes))
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"confusion matrix (accuracy {acc:.2%})")
    fig.tight_layout()
    return fig


def sample_grid(
    images: Any,
    true: Sequence[str],
    predicted: Sequence[str],
    probs: Sequence[float],
    cols: int = 8,
) -> Figure:
    """The chapter's visualize_predictions: each image titled predicted (probability) / true,
    green when right, red when wrong. `images` is uint8 N,C,H,W."""
    imgs = np.asarray(images)
    n = len(imgs)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(1.6 * cols, 1.9 * rows))
    for k in range(n):
        ax = fig.add_subplot(rows, cols, k + 1)
        img = imgs[k].transpose(1, 2, 0)
        ax.imshow(
            img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None
        )
        ok = predicted[k] == true[k]
        ax.set_title(
            f"{predicted[k]} ({probs[k]:.0%})\ntrue: {true[k]}",
            fontsize=7,
            color="green" if ok else "red",
        )
        ax.axis("off")
    fig.tight_layout()
    return fig


def comparison_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Test accuracy against parameter count (log scale), one labelled point per model: the
    chapter's accuracy-versus-size trade-off at a glance."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    done = [r for r in rows if r.get("test_accuracy") is not None and r.get("params")]
    for r in done:
        ax.scatter(r["params"], r["test_accuracy"], s=40)
        ax.annotate(r["model"], (r["params"], r["test_accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title("architectures: accuracy vs size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
