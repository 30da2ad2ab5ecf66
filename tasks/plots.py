"""Figures the pipeline logs to MLflow: confusion matrix, sample predictions, model comparison.

The two figures of every training run (confusion matrix, sample predictions) are drawn with
Pillow, which torchvision has already loaded. Why not matplotlib for them: they sit on the
critical path of every `cnnpipe train`, and importing matplotlib plus rendering them with Agg
cost about 1.5 s per run on the 2-core development machine, against a few milliseconds here.
The comparison chart (one per `cnnpipe compare`, with a log axis and annotations) keeps
matplotlib, imported when it is drawn, on `matplotlib.figure.Figure` directly (no pyplot: no
global figure state and no GUI backend, so tasks in threads can draw safely).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
RIGHT, WRONG = (0, 128, 0), (200, 0, 0)
# matplotlib's "Blues" at 0 and 1 (white to dark blue), interpolated linearly.
BLUES = np.array([(247, 251, 255), (8, 48, 107)], dtype=np.float64)
MAX_LABELLED_CLASSES = 30  # above this, cells are too small for labels and counts


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = _font(size).getbbox(text)
    return int(right - left), int(bottom - top)


def _fit(text: str, width: int, size: int) -> str:
    """`text` shortened with an ellipsis to fit `width` pixels."""
    if _text_size(text, size)[0] <= width:
        return text
    while text and _text_size(text + "…", size)[0] > width:
        text = text[:-1]
    return text + "…"


def _vertical_text(text: str, size: int, color: tuple[int, int, int]) -> Image.Image:
    """`text` rotated 90 degrees counter-clockwise (reads bottom to top), on white."""
    w, h = _text_size(text, size)
    img = Image.new("RGB", (w + 4, h + 6), WHITE)
    ImageDraw.Draw(img).text((2, 0), text, fill=color, font=_font(size))
    return img.rotate(90, expand=True)


def confusion_image(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> Image.Image:
    """Row-normalized confusion matrix (true class rows, cells coloured by the fraction of the
    true class), with counts in the cells and class names on both axes up to 30 classes."""
    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    labelled = n <= MAX_LABELLED_CLASSES
    cell = 40 if labelled else max(2, 800 // max(n, 1))
    fs = 12
    names = [_fit(str(c), 140, fs) for c in classes] if labelled else []
    label_w = max((_text_size(s, fs)[0] for s in names), default=0) + 8
    line = _text_size("Ag", fs)[1] + 8
    left, top = label_w + line + 8, 2 * line + (label_w if labelled else 0) + 4
    bar_x = left + n * cell + 16
    width, height = bar_x + 16 + 40 + line, top + n * cell + 12
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    colors = BLUES[0] + norm[..., None] * (BLUES[1] - BLUES[0])
    cells = np.repeat(np.repeat(colors.round().astype(np.uint8), cell, 0), cell, 1)
    img.paste(Image.fromarray(cells), (left, top))
    acc = np.trace(m) / max(m.sum(), 1)
    draw.text((left, 4), f"confusion matrix (accuracy {acc:.2%})", fill=BLACK, font=_font(14))
    center = left + n * cell // 2
    draw.text((center, line + 4), "predicted", fill=BLACK, font=_font(fs), anchor="mt")
    img.paste(_vertical_text("true", fs, BLACK), (4, top + n * cell // 2 - 12))
    if labelled:
        for i, name in enumerate(names):
            y = top + i * cell + cell // 2
            draw.text((left - 6, y), name, fill=BLACK, font=_font(fs), anchor="rm")
            label = _vertical_text(name, fs, BLACK)
            img.paste(label, (left + i * cell + (cell - label.width) // 2, top - label.height - 4))
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    color = WHITE if norm[i, j] > 0.5 else BLACK
                    xy = (left + j * cell + cell // 2, top + i * cell + cell // 2)
                    draw.text(xy, str(int(m[i, j])), fill=color, font=_font(11), anchor="mm")
    # Colour bar: 1 at the top, 0 at the bottom.
    ramp = np.linspace(1.0, 0.0, n * cell)[:, None, None]
    bar = (BLUES[0] + ramp * (BLUES[1] - BLUES[0])).round().astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(bar, 16, axis=1)), (bar_x, top))
    draw.text((bar_x + 20, top), "1", fill=BLACK, font=_font(fs), anchor="lt")
    draw.text((bar_x + 20, top + n * cell), "0", fill=BLACK, font=_font(fs), anchor="lb")
    caption = _vertical_text("fraction of true class", fs, BLACK)
    img.paste(caption, (bar_x + 36, top + max(n * cell - caption.height, 0) // 2))
    return img


def sample_grid(
    images: Any,
    true: Sequence[str],
    predicted: Sequence[str],
    probs: Sequence[float],
    cols: int = 8,
    tile: int = 112,
) -> Image.Image:
    """The chapter's visualize_predictions: each image (uint8 N,C,H,W) under its predicted
    class (probability) and its true class, green when right, red when wrong."""
    imgs = np.asarray(images)
    n = len(imgs)
    cols = max(min(cols, n), 1)
    rows = (n + cols - 1) // cols
    fs = 12
    line = _text_size("Ag", fs)[1] + 5
    cap = 2 * line + 4
    grid = Image.new("RGB", (cols * (tile + 8) + 8, rows * (tile + cap + 8) + 8), WHITE)
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        hwc = imgs[k].transpose(1, 2, 0)
        pic = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc[..., :3]).convert("RGB")
        scale = tile / max(pic.size)
        size = (max(1, round(pic.width * scale)), max(1, round(pic.height * scale)))
        # Small images (CIFAR's 32 px) are enlarged pixel for pixel, as imshow shows them.
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
        pic = pic.resize(size, resample)
        x, y = 8 + (k % cols) * (tile + 8), 8 + (k // cols) * (tile + cap + 8)
        color = RIGHT if predicted[k] == true[k] else WRONG
        for i, text in enumerate((f"{predicted[k]} ({probs[k]:.0%})", f"true: {true[k]}")):
            draw.text((x + tile // 2, y + i * line), _fit(text, tile, fs), fill=color,
                      font=_font(fs), anchor="mt")  # fmt: skip
        grid.paste(pic, (x + (tile - pic.width) // 2, y + cap + (tile - pic.height) // 2))
    return grid


def comparison_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Test accuracy against parameter count (log scale), one labelled point per model: the
    chapter's accuracy-versus-size trade-off at a glance."""
    from matplotlib.figure import Figure

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
