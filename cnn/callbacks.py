"""Hooks the training loop calls at fixed points, so tests can inject faults without test code in
the loop itself.

`Callbacks` does nothing (the default). `FaultInjection` is what the tests install: in-process
through `train(cfg, callbacks=FaultInjection(...))`, and in `torchrun`/subprocess jobs (which
cannot be handed a Python object) through the ``CNNPIPE_TEST_*`` environment variables, which
`python -m cnn.train` turns into a `FaultInjection` with `FaultInjection.from_env()`:

- ``CNNPIPE_TEST_KILL_AT_STEP=S``: SIGKILL rank ``CNNPIPE_TEST_KILL_RANK`` (default 1) right after
  optimizer step S, on the first torchrun attempt only (so the restart can finish);
- ``CNNPIPE_TEST_NAN_AT_STEP=S``: the loss of global step S (0-based, counted before it) is NaN;
- ``CNNPIPE_TEST_TRACE_SAMPLES=DIR``: every training batch's sample indices are appended to
  ``DIR/rank<r>.jsonl`` (to count samples across a kill and resume).

(``CNNPIPE_TEST_KILL_IN_SAVE`` is checkpoint-level and lives in `cnn/checkpoint.py`.)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cnn.train import TrainState

ENV_PREFIX = "CNNPIPE_TEST_"


class Callbacks:
    """No-op hooks; subclass and override what you need. Every rank calls every hook."""

    def on_train_start(self, train_loader: Any, rank: int) -> None:
        """Once, after the loaders are built and before the first step."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch's loss before backward, with the global step it belongs to."""
        return loss

    def on_step_end(self, state: TrainState) -> None:
        """After each optimizer step (``state.step`` already counts it)."""


class FaultInjection(Callbacks):
    """Test faults: kill a rank after a step, a NaN loss at a step, a per-batch sample trace."""

    def __init__(
        self,
        *,
        kill_at_step: int | None = None,
        kill_rank: int = 1,
        nan_at_step: int | None = None,
        trace_dir: str | Path | None = None,
    ) -> None:
        self.kill_at_step, self.kill_rank = kill_at_step, kill_rank
        self.nan_at_step, self.trace_dir = nan_at_step, trace_dir
        self.rank = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FaultInjection | None:
        """The faults the ``CNNPIPE_TEST_*`` variables ask for, or None when none is set (empty
        values count as unset: a Prefect retry blanks them to disarm the faults)."""
        env = os.environ if environ is None else environ

        def get(name: str) -> int | None:
            value = env.get(ENV_PREFIX + name)
            return int(value) if value else None

        kill, nan = get("KILL_AT_STEP"), get("NAN_AT_STEP")
        trace = env.get(ENV_PREFIX + "TRACE_SAMPLES") or None
        if kill is None and nan is None and trace is None:
            return None
        first_attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        rank = get("KILL_RANK")
        return cls(
            kill_at_step=kill if first_attempt else None,
            kill_rank=1 if rank is None else rank,
            nan_at_step=nan,
            trace_dir=trace,
        )

    def on_train_start(self, train_loader: Any, rank: int) -> None:
        self.rank = rank
        if self.trace_dir is not None:
            _install_sample_trace(train_loader, Path(self.trace_dir), rank)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == self.nan_at_step else loss

    def on_step_end(self, state: TrainState) -> None:
        if state.step == self.kill_at_step and self.rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dies mid-epoch


def _install_sample_trace(loader: Any, directory: Path, rank: int) -> None:
    """Append ``{attempt, epoch, batch, idx}`` per training batch to ``DIR/rank<r>.jsonl``; the
    loader calls it as it yields, so the loop itself does nothing."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    path = directory / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def trace(i: int, idx: torch.Tensor) -> None:
        rec = {"attempt": attempt, "epoch": loader.plan.epoch, "batch": i, "idx": idx.tolist()}
        with open(path, "a") as f:  # an append-only test log, not a file anyone reads whole
            f.write(json.dumps(rec) + "\n")

    loader.trace = trace
