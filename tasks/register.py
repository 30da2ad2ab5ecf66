"""Prefect task: log the self-contained model to the run, register it, maybe crown it champion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.events import emit_event

from tasks import mlflow_utils, registry
from tasks.common import retry_on_io_error

CHAMPION_EVENT = "cnnpipe.champion.moved"


def emit_champion_event(
    reg: registry.Registration, model_uri: str, run_id: str, test_accuracy: float
) -> None:
    """A Prefect event when `champion` moves, so an automation can deploy or notify (see
    infra/README.md). Resource: the registered model; payload: old and new version."""
    emit_event(
        event=CHAMPION_EVENT,
        resource={
            "prefect.resource.id": f"mlflow.registered-model.{reg.name}",
            "prefect.resource.name": reg.name,
        },
        related=[
            {"prefect.resource.id": f"mlflow.run.{run_id}", "prefect.resource.role": "run"},
        ],
        payload={
            "name": reg.name,
            "version": reg.version,
            "previous_version": reg.previous_champion,
            "model_uri": f"models:/{reg.name}/{reg.version}",
            "logged_model_uri": model_uri,
            "test_accuracy": test_accuracy,
            "reason": reg.reason,
        },
    )


@task(
    name="register-version",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io_error,
)
def register_version(
    output_dir: str,
    prepared_path: str,
    run_id: str,
    name: str,
    test_accuracy: float,
    tracking_uri: str | None = None,
    data_identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log best.pt as an `ImageClassifier` (uint8 images in, probabilities out) with a signature
    and a raw-image input example, register it as a version of `name` and move `champion` only
    if it was evaluated on the same data as the current one and beats it (`tasks.registry`).
    Idempotent: a retry reuses this run's model and version. Emits `cnnpipe.champion.moved`
    when the alias moves, so a Prefect automation can deploy or notify."""
    from cnn.data import split_arrays
    from cnn.export import from_checkpoint  # torchvision: imported while the job ran (pipeline)

    logger = get_run_logger()
    model = from_checkpoint(Path(output_dir) / "checkpoints" / "best.pt")
    images, _ = split_arrays(prepared_path, "test")
    example = images[:2].numpy()
    model_uri = mlflow_utils.log_model(run_id, model, example, uri=tracking_uri)
    identity = registry.DataIdentity.from_dict(data_identity) if data_identity else None
    reg = registry.register(
        model_uri,
        name=name,
        run_id=run_id,
        test_accuracy=test_accuracy,
        identity=identity,
        uri=tracking_uri,
    )
    result_path = Path(output_dir) / "result.json"
    result = json.loads(result_path.read_text()).get("test", {}) if result_path.exists() else {}
    mlflow_utils.log_model_metrics(
        run_id,
        model_uri,
        {"test_accuracy": test_accuracy, "test_top5": result.get("top5"),
         "test_loss": result.get("loss")},
        dataset=identity,
        uri=tracking_uri,
    )  # fmt: skip
    if reg.champion_moved:
        emit_champion_event(reg, model_uri, run_id, test_accuracy)
    tag = f"{reg.name}/{reg.version}"
    mlflow_utils.client(tracking_uri).set_tag(run_id, "registered_model", tag)
    logger.info(
        "registered %s version %s%s: %s",
        reg.name,
        reg.version,
        " (champion)" if reg.champion else "",
        reg.reason,
    )
    return {**reg.to_dict(), "model_uri": model_uri}
