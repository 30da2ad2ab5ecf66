"""The engine's only door to MLflow: lazy import, main rank only, no-op without a run id.

The engine must run on a GPU host without mlflow, so nothing here imports it unless a run id was
given. The flow creates the run and hands its id over; we log into that run and never end it. A
restarted job logs into the same run, skipping metric steps that are already there, so a crash
between "log epoch E" and "checkpoint epoch E" never produces duplicate points.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import time
from pathlib import Path
from typing import Any


def _mlflow(module: str) -> Any:
    """Load `mlflow.<module>` on first use: the engine's GPU hosts may not have mlflow."""
    return importlib.import_module(f"mlflow.{module}")


def tracking_uri(configured: str | None = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd (where
    `mlflow ui` started in the same folder finds it)."""
    return (
        configured
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(Path.cwd() / 'mlflow.db').as_posix()}"
    )


def sqlite_database(uri: str) -> str | None:
    """The database file named by a ``sqlite:`` tracking URI, without query parameters: ""
    when it names none (``sqlite://``, an in-memory store, like ``:memory:``); None for any
    other kind of store. The one parser of these URIs (plan checks, store probes)."""
    if not uri.startswith("sqlite:"):
        return None
    return uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b": "value"} strings (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = "None" if value is None else str(value)
    return out


SYSTEM_METRICS_SECONDS = 5.0  # sampling interval of CPU/memory/GPU metrics


def _system_metrics_enabled() -> bool:
    """On unless MLflow's own switch says no (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false)."""
    flag = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    return flag.strip().lower() not in ("0", "false", "no", "off")


class Tracker:
    """Logs params and per-epoch metrics to one existing MLflow run, from the main rank only,
    and samples system metrics (CPU, memory, disk, network; GPU utilisation and memory when
    there is one, via nvidia-ml-py) into the same run while the job lives."""

    def __init__(self, run_id: str | None, uri: str | None = None, is_main: bool = True) -> None:
        self.run_id = run_id if is_main else None
        self.client = None
        self.monitor: Any = None
        self._logged: dict[str, set[int]] = {}
        self.failures: list[str] = []  # logging calls that failed or were skipped
        self.offline = False  # set at the first failure: later calls are skipped, not retried
        if not self.run_id:
            return
        if tracking_uri(uri).startswith(("http://", "https://")):
            # A tracking server that goes away must not stall training for minutes of HTTP
            # retries per call (MLflow's defaults); explicit settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = _mlflow("tracking").MlflowClient(tracking_uri=tracking_uri(uri))
        self.client.get_run(self.run_id)  # fail fast with MLflow's message if the id is wrong
        if _system_metrics_enabled():
            self._start_system_metrics(tracking_uri(uri))

    def _start_system_metrics(self, uri: str) -> None:
        """MLflow's monitor thread, logging `system/*` into this run; a restarted job continues
        its steps. Stopped (and flushed) at interpreter exit. Never fatal: needs psutil."""
        try:
            monitor_cls = _mlflow("system_metrics.system_metrics_monitor").SystemMetricsMonitor
            self.monitor = monitor_cls(
                self.run_id,
                sampling_interval=SYSTEM_METRICS_SECONDS,
                resume_logging=True,
                tracking_uri=uri,
            )
            self.monitor.start()
        except Exception as exc:  # e.g. psutil missing: training matters more than the graphs
            print(f"note: system metrics are off ({type(exc).__name__}: {exc})", flush=True)
            self.monitor = None
            return
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the system-metrics thread and flush what it sampled; report failed logging."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:  # at exit: a failure here must not fail the finished job
            with contextlib.suppress(Exception):
                monitor.finish()
                # MLflow's monitor logs only after a full sampling interval, so a job (or a
                # resumed attempt) shorter than that would show no system metrics at all; one
                # closing sample makes every attempt visible in the run's charts.
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        if self.failures:
            print(self.failure_report(), flush=True)
            self.failures = []

    def failure_report(self) -> str:
        """Which logging calls failed, and how to re-attach the job's results to the run."""
        shown = "; ".join(self.failures[:5]) + (
            f"; ... {len(self.failures) - 5} more" if len(self.failures) > 5 else ""
        )
        return (
            f"MLflow logging to run {self.run_id} failed for {len(self.failures)} call(s): "
            f"{shown}. Training went on; the checkpoints and result.json are kept. To re-attach, "
            f"bring the tracking server back and rerun the same job (its run.yaml keeps "
            f"mlflow_run_id={self.run_id}): it resumes from checkpoints/last.pt and logs the "
            "missing epochs into the same run, without duplicates."
        )

    def _guard(self, what: str, call: Any) -> None:
        """Run one logging call; the first failure switches logging off for this job (the
        server is gone: waiting on it every epoch would stall training) and is reported."""
        if self.offline:
            self.failures.append(f"{what} (skipped)")
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any client/network error: keep training
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            self.failures.append(f"{what} ({type(exc).__name__}: {first})")
            self.offline = True
            print(
                f"warning: MLflow logging to run {self.run_id} failed ({what}: "
                f"{type(exc).__name__}); training continues, further logging is skipped",
                flush=True,
            )
            if not self.monitor:
                atexit.register(self.close)

    @property
    def active(self) -> bool:
        return self.client is not None

    def _steps(self, key: str) -> set[int]:
        """Steps already logged for `key` (asked once per key; then tracked locally)."""
        if key not in self._logged:
            history = self.client.get_metric_history(self.run_id, key)  # type: ignore[union-attr]
            self._logged[key] = {m.step for m in history}
        return self._logged[key]

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the flattened config; params already present (a restarted job) are left alone,
        since MLflow refuses to change a logged param."""
        if not self.active:
            return
        Param = _mlflow("entities").Param

        def call() -> None:
            existing = self.client.get_run(self.run_id).data.params  # type: ignore[union-attr]
            flat = flatten({k: v for k, v in params.items() if v is not None})  # no "None"
            new = [Param(k, v[:6000]) for k, v in flat.items() if k not in existing]
            for i in range(0, len(new), 100):  # MLflow's per-batch param limit
                self.client.log_batch(self.run_id, params=new[i : i + 100])  # type: ignore[union-attr]

        self._guard("log_params", call)

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        """Log finite metrics at `step`, skipping any (key, step) this run already has."""
        if not self.active:
            return
        Metric = _mlflow("entities").Metric

        def call() -> None:
            now = int(time.time() * 1000)
            batch, added = [], []
            for key, value in metrics.items():
                if value is None or value != value or step in self._steps(key):  # None/NaN/dup
                    continue
                batch.append(Metric(key, float(value), now, step))
                added.append(key)
            if batch:
                self.client.log_batch(self.run_id, metrics=batch)  # type: ignore[union-attr]
            for key in added:  # only once it is stored: a failed batch is re-logged on resume
                self._logged[key].add(step)

        self._guard(f"log_metrics step {step}", call)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return

        def call() -> None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))  # type: ignore[union-attr]

        self._guard("set_tags", call)
