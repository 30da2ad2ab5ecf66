"""Crash-safe checkpoints: atomic writes, `weights_only=True` loads, resume-point discovery.

A checkpoint is a plain dict of tensors and primitive containers only (RNG states as tensors, the
config as a dict), so `torch.load(weights_only=True)` can read it without unpickling code:

    format, model, optimizer, scheduler, scaler, ema, epoch, step, batch, rng, config,
    config_hash, meta

`epoch`/`batch` are the position to continue from (the next epoch index and the number of
micro-batches of it already done); `step` is the global optimizer step.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write

FORMAT = 1
CKPT_SUFFIX = ".pt"
# Test hook (see tests/test_torchrun.py): SIGKILL this process in the middle of its N-th
# checkpoint write, to prove a partial file never replaces the previous checkpoint.
_KILL_IN_SAVE_ENV = "CNNPIPE_TEST_KILL_IN_SAVE"
_saves_in_process = 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, so
    saved keys carry no 'module.' / '_orig_mod.' prefixes."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


# -------------------------------------------------------------------- RNG state as tensors


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG this process uses, as tensors and ints (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(cached)],
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss,
        "cuda": None,
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached)
    )
    random.setstate(
        (state["python_version"], tuple(int(v) for v in state["python"]), state["python_gauss"])
    )
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# -------------------------------------------------------------------- atomic write


def _maybe_kill_mid_write(f: IO[bytes]) -> None:
    """Test hook: cut the temp file in half and die, as a power cut during the write would."""
    target = os.environ.get(_KILL_IN_SAVE_ENV)
    if not target or int(target) != _saves_in_process:
        return
    f.flush()
    f.truncate(f.tell() // 2)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically: temp file in the same dir, fsync, rename, fsync dir.

    A crash at any point leaves either the old file or the new one, never a partial file."""
    global _saves_in_process
    _saves_in_process += 1

    def write(f: IO[bytes]) -> None:
        torch.save(state, f)
        _maybe_kill_mid_write(f)

    return atomic_write(path, write)


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Atomically copy a finished checkpoint (best.pt from last.pt without re-serialising)."""
    with open(src, "rb") as fin:
        return atomic_write(dst, lambda fout: shutil.copyfileobj(fin, fout, length=16 << 20))


# -------------------------------------------------------------------- load / discover


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load with `weights_only=True` (no arbitrary code runs); raise ValueError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated/corrupt zip, or a non-checkpoint file
        raise ValueError(f"checkpoint {path} is unreadable or incomplete: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state or "config_hash" not in state:
        raise ValueError(f"{path} is not a cnn checkpoint (no 'model'/'config_hash' entries)")
    return state


def find_resume_checkpoint(ckpt_dir: str | Path, config_hash: str) -> Path | None:
    """The newest valid checkpoint in `ckpt_dir` (by global step; last.pt wins ties), or None.

    Unreadable files are skipped with a warning. A valid checkpoint from a different config is
    refused: mixing two configs in one run would silently corrupt it."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for path in sorted(ckpt_dir.glob(f"*{CKPT_SUFFIX}")):
        try:
            state = load_checkpoint(path, mmap=True)
        except ValueError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
            continue
        if state["config_hash"] != config_hash:
            raise ValueError(
                f"checkpoint {path} was written with config_hash {state['config_hash']} but "
                f"this run's config_hash is {config_hash}; resume with the same config (see "
                f"{ckpt_dir.parent / 'run.yaml'}) or use a new output_dir for the new config"
            )
        key = (int(state["step"]), int(path.name == "last.pt"), path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def load_model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Rebuild the trained model from a checkpoint alone -> (model in eval mode, config dict,
    meta). With EMA enabled in the run, the EMA weights (the ones evaluated) are returned."""
    from cnn.models import get_model

    state = load_checkpoint(path, map_location="cpu")
    cfg, meta = dict(state["config"]), dict(state.get("meta") or {})
    model = get_model(
        cfg["model"],
        num_classes=int(meta["num_classes"]),
        in_channels=int(meta.get("in_channels", 3)),
        input_size=meta.get("input_size"),
        # The structure a pretrained build has (GoogLeNet drops its aux heads, Inception v3
        # keeps transform_input), with random weights: the checkpoint supplies them.
        pretrained_layout=bool(cfg.get("pretrained")),
    )
    weights = state["model"]
    if use_ema and state.get("ema") is not None:
        weights = ema_weights(state["ema"])
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, meta


def ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model state dict inside an AveragedModel's state dict."""
    return {k.removeprefix("module."): v for k, v in ema_state.items() if k != "n_averaged"}
