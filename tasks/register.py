"""Prefect task: log the self-contained model to the run, register it, maybe crown it champion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from cnn.data import load_prepared
from cnn.export import from_checkpoint
from tasks import mlflow_utils, registry
from tasks.common import retry_on_io_error


@task(
    name="register-model",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io_error,
)
def register_model(
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
    logger = get_run_logger()
    model = from_checkpoint(Path(output_dir) / "checkpoints" / "best.pt")
    images, _ = load_prepared(prepared_path).split("test")
    example = images[:2].numpy()
    model_uri = mlflow_utils.log_model(run_id, model, example, uri=tracking_uri)
    identity = registry.DataIdentity.from_dict(data_identity) if data_identity else None
    reg = mlflow_utils.register_version(
        model_uri,
        name=name,
        run_id=run_id,
        test_accuracy=test_accuracy,
        identity=identity,
        uri=tracking_uri,
    )
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
