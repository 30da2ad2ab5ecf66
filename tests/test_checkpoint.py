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

from cnn.callbacks import FaultInjection
from cnn.checkpoint import (
    FORMAT,
    Checkpointer,
    RankRNG,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)
from cnn.config import TrainConfig
from cnn.models import get_model
from cnn.train import EpochSums, TrainState

REPO = Path(__file__).resolve().parents[1]


def _state(step: int, config_hash: str = "h1") -> dict:
    model = get_model("lenet5", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {
        "format": FORMAT,
        "config": TrainConfig().replace(lr=0.1).to_dict(),
        "config_hash": config_hash,
        "meta": {"num_classes": 10, "classes": [str(k) for k in range(10)]},
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "train_state": TrainState(epoch=1, step=step).state_dict(),
        "rng": [rng_state()],
    }


def test_roundtrip_weights_only_and_rng(tmp_path: Path) -> None:
    state = _state(step=5)
    path = save_checkpoint(state, tmp_path / "ckpt" / "last.pt")
    # What we wrote must load under the strict unpickler (no code objects, no numpy arrays).
    raw = torch.load(path, weights_only=True)
    assert raw["train_state"]["step"] == 5 and raw["config"]["model"]["pretrained"] is None
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


def test_checkpoint_is_state_dicts_of_the_stateful_objects(tmp_path: Path) -> None:
    """`Checkpointer` writes `{name: obj.state_dict()}` plus config/hash/meta and restores every
    object, TrainState included (position, best, history, timings, partial epoch sums)."""
    model = get_model("lenet5", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = TrainState(
        epoch=1, step=7, batch=3, best_val_accuracy=0.5, best_epoch=1, train_seconds=2.5,
        history=[{"epoch": 1, "val_accuracy": 0.5}], train_images=56,
        partial=EpochSums(1.5, 9, 24), epoch_seconds=[3.0],
    )  # fmt: skip
    rng = RankRNG(torch.device("cpu"), 0, 1, reseed=lambda: None)
    objects = {"model": model, "optimizer": opt, "train_state": state, "rng": rng}
    meta = {"num_classes": 10, "classes": [str(k) for k in range(10)]}
    ckpt = Checkpointer(tmp_path / "checkpoints", objects, config=TrainConfig().to_dict(),
                        config_hash="h1", meta=meta, is_main=True)  # fmt: skip
    ckpt.save(best=True)
    raw = torch.load(ckpt.last, weights_only=True)
    assert set(raw) == {"format", "config", "config_hash", "meta", *objects}
    assert (
        raw["train_state"]["partial"] == [1.5, 9, 24] and "epoch_seconds" not in raw["train_state"]
    )
    assert ckpt.best.read_bytes() == ckpt.last.read_bytes()

    fresh = TrainState()
    model2 = get_model("lenet5", num_classes=10)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    objects2 = {"model": model2, "optimizer": opt2, "train_state": fresh, "rng": rng}
    Checkpointer(tmp_path / "checkpoints", objects2, config={}, config_hash="h1", meta={},
                 is_main=True).load(ckpt.last)  # fmt: skip
    assert fresh == TrainState(**{**vars(state), "epoch_seconds": []})  # epoch_seconds: not resumed
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert load_model_from_checkpoint(ckpt.best)[2] == meta
    assert find_resume_checkpoint(tmp_path / "checkpoints", "h1") == ckpt.last

    # A checkpoint of format 2 holds a flat config (before the sections, with the launch
    # fields): not resumable, but its model still loads, with the config read by plain names.
    old = {**torch.load(ckpt.best, weights_only=True), "format": 2}
    old["config"] = {"model": "lenet5", "lr": 0.3, "nproc_per_node": 2, "pretrained": None}
    save_checkpoint(old, tmp_path / "old" / "best.pt")
    model3, cfg3, meta3 = load_model_from_checkpoint(tmp_path / "old" / "best.pt")
    assert (cfg3.model.name, cfg3.optim.lr, meta3) == ("lenet5", 0.3, meta)
    for k, v in model.state_dict().items():
        assert torch.equal(model3.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"layout format 2, but this engine resumes format 3"):
        find_resume_checkpoint(tmp_path / "old", config_hash="h1")


def test_other_layout_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A checkpoint of the previous (flat) layout: a clear error naming both formats, not a
    KeyError, both when discovering the resume point and when loading it."""
    old = {"format": 1, "model": {"w": torch.zeros(2)}, "epoch": 1, "step": 3, "batch": 0,
           "config": {}, "config_hash": "h1", "meta": {}}  # fmt: skip
    save_checkpoint(old, tmp_path / "last.pt")
    with pytest.raises(
        ValueError, match=rf"layout format 1, but this engine resumes format {FORMAT}"
    ):
        find_resume_checkpoint(tmp_path, "h1")
    objects = {"model": torch.nn.Linear(1, 2), "train_state": TrainState()}
    ckpt = Checkpointer(tmp_path, objects, config={}, config_hash="h1", meta={}, is_main=True)
    with pytest.raises(ValueError, match=r"lacks 'train_state'.* new output_dir"):
        ckpt.load(tmp_path / "last.pt")


def test_fault_injection_from_env() -> None:
    """Jobs that cannot be handed a Python object get their faults from CNNPIPE_TEST_*; none
    set (or all blanked by a retry) installs nothing, and the kill hits the first attempt only."""
    assert FaultInjection.from_env({}) is None
    assert FaultInjection.from_env({"CNNPIPE_TEST_KILL_AT_STEP": ""}) is None
    faults = FaultInjection.from_env(
        {"CNNPIPE_TEST_KILL_AT_STEP": "9", "CNNPIPE_TEST_NAN_AT_STEP": "4"}
    )
    assert faults is not None
    assert (faults.kill_at_step, faults.kill_rank, faults.nan_at_step) == (9, 1, 4)
    retry = {"CNNPIPE_TEST_KILL_AT_STEP": "9", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert FaultInjection.from_env(retry).kill_at_step is None  # type: ignore[union-attr]
    loss = torch.tensor(1.0)
    assert torch.isnan(faults.on_loss(4, loss)) and faults.on_loss(3, loss) is loss
