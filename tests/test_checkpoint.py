"""Checkpoints: weights_only round trip, RNG restore, atomic writes under SIGKILL, discovery."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn.checkpoint import (
    find_resume_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)
from cnn.models import get_model

REPO = Path(__file__).resolve().parents[1]


def _state(step: int, config_hash: str = "h1") -> dict:
    model = get_model("lenet5", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 1,
        "step": step,
        "batch": 0,
        "rng": [rng_state()],
        "config": {"model": "lenet5", "lr": 0.1, "pretrained": None},
        "config_hash": config_hash,
        "meta": {"num_classes": 10, "classes": [str(k) for k in range(10)]},
    }


def test_roundtrip_weights_only_and_rng(tmp_path: Path) -> None:
    state = _state(step=5)
    path = save_checkpoint(state, tmp_path / "ckpt" / "last.pt")
    # What we wrote must load under the strict unpickler (no code objects, no numpy arrays).
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 5 and raw["config"]["pretrained"] is None
    back = load_checkpoint(path)
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    # Restoring the RNG state replays the same random numbers in torch, numpy and random.
    saved = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(7), np.random.rand(5), random.random()
    set_rng_state(load_checkpoint(save_checkpoint({**state, "rng": [saved]}, path))["rng"][0])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not list(path.parent.glob(".*tmp*"))  # no temp files left behind


def test_unwrap_compiled_model_has_plain_keys() -> None:
    model = get_model("lenet5", num_classes=10)
    compiled = torch.compile(model)  # wrapping is lazy: nothing is compiled here
    assert "_orig_mod.features.0.weight" in compiled.state_dict()
    assert unwrap_model(compiled) is model
    assert "features.0.weight" in unwrap_model(compiled).state_dict()


def test_killed_during_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """A real process is SIGKILLed in the middle of its second save: the first survives."""
    path = tmp_path / "last.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from cnn.checkpoint import save_checkpoint
        save_checkpoint({{"model": {{"w": torch.zeros(1000)}}, "step": 1, "config_hash": "h"}},
                        {str(path)!r})
        save_checkpoint({{"model": {{"w": torch.ones(1000)}}, "step": 2, "config_hash": "h"}},
                        {str(path)!r})
        """
    )
    env = {**os.environ, "CNNPIPE_TEST_KILL_IN_SAVE": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, timeout=120, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial = list(tmp_path.glob(".last.pt.tmp-*"))
    assert len(partial) == 1  # the half-written temp file is there, never renamed
    with pytest.raises(ValueError, match="unreadable or incomplete"):
        load_checkpoint(partial[0].rename(tmp_path / "partial.pt"))
    (tmp_path / "partial.pt").unlink()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.zeros(1000))


def test_find_resume_picks_newest_and_skips_corrupt(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path / "missing", "h1") is None
    save_checkpoint(_state(step=4), tmp_path / "best.pt")
    save_checkpoint(_state(step=9), tmp_path / "last.pt")
    assert find_resume_checkpoint(tmp_path, "h1") == tmp_path / "last.pt"
    # Ties go to last.pt (it holds the optimizer position of the newest step).
    save_checkpoint(_state(step=9), tmp_path / "best.pt")
    assert find_resume_checkpoint(tmp_path, "h1") == tmp_path / "last.pt"
    # A truncated last.pt is skipped with a warning; the older valid one is used.
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 3])
    save_checkpoint(_state(step=4), tmp_path / "best.pt")
    with pytest.warns(UserWarning, match=r"skipping checkpoint: checkpoint .*last.pt is unread"):
        assert find_resume_checkpoint(tmp_path, "h1") == tmp_path / "best.pt"


def test_config_mismatch_is_refused(tmp_path: Path) -> None:
    save_checkpoint(_state(step=3, config_hash="aaaa"), tmp_path / "last.pt")
    with pytest.raises(ValueError) as err:
        find_resume_checkpoint(tmp_path, "bbbb")
    msg = str(err.value)
    assert "aaaa" in msg and "bbbb" in msg
    assert "same config" in msg and "new output_dir" in msg
