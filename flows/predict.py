"""Registered models at work: `evaluate` (metrics of a model URI on a dataset split) and `predict`
(class names and probabilities for image files), as plain functions of one request each
(`EvaluateRequest`, `PredictRequest`), plus the Prefect flows `evaluate_model` ("evaluate-model")
/ `batch_predict` ("batch-predict") that take the same request.

Why both: `cnnpipe predict` on one image must not wait for Prefect (importing it and booting its
embedded API cost more than the prediction), so the CLI calls the plain functions unless a
Prefect server is configured (PREFECT_API_URL) or `--flow` is given. The flows are built on
first use (module `__getattr__`), so importing this module does not import Prefect.

Model URIs: anything MLflow resolves (`models:/NAME@champion`, `models:/NAME/3`,
`runs:/RUN_ID/model`, `models:/m-...`), or `torchvision:NAME` for a pretrained torchvision
ImageNet model (weights from `pretrained`, a local state-dict file, or the torch hub cache).
`models:/NAME@ALIAS` and `models:/NAME/VERSION` in the local SQLite store load from the
version's folder without importing MLflow (`mlflow_utils.load_local_model`: same files, same
numbers, seconds less); every other URI, and any doubt, goes through MLflow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TORCHVISION_SCHEME = "torchvision:"
SPLITS = ("train", "val", "test")
FLOWS = {"evaluate": "evaluate_model", "predict": "batch_predict"}  # plain function -> flow


def check_model_uri(model_uri: str, pretrained: str | None = None) -> None:
    """The URI's form (no import, no I/O), so a typo fails before anything loads."""
    if model_uri.startswith(TORCHVISION_SCHEME):
        return
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


def load_classifier(model_uri: str, pretrained: str | None = None) -> Any:
    """The self-contained `ImageClassifier` behind `model_uri` (ValueError naming a bad URI)."""
    check_model_uri(model_uri, pretrained)
    if model_uri.startswith(TORCHVISION_SCHEME):
        from cnn.export import from_torchvision

        return from_torchvision(model_uri.removeprefix(TORCHVISION_SCHEME), pretrained)
    from tasks import mlflow_utils

    # A registered version of the local SQLite store loads without importing MLflow (seconds
    # less for a one-image predict); anything else goes through MLflow with its checks.
    model = mlflow_utils.load_local_model(model_uri)
    if model is not None:
        return model
    mlflow_utils.check_tracking(create=False)
    return mlflow_utils.load_model(model_uri, local=False)


def load_images(paths: list[Path], channels: int) -> list[Any]:
    """Decode every image first, so a bad file fails the run before any prediction."""
    from cnn.export import load_image

    return [load_image(p, channels) for p in paths]


@dataclass(frozen=True)
class EvaluateRequest:
    """What `evaluate` (and the `evaluate-model` flow) takes."""

    model_uri: str
    dataset: str
    data_dir: str | None = None
    cache_dir: str | None = None
    split: str = "test"
    batch_size: int = 256


@dataclass(frozen=True)
class PredictRequest:
    """What `predict` (and the `batch-predict` flow) takes."""

    model_uri: str
    inputs: list[str]
    topk: int = 5
    pretrained: str | None = None


def evaluate(request: EvaluateRequest, model: Any = None) -> dict[str, Any]:
    """Accuracy and per-class accuracy of `model_uri` on a prepared dataset split, computed by
    the model itself from raw uint8 images (its own resize and normalization). `split` in the
    result is the true one: a folder without test/ has no test split to evaluate on. `model`:
    the classifier already loaded from `model_uri` (the CLI loads it first to fail early)."""
    from tasks.plan import check_dataset, split_available

    model_uri, dataset, split = request.model_uri, request.dataset, request.split
    data_dir, cache_dir = request.data_dir or "data", request.cache_dir
    if split not in SPLITS:
        raise ValueError(f"--split {split!r} is not valid; choose train, val or test")
    check_dataset(dataset, data_dir)
    split_available(dataset, data_dir, split)
    model = model if model is not None else load_classifier(model_uri)
    from cnn.data import prepare_dataset, split_arrays
    from tasks.evaluate import evaluate_split

    info = prepare_dataset(
        dataset,
        data_dir=data_dir,
        cache_dir=cache_dir,
        # The split must be the one the model was trained with: same holdout fraction and seed.
        resolution=model.info.get("resolution"),
        val_fraction=model.info.get("val_fraction") or 0.1,
        seed=model.info.get("seed") or 0,
        # The same store the model was trained from (tensor cache or shard store).
        storage=model.info.get("storage") or "auto",
        image_cap=model.info.get("image_cap"),
    )
    if split == "test" and info.test_is_val:
        raise ValueError(
            f"{dataset} at {data_dir} has no test split (its 'test' is the validation split); "
            "use --split val"
        )
    if list(info.classes) != list(model.classes):
        raise ValueError(
            f"{model_uri} was trained on classes {model.classes[:10]} but {dataset} at "
            f"{data_dir} has {info.classes[:10]}; evaluate it on the dataset it was trained on"
        )
    images, labels = split_arrays(info, split)
    metrics = evaluate_split(model, images, labels, batch_size=request.batch_size)
    return {
        "model_uri": model_uri,
        "dataset": dataset,
        "split": split,
        "metrics": {
            "accuracy": metrics["accuracy"],
            "per_class_accuracy": metrics["per_class_accuracy"],
            "top5": metrics["top5"],
            "loss": metrics["loss"],
            "num_samples": metrics["num_samples"],
        },
    }


def predict(request: PredictRequest, model: Any = None) -> list[dict[str, Any]]:
    """Top-k class names and probabilities for each image (files, or folders of images)."""
    from cnn.export import expand_image_paths

    topk = request.topk
    if topk < 1:
        raise ValueError(f"--topk {topk} must be >= 1")
    paths = expand_image_paths(request.inputs)
    if model is None:
        model = load_classifier(request.model_uri, request.pretrained)
    images = load_images(paths, model.in_channels)
    out = []
    for path, img in zip(paths, images, strict=True):
        (top,) = model.topk(img, k=topk)  # one at a time: images may differ in size
        out.append(
            {"path": str(path), "predictions": [{"label": l, "probability": p} for l, p in top]}
        )
    return out


@functools.cache
def _flows() -> dict[str, Callable[..., Any]]:
    """The Prefect flows, built on first use (importing Prefect costs seconds)."""
    from prefect import flow, get_run_logger
    from prefect.artifacts import create_table_artifact

    from tasks.evaluate import artifact_key

    @flow(name="evaluate-model")
    def evaluate_model(request: EvaluateRequest) -> dict[str, Any]:
        """`evaluate` as a flow, with the per-class table as a Prefect artifact."""
        result = evaluate(request)
        acc, where = result["metrics"]["accuracy"], f"{request.dataset}/{result['split']}"
        get_run_logger().info("%s on %s: accuracy %.4f", request.model_uri, where, acc)
        create_table_artifact(
            [{"class": c, "accuracy": a}
             for c, a in result["metrics"]["per_class_accuracy"].items()],
            key=artifact_key("evaluate", request.dataset, request.split),
            description=f"{request.model_uri} on {where}: accuracy {acc:.2%}",
        )  # fmt: skip
        return result

    @flow(name="batch-predict")
    def batch_predict(request: PredictRequest) -> list[dict[str, Any]]:
        """`predict` as a flow."""
        out = predict(request)
        get_run_logger().info("predicted %d image(s) with %s", len(out), request.model_uri)
        return out

    return {"evaluate_model": evaluate_model, "batch_predict": batch_predict}


def __getattr__(name: str) -> Any:
    if name in FLOWS.values():
        return _flows()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
