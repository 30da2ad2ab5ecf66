"""Prefect task: run the training engine under torchrun as a child process tree."""

from __future__ import annotations

import json
import os
import shlex
import time
import uuid
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

import cnn
from cnn.config import TrainConfig
from cnn.dist import NODE_TOKEN_ENV
from tasks.launch import (
    JobCancelledError,
    JobSlots,
    LaunchSpec,
    TrainingJobError,
    build_torchrun_command,
    run_job,
    stopping,
)

_PROJECT_ROOT = str(Path(cnn.__file__).resolve().parents[1])


def retry_crashes_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a job that crashed (a signal, a lost node, an I/O
    error), never one that raised a deterministic error (bad value, missing file, non-finite
    loss: the retry would fail the same way, minutes later), nor after a stop signal."""
    if stopping():
        return False
    try:
        state.result()
    except TrainingJobError as exc:
        return not exc.deterministic
    except BaseException:  # noqa: BLE001 - anything else: an I/O or crash, retry
        return True
    return False


def _remove_if_empty_run(out: Path, created: list[Path]) -> None:
    """A job that failed before its first checkpoint leaves nothing worth keeping: remove
    run.yaml and the folders this task created (never a folder that existed before)."""
    ckpt = out / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return  # a resume point: keep it for the retry / the user
    (out / "run.yaml").unlink(missing_ok=True)
    for d in [ckpt, *created]:  # innermost first
        with suppress(OSError):
            d.rmdir()  # only when empty


@task(
    name="train-model",
    cache_policy=NONE,
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_crashes_only,
)
def train_model(
    cfg: TrainConfig, launch: LaunchSpec, slots: JobSlots | None = None
) -> dict[str, Any]:
    """Write run.yaml, launch `torchrun ... -m cnn.train --config run.yaml`, stream its output
    into the flow's log and return result.json plus the job's wall time.

    A Prefect retry reruns this with the same output dir and MLflow run id, so the engine
    resumes from checkpoints/last.pt and keeps logging into the same run."""
    logger = get_run_logger()
    if stopping():  # a signal arrived: no further job starts (compare's next model)
        raise JobCancelledError(f"{cfg.model.name}: not started, this process is stopping")
    out = Path(cfg.run.output_dir)
    created = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    config_path = cfg.to_yaml(out / "run.yaml")
    (out / "result.json").unlink(missing_ok=True)  # never report a stale result
    cmd = build_torchrun_command(config_path, launch)
    wants_gpu = cfg.resolved_device() == "cuda" and launch.standalone
    slot = slots.acquire(launch.nproc_per_node if wants_gpu else 0) if slots else nullcontext([])
    with slot as gpus:
        if stopping():  # the signal came while this job waited for its slot
            _remove_if_empty_run(out, created)
            raise JobCancelledError(f"{cfg.model.name}: not started, this process is stopping")
        # The job imports `cnn` from this checkout even when the package is not installed.
        env = {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [_PROJECT_ROOT, os.environ.get("PYTHONPATH")])
            )
        }
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        if not launch.standalone:  # rank 0 writes it into result.json: "was rank 0 here?"
            env[NODE_TOKEN_ENV] = node_token = uuid.uuid4().hex
        if task_run.run_count > 1:
            # Fault injection (CNNPIPE_TEST_*, see cnn/callbacks.py) hits the first attempt only,
            # as the engine's hook does across torchrun restarts, so a retry can succeed.
            env.update({k: "" for k in os.environ if k.startswith("CNNPIPE_TEST_")})
            logger.info("attempt %d: resuming from %s", task_run.run_count, out / "checkpoints")
        logger.info("launching %s%s", shlex.join(cmd), f" on GPUs {','.join(gpus)}" if gpus else "")
        t0 = time.perf_counter()
        try:
            run_job(cmd, on_line=logger.info, env=env)
        except BaseException:
            _remove_if_empty_run(out, created)
            raise
        job_seconds = time.perf_counter() - t0
    result_path = out / "result.json"
    if launch.standalone:
        result = json.loads(result_path.read_text())
    else:
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if not launch.standalone and result.get("node_token") != node_token:
        # Multi-node: global rank 0 ran on another node (its result.json, if this node sees one
        # on a shared output directory, carries that node's token).
        logger.info("global rank 0 ran on another node: its flow evaluates and registers")
        return {"output_dir": str(out), "result": {}, "job_seconds": job_seconds, "command": cmd}
    return {"output_dir": str(out), "result": result, "job_seconds": job_seconds, "command": cmd}
