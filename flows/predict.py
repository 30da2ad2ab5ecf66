"""Prefect flows for registered models: `evaluate_model` (metrics of a model URI on a dataset
split) and `batch_predict` (class names and probabilities for image files).

Model URIs: anything MLflow resolves (`models:/NAME@champion`, `models:/NAME/3`,
`runs:/RUN_ID/model`, `models:/m-...`), or `torchvision:NAME` for a pretrained torchvision
ImageNet model (weights from `pretrained`, a local state-dict file, or the torch hub cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from cnn.export import ImageClassifier, expand_image_paths, from_torchvision, load_image
from tasks import mlflow_utils
from tasks.evaluate import artifact_key, evaluate_split

TORCHVISION_SCHEME = "torchvision:"


def load_classifier(model_uri: str, pretrained: str | None = None) -> ImageClassifier:
    """The self-contained classifier behind `model_uri` (ValueError naming a bad URI)."""
    if model_uri.startswith(TORCHVISION_SCHEME):
        return from_torchvision(model_uri.removeprefix(TORCHVISION_SCHEME), pretrained)
    if pretrained:
        raise ValueError(
            "--pretrained applies to torchvision:NAME model URIs only; an MLflow model carries "
            "its own weights"
        )
    if "://" not in model_uri and ":/" not in model_uri:
        raise ValueError(
            f"model URI {model_uri!r} is not a URI; use models:/NAME@champion, "
            "models:/NAME/VERSION, runs:/RUN_ID/model or torchvision:NAME"
        )
    mlflow_utils.check_tracking(create=False)
    return mlflow_utils.load_model(model_uri)


def load_images(paths: list[Path], channels: int) -> list[Any]:
    """Decode every image first, so a bad file fails the run before any prediction."""
    return [load_image(p, channels) for p in paths]


@flow(name="evaluate-model")
def evaluate_model(
    model_uri: str,
    dataset: str,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    split: str = "test",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Accuracy and per-class accuracy of `model_uri` on a prepared dataset split, computed by
    the model itself from raw uint8 images (its own resize and normalization)."""
    from cnn.data import load_prepared
    from tasks.plan import check_dataset
    from tasks.prepare import prepare_dataset

    logger = get_run_logger()
    if split not in ("train", "val", "test"):
        raise ValueError(f"split {split!r} is not valid; choose train, val or test")
    data_dir = data_dir or "data"
    check_dataset(dataset, data_dir)
    model = load_classifier(model_uri)
    info = prepare_dataset(
        dataset,
        data_dir,
        cache_dir,
        # The split must be the one the model was trained with: same holdout fraction and seed.
        resolution=model.info.get("resolution"),
        val_fraction=model.info.get("val_fraction") or 0.1,
        seed=model.info.get("seed") or 0,
    )
    if list(info.classes) != list(model.classes):
        raise ValueError(
            f"{model_uri} was trained on classes {model.classes[:10]} but {dataset} at "
            f"{data_dir} has {info.classes[:10]}; evaluate it on the dataset it was trained on"
        )
    images, labels = load_prepared(info.path).split(split)
    metrics = evaluate_split(model, images, labels, batch_size=batch_size)
    logger.info("%s on %s/%s: accuracy %.4f", model_uri, dataset, split, metrics["accuracy"])
    create_table_artifact(
        [{"class": c, "accuracy": a} for c, a in metrics["per_class_accuracy"].items()],
        key=artifact_key("evaluate", dataset, split),
        description=f"{model_uri} on {dataset}/{split}: accuracy {metrics['accuracy']:.2%}",
    )
    return {
        "model_uri": model_uri,
        "split": split,
        "metrics": {
            "accuracy": metrics["accuracy"],
            "per_class_accuracy": metrics["per_class_accuracy"],
            "top5": metrics["top5"],
            "loss": metrics["loss"],
            "num_samples": metrics["num_samples"],
        },
    }


@flow(name="batch-predict")
def batch_predict(
    model_uri: str, inputs: list[str], topk: int = 5, pretrained: str | None = None
) -> list[dict[str, Any]]:
    """Top-k class names and probabilities for each image (files, or folders of images)."""
    if topk < 1:
        raise ValueError(f"topk={topk} must be >= 1")
    paths = expand_image_paths(inputs)
    model = load_classifier(model_uri, pretrained)
    images = load_images(paths, model.in_channels)
    out = []
    for path, img in zip(paths, images, strict=True):
        (top,) = model.topk(img, k=topk)  # one at a time: images may differ in size
        out.append(
            {"path": str(path), "predictions": [{"label": l, "probability": p} for l, p in top]}
        )
    get_run_logger().info("predicted %d image(s) with %s", len(out), model_uri)
    return out
