"""tasks/plots.py: the run figures drawn with Pillow (confusion matrix, sample predictions)."""

from __future__ import annotations

import sys

import numpy as np

from tasks import plots


def test_confusion_cells_are_shaded_by_the_fraction_of_their_true_class() -> None:
    classes = ["cat", "dog", "a-very-long-class-name-that-needs-shortening"]
    matrix = [[90, 10, 0], [50, 50, 0], [0, 0, 7]]
    arr = np.asarray(plots.confusion_image(classes, matrix)).reshape(-1, 3)

    def cells_of(fraction: float) -> int:  # pixels of exactly that shade of "Blues"
        lo, hi = plots.BLUES
        color = (lo + fraction * (hi - lo)).round().astype(np.uint8)
        return int((arr == color).all(axis=1).sum())

    cell = 40 * 40
    # Each shade fills its cells but for the count's digits (rows: 0.9 0.1 0 / 0.5 0.5 0 / 0 0 1).
    assert cell * 0.8 < cells_of(0.9) <= cell
    assert cell * 0.8 < cells_of(0.1) <= cell
    assert 2 * cell * 0.8 < cells_of(0.5) <= 2 * cell
    assert cells_of(1.0) > cell * 0.8  # the 7/7 cell (and the top of the colour bar)


def test_confusion_of_many_classes_has_no_labels_and_stays_bounded() -> None:
    n = 200
    rng = np.random.default_rng(0)
    img = plots.confusion_image([f"class{i}" for i in range(n)], rng.integers(0, 5, (n, n)))
    assert max(img.size) < 1200  # cells shrink; no 200 labels of text


def test_sample_grid_colours_captions_by_right_and_wrong() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    right = plots.sample_grid(images, ["a"] * 5, ["a"] * 5, [0.9] * 5, cols=3)
    wrong = plots.sample_grid(images, ["a"] * 5, ["b"] * 5, [0.9] * 5, cols=3)
    assert right.size == wrong.size and right.width > right.height  # 3 columns, 2 rows

    def caption_pixels(img, color):  # noqa: ANN001, ANN202
        arr = np.asarray(img)[:30].astype(int)  # the first row's captions
        return int((np.abs(arr - np.array(color)).sum(axis=-1) < 60).sum())

    assert caption_pixels(right, plots.RIGHT) > 20 and caption_pixels(right, plots.WRONG) == 0
    assert caption_pixels(wrong, plots.WRONG) > 20 and caption_pixels(wrong, plots.RIGHT) == 0


def test_grayscale_and_large_images_fit_their_tiles() -> None:
    gray = np.full((2, 1, 300, 200), 128, dtype=np.uint8)
    img = plots.sample_grid(gray, ["x", "y"], ["x", "x"], [0.5, 0.6], cols=2, tile=64)
    assert img.height < 64 + 60 and img.width < 2 * 64 + 40


def test_run_figures_do_not_import_matplotlib() -> None:
    # The point of drawing them with Pillow: no matplotlib import on every training run.
    import subprocess

    code = (
        "import sys, numpy as np\n"
        "from tasks import plots\n"
        "plots.confusion_image(['a', 'b'], [[1, 0], [0, 1]])\n"
        "plots.sample_grid(np.zeros((1, 3, 8, 8), np.uint8), ['a'], ['a'], [1.0])\n"
        "print('matplotlib' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=plots.__file__.rsplit("/tasks/", 1)[0])  # fmt: skip
    assert out.stdout.strip() == "False"
