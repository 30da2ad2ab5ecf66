"""Prefect task: test-split metrics of the best checkpoint, as MLflow figures/tables and Prefect
artifacts. The numbers come from the training job (exact under DDP, on its devices, from
checkpoints/best.pt); this task renders them and runs the self-contained exported model on a grid
of raw test images, which also checks that the model MLflow will hold predicts correctly."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from cnn.export import ImageClassifier


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100] or "artifact"


def metric_name(text: str) -> str:
    """An MLflow-safe metric name piece (class names may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]+", "_", text)


def evaluate_split(
    model: ImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of a self-contained classifier on uint8 images: the engine's exact evaluation
    (`cnn.evaluate.evaluate`) fed raw batches, with the model's own preprocessing."""
    from cnn.evaluate import evaluate

    previous, model.output = model.output, "logits"
    try:
        batches = (
            (images[i : i + batch_size], labels[i : i + batch_size])
            for i in range(0, len(labels), batch_size)
        )
        result = evaluate(model, batches, model.num_classes, device=model.mean.device)
    finally:
        model.output = previous
    return result.to_dict(model.classes)


def sample_indices(n_total: int, n: int) -> list[int]:
    """Evenly spread, deterministic picks (the first images are often all one class)."""
    n = min(n, n_total)
    return [int(i * n_total / n) for i in range(n)] if n else []


def _per_class_rows(
    classes: list[str], per_class: dict[str, float | None], matrix: list[list[int]]
) -> list[dict[str, Any]]:
    return [
        {
            "class": c,
            "accuracy": None if per_class.get(c) is None else round(float(per_class[c]), 4),
            "images": int(sum(matrix[k])) if k < len(matrix) else 0,
        }
        for k, c in enumerate(classes)
    ]


def log_evaluation(
    train_out: dict[str, Any],
    prepared_path: str,
    run_id: str | None,
    label: str | None = None,
    n_samples: int = 16,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Log the confusion matrix, the per-class table and a sample-prediction grid to the MLflow
    run; publish Prefect table + markdown artifacts (keyed by `label`, e.g. lenet5-cifar10, so
    each model's latest evaluation sits under one key); return the metrics."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from cnn.data import split_arrays
    from cnn.export import from_checkpoint
    from tasks import mlflow_utils, plots

    logger = get_run_logger()
    result = train_out["result"]
    classes, test = list(result["classes"]), result["test"]
    split = "val" if result.get("test_is_val") else "test"
    per_class = {c: test["per_class_accuracy"].get(c) for c in classes}
    rows = _per_class_rows(classes, per_class, test["confusion_matrix"])

    # Sample grid: the exported model on raw uint8 test images (what MLflow will serve).
    model = from_checkpoint(Path(train_out["output_dir"]) / "checkpoints" / "best.pt")
    images, labels = split_arrays(prepared_path, "test")
    idx = sample_indices(len(labels), n_samples)
    top = model.topk(images[idx], k=1)
    predicted = [t[0][0] for t in top]
    true = [classes[int(labels[i])] for i in idx]
    grid = plots.sample_grid(images[idx], true, predicted, [t[0][1] for t in top])
    right = sum(p == t for p, t in zip(predicted, true, strict=True))

    name = label or Path(train_out["output_dir"]).name
    if run_id:
        c = mlflow_utils.client(tracking_uri)
        c.log_image(run_id, plots.confusion_image(classes, test["confusion_matrix"]),
                    artifact_file="evaluation/confusion_matrix.png")  # fmt: skip
        c.log_image(run_id, grid, artifact_file="evaluation/sample_predictions.png")
        c.log_table(
            run_id,
            data={k: [r[k] for r in rows] for k in ("class", "accuracy", "images")},
            artifact_file="evaluation/per_class_accuracy.json",
        )
        mlflow_utils.log_metrics(
            run_id,
            {f"{split}_accuracy/{metric_name(c)}": a for c, a in per_class.items()}
            | {"sample_grid_accuracy": right / max(len(idx), 1)},
            uri=tracking_uri,
        )
    create_table_artifact(
        rows, key=artifact_key(name, "per-class"), description=f"per-class {split} accuracy"
    )
    top5 = test.get("top5")
    md = [
        f"### {name}: {split} accuracy {test['accuracy']:.2%}",
        "",
        f"- best validation accuracy: {result['best_val_accuracy']:.2%} "
        f"(epoch {result['best_epoch']})",
        f"- {split} top-5: {top5:.2%}"
        if top5 is not None
        else f"- {split} loss: {test['loss']:.4f}",
        f"- training: {result['train_seconds']:.1f} s, {result['images_per_s']:.0f} images/s",
        f"- samples in the grid predicted right: {right}/{len(idx)}",
    ]
    create_markdown_artifact("\n".join(md), key=artifact_key(name, "summary"))
    logger.info("%s accuracy %.4f (%d images)", split, test["accuracy"], test.get("num_samples", 0))
    return {
        "split": split,
        "test_accuracy": float(test["accuracy"]),
        "test_top5": top5,
        "val_accuracy": float(result["best_val_accuracy"]),
        "per_class_accuracy": per_class,
        "params": sum(p.numel() for p in model.model.parameters()),
    }


@functools.cache
def _task() -> Any:
    """The Prefect task `evaluate_run` ("evaluate-run"; the flow that evaluates a registered
    model is `flows.predict.evaluate_model`) around `log_evaluation`, built on first use:
    importing this module (for `evaluate_split`) must not import Prefect."""
    from prefect import task
    from prefect.cache_policies import NONE

    from tasks.common import retry_on_io_error

    return task(
        name="evaluate-run",
        cache_policy=NONE,
        retries=2,
        retry_delay_seconds=2,
        retry_condition_fn=retry_on_io_error,
    )(log_evaluation)


def __getattr__(name: str) -> Any:
    if name == "evaluate_run":
        return _task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
