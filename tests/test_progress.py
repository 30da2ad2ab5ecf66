"""Progress lines during training (issue 10 item 6): at least every `progress_seconds` (30 s by
default) with images done, img/s and ETAs for the epoch and the run, from rank 0 only, next to
the per-epoch lines. A VGG epoch on a CPU must not be silent for minutes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from test_train import (
    STEPS_PER_EPOCH,
    run,
    tiny_config,
    tiny_data_fixture,  # noqa: F401  (the `tiny_data` fixture)
    torch_globals_fixture,  # noqa: F401  (the `torch_globals` fixture)
    write_config,
)

from cnn.config import TrainConfig
from cnn.train import Progress, train

LINE = re.compile(
    r"^  progress epoch (\d+)/(\d+) step (\d+)/(\d+) images (\d+)/(\d+) \(\d+%\) (\d+) img/s "
    r"loss [\d.]+ lr [\d.e-]+ eta epoch (\d+:\d\d:\d\d) run (\d+:\d\d:\d\d)$"
)


class Clock:
    """A settable clock, so the 30-second rule is tested without waiting 30 seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_on_by_default_every_30_seconds() -> None:
    assert TrainConfig().tracking.progress_seconds == 30.0
    assert (
        TrainConfig().tracking.log_interval == 0
    )  # time-based lines do not depend on a step count


def test_line_is_owed_every_interval_with_images_rate_and_etas() -> None:
    clock = Clock()
    p = Progress(every_s=30, log_interval=0, epochs=3, steps_per_epoch=100, global_batch=10,
                 clock=clock)  # fmt: skip
    p.start_epoch(0, 0)
    clock.now += 29.9
    assert not p.due(step=24)
    clock.now += 0.1
    assert p.due(step=25)
    # 25 of 100 steps in 30 s: 250 images, 8.3 img/s; 75 steps left in the epoch (90 s) and
    # 275 in the run (330 s), no evaluation measured yet.
    m = LINE.match(p.line(25, loss=1.5, lr=0.01))
    assert m, p.line(25, loss=1.5, lr=0.01)
    assert m.groups() == ("1", "3", "25", "100", "250", "1000", "8", "0:01:30", "0:05:30")
    assert not p.due(step=26)  # the window restarts at each line
    # Second epoch, with a measured 12-s evaluation per epoch: 2 evaluations still to come.
    p.eval_s.append(12.0)
    p.start_epoch(1, 0)
    clock.now += 60
    m = LINE.match(p.line(50, loss=1.0, lr=0.01))
    assert m and m.group(8, 9) == ("0:01:00", "0:03:24")  # 50 s + 150 s of steps + 2 x 12 s


def test_log_interval_still_forces_lines_and_zero_turns_time_off() -> None:
    clock = Clock()
    p = Progress(every_s=0, log_interval=5, epochs=1, steps_per_epoch=10, global_batch=4,
                 clock=clock)  # fmt: skip
    clock.now += 3600
    assert not p.due(step=4) and p.due(step=5)


def test_progress_lines_in_a_real_run(
    tiny_data: dict, tmp_path: Path, torch_globals: None, capsys: pytest.CaptureFixture
) -> None:
    """With a tiny interval every optimizer step prints a line; the epoch lines are unchanged."""
    cfg = tiny_config(tiny_data, tmp_path / "run", progress_seconds=1e-6)
    train(cfg)
    out = capsys.readouterr().out.splitlines()
    lines = [m for ln in out if (m := LINE.match(ln))]
    assert len(lines) == 2 * STEPS_PER_EPOCH
    last = lines[STEPS_PER_EPOCH - 1].groups()
    assert last[:6] == ("1", "2", str(STEPS_PER_EPOCH), str(STEPS_PER_EPOCH),
                        last[5], last[5])  # fmt: skip
    assert sum(ln.startswith("epoch ") for ln in out) == 2


@pytest.mark.slow
def test_progress_printed_by_rank_0_only(tiny_data: dict, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "ddp", progress_seconds=1e-6)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "cnn.train", "--config", str(write_config(cfg)),
    ]  # fmt: skip
    code, text = run(cmd, timeout=300)
    assert code == 0, text[-4000:]
    lines = [ln for ln in text.splitlines() if LINE.match(ln)]
    assert len(lines) == 2 * STEPS_PER_EPOCH  # one per step, not one per step and rank
