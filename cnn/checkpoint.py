"""Crash-safe checkpoints: atomic writes, `weights_only=True` loads, resume-point discovery.

A checkpoint is `{name: obj.state_dict()}` for each stateful object of the run (as torchtitan's
checkpointer keeps it), plus the config, its hash and `meta`, in plain tensors and primitive
containers only (RNG states as tensors, the config as a dict), so `torch.load(weights_only=True)`
reads it without unpickling code. The engine's layout (`FORMAT` 3):

    format, config, config_hash, meta,
    model, optimizer, scheduler, scaler, [ema], train_state, rng

`train_state` is `cnn.train.TrainState.state_dict()`: `epoch`/`batch` are the position to continue
from (the next epoch index and the number of micro-batches of it already done), `step` the global
optimizer step, plus best/history/timings and the partial epoch sums. `rng` holds every rank's
RNG streams. `meta` is what rebuilding the model alone needs (classes, sizes, mean/std, data
config). Adding resumable state means adding an object to the `Checkpointer`, nothing else.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
from torch import nn

from . import dist as D
from .atomic import atomic_write
from .config import LAUNCH_KEYS, TrainConfig

# 1: flat epoch/step/batch/meta (before TrainState); 2: a flat config (before its sections).
# Neither is resumable by this engine; load_model_from_checkpoint reads both.
FORMAT = 3
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


class RankRNG:
    """Every rank's RNG streams as one checkpoint entry (a list, one state per rank).

    `state_dict()` gathers them, a collective: every rank calls it. `load_state_dict` restores
    this rank's streams, or calls `reseed()` when the world size changed (the saved streams then
    do not map onto the ranks; fresh per-rank streams are still reproducible)."""

    def __init__(
        self, device: torch.device, rank: int, world_size: int, reseed: Callable[[], None]
    ) -> None:
        self.device, self.rank, self.world_size, self.reseed = device, rank, world_size, reseed

    def state_dict(self) -> list[dict[str, Any]]:
        return D.all_gather_object(rng_state(self.device))

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.world_size:
            set_rng_state(states[self.rank], self.device)
        else:
            self.reseed()


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


def check_layout(
    state: Mapping[str, Any], path: str | Path, names: Iterable[str] = ("train_state",)
) -> None:
    """Refuse, with the fix, a checkpoint whose layout this engine does not write (an older
    engine's, or one missing an entry this run restores), instead of failing on a missing key."""
    missing = [name for name in names if name not in state]
    if state.get("format") == FORMAT and not missing:
        return
    found = state.get("format", "none")
    what = f"; it lacks {', '.join(map(repr, missing))}" if missing else ""
    raise ValueError(
        f"checkpoint {path} has layout format {found}, but this engine resumes format {FORMAT}"
        f"{what}. Train into a new output_dir, or remove {Path(path).parent} to start over "
        "(load_model_from_checkpoint still reads its weights)"
    )


class Stateful(Protocol):
    """What a checkpoint entry is: torch modules, optimizers, schedulers, scalers, TrainState."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


class Checkpointer:
    """A run's `last.pt` and `best.pt`: `{name: obj.state_dict()}` of `objects`, plus the config,
    its hash and `meta`. `save` is called on every rank (some entries, such as `RankRNG`, gather
    across ranks); only the main rank writes. `load` restores the objects in `objects`' order,
    so put an entry that another one's restore reads (TrainState before RankRNG) first."""

    def __init__(
        self,
        directory: str | Path,
        objects: Mapping[str, Stateful],
        *,
        config: dict[str, Any],
        config_hash: str,
        meta: dict[str, Any],
        is_main: bool,
    ) -> None:
        self.directory = Path(directory)
        self.last, self.best = self.directory / "last.pt", self.directory / "best.pt"
        self.objects = dict(objects)
        self.config, self.config_hash, self.meta = config, config_hash, meta
        self.is_main = is_main

    def save(self, best: bool = False) -> None:
        """Write last.pt atomically (and copy it to best.pt when `best`)."""
        states = {name: obj.state_dict() for name, obj in self.objects.items()}  # every rank
        if not self.is_main:
            return
        state = {"format": FORMAT, "config": self.config, "config_hash": self.config_hash,
                 "meta": self.meta, **states}  # fmt: skip
        save_checkpoint(state, self.last)
        if best:
            copy_checkpoint(self.last, self.best)

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore every object from `path` (on CPU; load_state_dict copies to the device)."""
        state = load_checkpoint(path)
        check_layout(state, path, self.objects)
        if state["config_hash"] != self.config_hash:
            raise ValueError(_mismatch(path, state["config_hash"], self.config_hash))
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        return state


def _mismatch(path: str | Path, theirs: str, ours: str) -> str:
    return (
        f"checkpoint {path} was written with config_hash {theirs} but this run's config_hash is "
        f"{ours}; resume with the same config (see {Path(path).parent.parent / 'run.yaml'}) or "
        "use a new output_dir for the new config"
    )


def find_resume_checkpoint(ckpt_dir: str | Path, config_hash: str) -> Path | None:
    """The newest valid checkpoint in `ckpt_dir` (by global step; last.pt wins ties), or None.

    Unreadable files are skipped with a warning. A valid checkpoint from a different config or
    of another layout is refused: mixing two configs in one run would silently corrupt it."""
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
        check_layout(state, path)
        if state["config_hash"] != config_hash:
            raise ValueError(_mismatch(path, state["config_hash"], config_hash))
        key = (int(state["train_state"]["step"]), int(path.name == "last.pt"), path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def load_model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint alone -> (model in eval mode, its config,
    meta). With EMA enabled in the run, the EMA weights (the ones evaluated) are returned."""
    from cnn.models import get_model

    state = load_checkpoint(path, map_location="cpu")
    raw = state["config"]
    if not isinstance(raw.get("model"), dict):  # a flat config (format < 3): plain names
        cfg = TrainConfig().replace(**{k: v for k, v in raw.items() if k not in LAUNCH_KEYS})
    else:
        cfg = TrainConfig.from_dict(raw, source=f"{path} (config)")
    meta = dict(state.get("meta") or {})
    model = get_model(
        cfg.model.name,
        num_classes=int(meta["num_classes"]),
        in_channels=int(meta.get("in_channels", 3)),
        input_size=meta.get("input_size"),
        # The structure a pretrained build has (GoogLeNet drops its aux heads, Inception v3
        # keeps transform_input), with random weights: the checkpoint supplies them.
        pretrained_layout=bool(cfg.model.pretrained),
    )
    weights = state["model"]
    if use_ema and state.get("ema") is not None:
        weights = ema_weights(state["ema"])
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, meta


def ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model state dict inside an AveragedModel's state dict."""
    return {k.removeprefix("module."): v for k, v in ema_state.items() if k != "n_averaged"}
