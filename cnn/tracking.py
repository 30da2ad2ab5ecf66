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
        if not self.run_id:
            return
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
        """Stop the system-metrics thread and flush what it sampled."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:  # at exit: a failure here must not fail the finished job
            with contextlib.suppress(Exception):
                monitor.finish()

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

        existing = self.client.get_run(self.run_id).data.params  # type: ignore[union-attr]
        flat = flatten({k: v for k, v in params.items() if v is not None})  # no "None" noise
        new = [Param(k, v[:6000]) for k, v in flat.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow's per-batch param limit
            self.client.log_batch(self.run_id, params=new[i : i + 100])  # type: ignore[union-attr]

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        """Log finite metrics at `step`, skipping any (key, step) this run already has."""
        if not self.active:
            return
        Metric = _mlflow("entities").Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if value is None or value != value or step in self._steps(key):  # None/NaN/dup
                continue
            batch.append(Metric(key, float(value), now, step))
            self._logged[key].add(step)
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)  # type: ignore[union-attr]

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))  # type: ignore[union-attr]
