"""Prefect flows: `train_pipeline` (prepare -> train -> evaluate -> register, in one MLflow run)
and `compare_architectures` (several models on one dataset: a parent MLflow run, a child run per
model, a comparison table).

Thin on purpose: validation lives in `tasks.plan`, the work in the tasks. Every stage is timed,
so `cnnpipe train --json` can report where the pipeline's own overhead goes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.context import get_run_context
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from cnn.atomic import atomic_write
from tasks import gpu_limit, job_run, mlflow_utils, plots, registry
from tasks.common import imports_in_background
from tasks.evaluate import artifact_key, evaluate_run
from tasks.launch import JobSlots, LaunchSpec, kill_all_jobs, process_tags
from tasks.plan import plan_comparison, plan_training
from tasks.prepare import prepare_for
from tasks.register import register_version
from tasks.request import CompareRequest, TrainRequest
from tasks.train import train_model


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 3)


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    except Exception:
        return ""


def _failure_reason(exc: BaseException) -> str:
    """One line for the run's `failure_reason` tag (the job's own exception, or the signal)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    if isinstance(exc, SystemExit) or type(exc).__name__ == "TerminationSignal":
        code = getattr(exc, "code", None)
        if isinstance(code, int) and code > 128:  # the CLI's signal handler: 128 + signal
            with suppress(ValueError):
                return f"terminated ({signal.Signals(code - 128).name})"
        return f"terminated ({type(exc).__name__} {code or ''})".strip()
    text = " ".join(str(exc).split())[:500]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _end_failed_run(run_id: str, exc: BaseException, uri: str) -> None:
    """Mark the run FAILED (an error) or KILLED (cancel, interrupt) without masking `exc`,
    with the reason as the `failure_reason` tag."""
    with suppress(Exception):
        mlflow_utils.client(uri).set_tag(run_id, "failure_reason", _failure_reason(exc))
    with suppress(Exception):
        mlflow_utils.end_run(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED", uri=uri)


def _evaluate_and_register(
    train_out: dict[str, Any],
    info: Any,
    run_id: str,
    register_name: str | None,
    timings: dict[str, float],
    label: str,
    uri: str,
    identity: registry.DataIdentity | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    with _stage(timings, "evaluate"):
        metrics = evaluate_run(train_out, str(info.path), run_id, label=label, tracking_uri=uri)
    reg = None
    if register_name:
        with _stage(timings, "register"):
            reg = register_version(
                train_out["output_dir"],
                str(info.path),
                run_id,
                register_name,
                metrics["test_accuracy"],
                tracking_uri=uri,
                data_identity=identity.to_dict() if identity else None,
            )
    return metrics, reg


@contextmanager
def _training_log(output_dir: Path, flow_run_id: str) -> Iterator[None]:
    """Copy the training task's log (torchrun's output as streamed into Prefect) to
    `<output_dir>/train.log`, appended per attempt, so the MLflow run gets it as an artifact.
    Collected aside first: a job that fails before its first checkpoint leaves no folder."""
    import logging
    import tempfile

    class _ThisFlowsTraining(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return getattr(record, "task_name", "") == "train-model" and (
                not flow_run_id or getattr(record, "flow_run_id", None) == flow_run_id
            )

    fd, tmp = tempfile.mkstemp(prefix="cnnpipe-train-", suffix=".log")
    os.close(fd)
    handler = logging.FileHandler(tmp, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_ThisFlowsTraining())
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        with suppress(OSError):
            if output_dir.is_dir():  # this attempt's lines after the earlier ones, atomically
                log = output_dir / "train.log"
                before = log.read_bytes() if log.exists() else b""
                atomic_write(log, before + Path(tmp).read_bytes())
        with suppress(OSError):
            os.unlink(tmp)


def _gpus_used(cfg: Any, launch: LaunchSpec) -> int:
    """GPUs a training job takes on this host (0 on CPU)."""
    return launch.nproc_per_node if cfg.resolved_device() == "cuda" else 0


def _run_description(cfg: Any, identity: registry.DataIdentity) -> str:
    """The MLflow run's notes: what was trained on what, with which recipe."""
    weights = f", from {cfg.model.pretrained} weights" if cfg.model.pretrained else ""
    o = cfg.optim
    return (
        f"{cfg.model.name} on {identity.name} ({len(identity.classes)} classes{weights}); recipe "
        f"{cfg.run.recipe or 'default'}: {o.epochs} epochs, batch {o.batch_size}, lr {o.lr}, "
        f"{o.optimizer}/{cfg.schedule.name}; evaluated on {identity.eval_split}."
    )


def _tag_flow_run(*tags: str) -> None:
    """Add tags to this flow run (the UI filters on them); best effort."""
    from prefect.client.orchestration import get_client

    try:
        flow_run = get_run_context().flow_run  # type: ignore[union-attr]
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *tags}))
    except Exception as exc:  # noqa: BLE001 - cosmetic; never fail a training run on it
        get_run_logger().debug("could not tag the flow run: %s", exc)


def _record_run(
    run_id: str, info: Any, identity: registry.DataIdentity, uri: str, model: str
) -> None:
    """The dataset as the run's input, and a Prefect link artifact to the MLflow run."""
    mlflow_utils.log_dataset(run_id, info, identity, uri=uri)
    _tag_flow_run(f"model:{model}", f"dataset:{identity.name}")
    if _flow_run_id():
        create_link_artifact(
            mlflow_utils.run_url(run_id, uri),
            link_text=f"MLflow run {run_id[:8]}",
            key=artifact_key("mlflow-run", model, identity.name),
            description=f"MLflow run of this flow run ({uri})",
        )


# What evaluation (the exported model's sample grid) and registration import that planning and
# launching a job did not: loaded while the job runs (tasks.common.imports_in_background).
EVALUATE_IMPORTS = ("cnn.export",)  # and with it torchvision (~1.6 s)
REGISTER_IMPORTS = (
    "torch.export._trace",  # what torch.export.export imports on its first call (~0.7 s)
    "mlflow.pyfunc",
    "git",
)


def _train_task(request: TrainRequest | CompareRequest) -> Any:
    """The training task with the request's retries and timeout."""
    return train_model.with_options(
        retries=request.train_retries, timeout_seconds=request.train_timeout_seconds
    )


TRAIN_FLOW = "train-pipeline"


TRAIN_DEFAULTS = TrainRequest()


@flow(name=TRAIN_FLOW, flow_run_name="{request.model}-{request.dataset}")
def train_pipeline(request: TrainRequest = TRAIN_DEFAULTS) -> dict[str, Any]:
    """Prepare, train (torchrun), evaluate and register one model, all in ONE MLflow run whose
    id the training job logs into. Returns the `cnnpipe train --json` object."""
    started_at = time.time()
    timings: dict[str, float] = {}
    logger = get_run_logger()
    with _stage(timings, "validate"):  # from the plan's memo when the CLI planned it
        cfg, launch = plan_training(request)
    with _stage(timings, "tracking_check"):  # before any work: fail fast
        uri = mlflow_utils.check_tracking(request.tracking_uri, defer_new=True)
    with _stage(timings, "prepare"):
        info, cached = prepare_for(cfg)
    logger.info(
        "dataset %s: %s (%s)", request.dataset, info.path, "cache hit" if cached else "prepared"
    )
    identity = registry.data_identity(info, cfg.source.data_dir)
    flow_run_id = _flow_run_id()
    with _stage(timings, "mlflow_run"):
        mlflow_utils.create_deferred_store(uri)  # now, not before prepare
        # A retried or rescheduled flow run keeps its id: continue its MLflow run and output
        # directory, so the job resumes from its checkpoint (refused if the config changed).
        previous = mlflow_utils.find_flow_run_run(
            flow_run_id, TRAIN_FLOW, experiment=request.experiment, uri=uri
        )
        if previous is not None:
            run_id = mlflow_utils.reopen_run(
                previous, cfg.config_hash(), tags=process_tags(), uri=uri
            )
            logger.info("flow run %s: continuing MLflow run %s", flow_run_id, run_id)
        else:
            tags = {
                "model": cfg.model.name,
                "dataset": info.dataset,
                "dataset.source_hash": info.source_hash,
                "dataset.cache": str(info.path),
                mlflow_utils.FLOW_RUN_TAG: flow_run_id,
                mlflow_utils.FLOW_TAG: TRAIN_FLOW,
                mlflow_utils.CONFIG_HASH_TAG: cfg.config_hash(),
                **process_tags(),  # so a later cnnpipe can close it if this process dies
            }

            def start(**extra: str) -> str:
                return mlflow_utils.start_run(
                    f"{cfg.model.name}-{identity.name}",
                    experiment=request.experiment,
                    uri=uri,
                    description=_run_description(cfg, identity),
                    tags={**tags, **extra},
                )

            if launch.standalone:
                run_id, created = start(), True
            else:  # every node of the job agrees on one run (see tasks/job_run.py)
                key = job_run.job_key(launch.rdzv_endpoint, launch.rdzv_id, cfg.config_hash())
                run_id, created = job_run.join_or_start(
                    mlflow_utils.client(uri),
                    mlflow_utils.get_or_create_experiment(request.experiment, uri),
                    key,
                    lambda: start(**{job_run.JOB_KEY_TAG: key}),
                )
                logger.info("multi-node job %s: MLflow run %s", key, run_id)
            if created:
                _record_run(run_id, info, identity, uri, cfg.model.name)
    try:
        out = (
            request.output_dir
            or (previous.data.tags.get("output_dir") if previous is not None else None)
            or str(Path("runs") / f"{cfg.model.name}-{info.dataset}-{run_id[:8]}")
        )
        cfg = cfg.replace(
            output_dir=str(Path(out).resolve()), mlflow_run_id=run_id, mlflow_tracking_uri=uri
        )
        mlflow_utils.client(uri).set_tag(run_id, "output_dir", cfg.run.output_dir)
        # Host-wide GPU slots (Prefect global concurrency limit): another flow run on this
        # machine waits here instead of oversubscribing the GPUs.
        with (
            _stage(timings, "train"),
            gpu_limit.host_gpus(_gpus_used(cfg, launch)),
            _training_log(Path(cfg.run.output_dir), flow_run_id),
            imports_in_background(
                EVALUATE_IMPORTS + (REGISTER_IMPORTS if request.to_registry else ())
            ),
        ):
            train_out = _train_task(request)(cfg, launch)
        timings["train_job"] = round(train_out["job_seconds"], 3)
        if not train_out["result"]:  # a non-main node: rank 0's node evaluates and ends the run
            return {"run_id": run_id, "output_dir": out, "node_rank": request.node_rank,
                    "rank0": False, "timings": timings, "started_at": started_at}  # fmt: skip
        if not launch.standalone:  # this node hosted global rank 0: it owns the run from here
            from mlflow.entities import RunTag

            owner = [RunTag(k, v) for k, v in process_tags().items()]
            mlflow_utils.client(uri).log_batch(run_id, tags=owner)
        with suppress(Exception):  # run.yaml/result.json as artifacts: nice to have
            mlflow_utils.log_run_files(run_id, cfg.run.output_dir, uri=uri)
        name = registry.registered_name(
            cfg.model.name, identity, request.register_as, mlflow_utils.client(uri)
        )
        metrics, reg = _evaluate_and_register(
            train_out, info, run_id, name if request.to_registry else None, timings, name, uri,
            identity,
        )  # fmt: skip
        mlflow_utils.end_run(run_id, uri=uri)
    except BaseException as exc:
        _end_failed_run(run_id, exc, uri)
        raise
    result = train_out["result"]
    return {
        "run_id": run_id,
        "model_name": reg["name"] if reg else None,
        "model_version": reg["version"] if reg else None,
        "champion": bool(reg and reg["champion"]),
        "metrics": {
            "test_accuracy": metrics["test_accuracy"],
            "val_accuracy": metrics["val_accuracy"],
            "per_class_accuracy": metrics["per_class_accuracy"],
            "test_top5": metrics["test_top5"],
            "split": metrics["split"],
        },
        "timings": timings,
        "images_per_s": result["images_per_s"],
        "champion_reason": reg["reason"] if reg else None,
        "model_uri": reg["model_uri"] if reg else None,
        "output_dir": cfg.run.output_dir,
        "tracking_uri": uri,
        "epochs_completed": result["epochs_completed"],
        "resumed_from": result.get("resumed_from"),
        "started_at": started_at,
    }


# -------------------------------------------------------------------- comparison


COMPARISON_COLUMNS = (
    "model",
    "params",
    "best_val_accuracy",
    "test_accuracy",
    "test_top5",
    "train_seconds",
    "images_per_s",
    "epochs",
    "status",
    "run_id",
)


def _markdown_table(rows: list[dict[str, Any]], dataset: str, split: str = "test") -> str:
    """`split`: the split the accuracy column was measured on ("val" when the data has no
    test split, so the label is true)."""

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.2%}"

    lines = [
        f"### Architectures on {dataset} (best {split} accuracy first)",
        "",
        f"| model | params | best val acc | {split} acc | top-5 | train s | images/s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        params = "-" if not r.get("params") else f"{r['params'] / 1e6:.2f} M"
        secs = "-" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}"
        ips = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}"
        lines.append(
            f"| {r['model']} | {params} | {pct(r.get('best_val_accuracy'))} | "
            f"{pct(r.get('test_accuracy'))} | {pct(r.get('test_top5'))} | {secs} | {ips} | "
            f"{r['status']} |"
        )
    return "\n".join(lines)


COMPARE_DEFAULTS = CompareRequest()


@flow(
    name="compare-architectures",
    flow_run_name="compare-{request.dataset}",
    task_runner=ThreadPoolTaskRunner(max_workers=16),
)
def compare_architectures(request: CompareRequest = COMPARE_DEFAULTS) -> dict[str, Any]:
    """Train several architectures on one dataset: one parent MLflow run, a child run per
    model, at most `max_concurrent` jobs at once (default: one per GPU, or 1 on CPU), and a
    comparison table (MLflow table + figure, Prefect artifacts, returned as JSON)."""
    t0 = time.perf_counter()
    logger = get_run_logger()
    plans = plan_comparison(request)  # from the plan's memo when the CLI planned it
    names = list(request.models)
    recipe, nproc_per_node = request.recipe, request.nproc_per_node
    uri = mlflow_utils.check_tracking(request.tracking_uri, defer_new=True)
    info, _ = prepare_for(plans[0][0])
    mlflow_utils.create_deferred_store(uri)  # now, not before prepare
    slots = JobSlots.for_host(request.max_concurrent, gpus_per_job=nproc_per_node)
    first_cfg = plans[0][0]
    parent = mlflow_utils.start_run(
        f"compare-{info.dataset}",
        experiment=request.experiment,
        uri=uri,
        description=(
            f"Comparison of {', '.join(names)} on {info.dataset}, {first_cfg.optim.epochs} epochs "
            f"each (recipe {recipe or 'per model'}); one child run per model."
        ),
        params={
            "models": ",".join(names),
            "dataset": info.dataset,
            "epochs": first_cfg.optim.epochs,
            "recipe": recipe or "per-model",
            "batch_size": request.batch_size,
            "lr": request.lr,
            "device": request.device,
            "nproc_per_node": nproc_per_node,
            "max_concurrent": request.max_concurrent,
        },
        tags={
            "dataset": info.dataset,
            "models": ",".join(names),
            "prefect.flow_run_id": _flow_run_id(),
            **process_tags(),
        },
    )
    logger.info("comparing %s on %s, %d job(s) at a time", names, info.dataset, slots.max_jobs)
    default_base = Path("runs") / f"compare-{info.dataset}-{parent[:8]}"
    base = Path(request.output_dir or default_base).resolve()
    rows: dict[str, dict[str, Any]] = {}
    futures: dict[Any, Any] = {}
    children: dict[str, str] = {}
    hold = ExitStack()  # host-wide GPU slots for the jobs this flow runs at once
    try:
        gpus = min(len(plans), slots.max_jobs) * max(_gpus_used(c, lc) for c, lc in plans)
        hold.enter_context(gpu_limit.host_gpus(gpus))
        # What the first evaluation needs loads while the jobs start (joined after the submits,
        # while the jobs run), as in the single-model flow.
        background = EVALUATE_IMPORTS + (REGISTER_IMPORTS if request.to_registry else ())
        with imports_in_background(background):
            for cfg, launch in plans:
                child = mlflow_utils.start_run(
                    f"{cfg.model.name}-{info.dataset}",
                    experiment=request.experiment,
                    uri=uri,
                    parent_run_id=parent,
                    tags={
                        "model": cfg.model.name,
                        "dataset": info.dataset,
                        "config_hash": cfg.config_hash(),
                        **process_tags(),
                    },
                )
                cfg = cfg.replace(
                    output_dir=str(base / cfg.model.name),
                    mlflow_run_id=child,
                    mlflow_tracking_uri=uri,
                )
                fut = _train_task(request).submit(cfg, launch, slots)
                futures[fut] = cfg
                children[cfg.model.name] = child
                rows[cfg.model.name] = {
                    "model": cfg.model.name,
                    "run_id": child,
                    "status": "running",
                }
        for fut in as_completed(list(futures)):
            cfg = futures[fut]
            row, child = rows[cfg.model.name], children[cfg.model.name]
            try:
                train_out = fut.result()
                timings: dict[str, float] = {}
                identity = registry.data_identity(info, cfg.source.data_dir)
                name = (
                    registry.registered_name(
                        cfg.model.name, identity, None, mlflow_utils.client(uri)
                    )
                    if request.to_registry
                    else None
                )
                label = f"{cfg.model.name}-{identity.name}"
                metrics, reg = _evaluate_and_register(
                    train_out, info, child, name, timings, label, uri, identity
                )
                result = train_out["result"]
                row.update(
                    params=metrics.get("params") or result.get("params"),
                    best_val_accuracy=result["best_val_accuracy"],
                    test_accuracy=metrics["test_accuracy"],
                    test_top5=metrics["test_top5"],
                    train_seconds=result["train_seconds"],
                    images_per_s=result["images_per_s"],
                    epochs=result["epochs_completed"],
                    status="ok" if not reg else f"ok, v{reg['version']}",
                )
                mlflow_utils.end_run(child, uri=uri)
            except Exception as exc:  # one model failing must not hide the others' results
                logger.error("%s failed: %s", cfg.model.name, exc)
                row["status"] = f"failed: {str(exc).splitlines()[0][:120]}"
                _end_failed_run(child, exc, uri)
        hold.close()  # training is over: release the GPU slots before publishing
        table = sorted(rows.values(), key=lambda r: -(r.get("test_accuracy") or -1.0))
        table = [{k: r.get(k) for k in COMPARISON_COLUMNS} for r in table]
        split = "val" if info.test_is_val else "test"
        _publish_comparison(parent, table, info.dataset, uri, split)
        failed = [r["model"] for r in table if not str(r["status"]).startswith("ok")]
        mlflow_utils.end_run(parent, "FAILED" if failed else "FINISHED", uri=uri)
    except BaseException as exc:
        if not isinstance(exc, Exception):  # a signal (Prefect's TerminationSignal, Ctrl-C):
            kill_all_jobs(4.0, stop=True)  # stop the running jobs, start no further model
        hold.close()
        for model, child in children.items():
            if rows[model]["status"] == "running":
                _end_failed_run(child, exc, uri)
        _end_failed_run(parent, exc, uri)
        raise
    if failed:
        raise RuntimeError(f"models failed: {', '.join(failed)} (see the comparison table)")
    return {
        "parent_run_id": parent,
        "dataset": info.dataset,
        "rows": table,
        "best_model": table[0]["model"] if table else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "split": "val" if info.test_is_val else "test",
    }


def _publish_comparison(
    parent: str, table: list[dict[str, Any]], dataset: str, uri: str, split: str = "test"
) -> None:
    c = mlflow_utils.client(uri)
    c.log_table(parent, data={k: [r[k] for r in table] for k in COMPARISON_COLUMNS},
                artifact_file="comparison.json")  # fmt: skip
    c.log_figure(parent, plots.comparison_figure(table), "comparison.png")
    c.log_text(parent, _markdown_table(table, dataset, split), "comparison.md")
    mlflow_utils.log_metrics(
        parent,
        {f"{r['model']}.test_accuracy": r["test_accuracy"] for r in table}
        | {f"{r['model']}.images_per_s": r["images_per_s"] for r in table},
        uri=uri,
    )
    create_table_artifact(table, key=artifact_key("comparison", dataset),
                          description=f"architectures on {dataset}")  # fmt: skip
    create_markdown_artifact(
        _markdown_table(table, dataset, split), key=artifact_key("comparison-md", dataset)
    )
