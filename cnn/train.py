"""The training engine: `python -m cnn.train --config run.yaml [key=value ...]`, or under
`torchrun [...] -m cnn.train --config run.yaml`.

One readable loop in the style of nanoGPT's train.py and torchvision's reference scripts: `_run`
sets up (distributed, data, model, optimizer, resume), then runs epochs of `train_one_epoch` and
`evaluate`, with one `is_main` flag gating every side effect (printing, files, MLflow).

Where training stands is one `TrainState`; a checkpoint is the `state_dict()` of it and of the
model, optimizer, scheduler, scaler, EMA and per-rank RNGs (`cnn.checkpoint.Checkpointer`). Tests
inject faults through `cnn.callbacks` hooks, never through code in the loop. Imports only
torch/torchvision/numpy/PIL/yaml; MLflow is reached lazily through cnn.tracking.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cnn import dist as D
from cnn.atomic import atomic_write_json
from cnn.callbacks import Callbacks, FaultInjection
from cnn.checkpoint import (
    Checkpointer,
    RankRNG,
    find_resume_checkpoint,
    load_checkpoint,
    unwrap_model,
)
from cnn.config import TrainConfig, parse_overrides
from cnn.evaluate import EvalResult, evaluate
from cnn.tracking import Tracker

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


# ------------------------------------------------------------------------- building blocks


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights only: 1-D parameters (biases, norm scales/shifts) get none, as
    decaying them only hurts (they do not cause overfitting, and norm scales set feature size)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam or AdamW over `param_groups`, fused where torch can.

    Fused: one kernel updates every parameter. On a CPU torch's default is a Python loop over
    the parameters (its multi-tensor path is CUDA-only by default): LeNet's SGD step took 317 us
    that way and 78 us fused on the 2-core VM, 2.5% of a batch-64 training step."""
    groups = param_groups(model, cfg.optim.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
            fused=fused or None,
        )
    cls = torch.optim.Adam if cfg.optim.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.optim.lr, betas=(cfg.optim.momentum, 0.999), fused=fused or None)


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> lr_scheduler.LRScheduler:
    """torch's schedulers, stepped once per optimizer step, with lengths derived from epochs
    (so a recipe's schedule stretches or shrinks with `epochs`)."""
    total = cfg.optim.epochs * steps_per_epoch
    if cfg.schedule.name == "onecycle" and total >= 4:
        # OneCycleLR divides by zero when a phase is shorter than one step: clamp for tiny runs.
        pct = min(max(cfg.schedule.pct_start, 2 / total), (total - 2) / total)
        return lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.optim.lr,
            total_steps=total,
            pct_start=pct,
            div_factor=cfg.schedule.div_factor,
            final_div_factor=cfg.schedule.final_div_factor,
            cycle_momentum=False,  # keep the configured momentum / beta1
        )
    warm = min(round(cfg.schedule.warmup_epochs * steps_per_epoch), max(total - 1, 0))
    if cfg.schedule.name == "cosine":
        main: lr_scheduler.LRScheduler = lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(total - warm, 1), eta_min=cfg.optim.lr * cfg.schedule.min_lr_frac
        )
    elif cfg.schedule.name == "step":
        main = lr_scheduler.StepLR(
            optimizer,
            step_size=max(1, round(cfg.schedule.step_size * steps_per_epoch)),
            gamma=cfg.schedule.gamma,
        )
    else:  # constant (or onecycle on a run too short to cycle)
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warm:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warm)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warm])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    import random

    random.seed(seed)


def _cpu_has_native_bf16() -> bool:
    """True when oneDNN has bf16 instructions here (AVX512-BF16 or AMX); else bf16 is emulated."""
    cpu = getattr(torch._C, "_cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _fmt_time(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress lines during training: every `every_s` seconds (so a long epoch is never silent,
    whatever the step count) and/or every `log_interval` steps. Only rank 0 calls `line`.

    ETAs use the epoch's average step rate so far; the run's ETA adds the measured evaluation
    time per remaining epoch (zero before the first evaluation)."""

    def __init__(
        self,
        *,
        every_s: float,
        log_interval: int,
        epochs: int,
        steps_per_epoch: int,
        global_batch: int,
        clock: Any = time.perf_counter,
    ) -> None:
        self.every_s, self.log_interval = max(every_s, 0.0), log_interval
        self.epochs, self.steps_per_epoch, self.global_batch = epochs, steps_per_epoch, global_batch
        self.clock = clock
        self.eval_s: list[float] = []
        self.start_epoch(0, 0)

    def start_epoch(self, epoch: int, step_in_epoch: int) -> None:
        """Reset the windows at an epoch start (or a mid-epoch resume point)."""
        self.epoch, self.first_step = epoch, step_in_epoch
        self.t_epoch = self.t_last = self.clock()
        self.step_last = step_in_epoch

    def due(self, step: int) -> bool:
        """True when a line is owed: `every_s` seconds since the last one, or a log step."""
        if self.log_interval and step % self.log_interval == 0:
            return True
        return bool(self.every_s) and self.clock() - self.t_last >= self.every_s

    def line(self, step_in_epoch: int, loss: float, lr: float) -> str:
        """One line: epoch/step, images done, img/s over the window, loss, lr, ETAs."""
        now = self.clock()
        window = max(now - self.t_last, 1e-9)
        ips = (step_in_epoch - self.step_last) * self.global_batch / window
        rate = (step_in_epoch - self.first_step) / max(now - self.t_epoch, 1e-9)  # steps/s
        left_epochs = self.epochs - self.epoch - 1  # after this one
        left_steps = self.steps_per_epoch - step_in_epoch
        eval_s = sum(self.eval_s) / len(self.eval_s) if self.eval_s else 0.0
        inf = float("inf")
        eta_epoch = left_steps / rate if rate > 0 else inf
        left_run = left_steps + left_epochs * self.steps_per_epoch
        eta_run = left_run / rate + (left_epochs + 1) * eval_s if rate > 0 else inf
        done, total = step_in_epoch * self.global_batch, self.steps_per_epoch * self.global_batch
        self.t_last, self.step_last = now, step_in_epoch
        return (
            f"  progress epoch {self.epoch + 1}/{self.epochs} step {step_in_epoch}/"
            f"{self.steps_per_epoch} images {done}/{total} ({done / max(total, 1):.0%}) "
            f"{ips:.0f} img/s loss {loss:.4f} lr {lr:.4g} "
            f"eta epoch {_fmt_time(eta_epoch)} run {_fmt_time(eta_run)}"
        )


def _prepare_data(cfg: TrainConfig, info: D.DistInfo) -> Any:
    """Prepare the dataset cache once: global rank 0 first, then the other nodes' first ranks
    (a cache hit on shared storage), then everyone else (always a cache hit)."""
    from cnn.data import prepare_dataset

    prepared = None
    phases = (info.rank == 0, info.local_rank == 0 and info.rank != 0, info.local_rank != 0)
    for mine in phases:
        if mine:
            kwargs = cfg.data_kwargs()
            kwargs["download"] = cfg.source.download and info.local_rank == 0
            prepared = prepare_dataset(cfg.data.dataset, **kwargs)
        D.barrier(info)
    return prepared


# ------------------------------------------------------------------------- training state


@dataclass
class EpochSums:
    """Exact train metrics of an epoch so far, summed over all ranks."""

    loss: float = 0.0  # sum of per-sample losses
    correct: int = 0
    seen: int = 0

    def __add__(self, other: EpochSums) -> EpochSums:
        return EpochSums(
            self.loss + other.loss, self.correct + other.correct, self.seen + other.seen
        )


@dataclass
class TrainState:
    """Where training stands, as one resumable object (the checkpoint's `train_state` entry,
    beside the model, optimizer, scheduler, scaler and EMA). A new piece of resumable state is a
    new field here: `state_dict`/`load_state_dict` cover every field, and an older checkpoint
    without it loads with the field's default."""

    epoch: int = 0  # the next epoch to run (= epochs completed)
    step: int = 0  # global optimizer steps done
    batch: int = 0  # micro-batches of `epoch` already done (a mid-epoch resume point)
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    train_seconds: float = 0.0  # cumulative, training steps only (no evaluation, no saving)
    train_images: int = 0
    partial: EpochSums = field(default_factory=EpochSums)  # epoch sums up to `batch`
    # Wall time of the epochs this process ran (ETA of the epoch line only): not resumed.
    epoch_seconds: list[float] = field(default_factory=list, metadata={"resume": False})

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, floats, lists and dicts (weights_only-safe)."""
        out = {
            f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("resume", True)
        }
        out["partial"] = [self.partial.loss, self.partial.correct, self.partial.seen]
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state and f.metadata.get("resume", True):
                setattr(self, f.name, state[f.name])
        self.partial = EpochSums(*state.get("partial", (0.0, 0, 0)))

    def end_epoch(
        self, sums: EpochSums, val: EvalResult, *, lr: float, images_per_s: float, elapsed_s: float
    ) -> tuple[dict[str, Any], bool]:
        """Close an epoch: advance the position, record best and history -> (row, is_best)."""
        self.epoch, self.batch, self.partial = self.epoch + 1, 0, EpochSums()
        is_best = val.accuracy > self.best_val_accuracy
        if is_best:
            self.best_val_accuracy, self.best_epoch = val.accuracy, self.epoch
        row = {
            "epoch": self.epoch,
            "train_loss": sums.loss / max(sums.seen, 1),
            "train_accuracy": sums.correct / max(sums.seen, 1),
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "lr": lr,
            "images_per_s": images_per_s,
            "elapsed_s": elapsed_s,
            "train_seconds": self.train_seconds,  # cumulative, training steps only
        }
        self.history = [*self.history, row]
        return row, is_best


# ------------------------------------------------------------------------- what the loop uses


@dataclass
class Data:
    """The prepared dataset, its loaders and the data decisions, plus the checkpoint's `meta`
    (what rebuilding the model alone needs)."""

    prepared: Any
    loaders: Any
    config: Any  # cnn.data.resolve.DataConfig
    num_classes: int
    classes: list[str]
    steps_per_epoch: int
    meta: dict[str, Any]


@dataclass
class Engine:
    """The objects a training step touches, built once per run."""

    cfg: TrainConfig
    info: D.DistInfo
    raw: nn.Module  # the plain module: what the optimizer steps and the checkpoint holds
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    model: nn.Module = field(init=False)  # what trains: compiled and/or DDP-wrapped (`wrap`)
    eval_model: nn.Module = field(init=False)  # compiled, never DDP: eval shards are unequal

    def stateful(self) -> dict[str, Any]:
        """The checkpoint entries this engine owns."""
        objects: dict[str, Any] = {"model": unwrap_model(self.raw), "optimizer": self.optimizer,
                                   "scheduler": self.scheduler, "scaler": self.scaler}  # fmt: skip
        if self.ema is not None:
            objects["ema"] = self.ema
        return objects

    def wrap(self) -> str | None:
        """Compile before wrapping in DDP, as the engine's contract says (after any resume).
        Returns how a multi-process CPU job all-reduces its gradients (for the log), else None."""
        self.model = torch.compile(self.raw) if self.cfg.perf.compile else self.raw
        self.eval_model = self.model
        if self.info.world_size > 1:
            device = self.info.device
            ids = [device.index] if device.type == "cuda" else None
            # Gradients as views into DDP's all-reduce buckets: no copy of every gradient into
            # its bucket and back each step, and one gradient-sized buffer less.
            self.model = DDP(self.model, device_ids=ids, gradient_as_bucket_view=True)
            if device.type == "cpu":
                why = (
                    D.attach_shm_allreduce(self.model, self.info)
                    if self.cfg.runtime.shm_allreduce
                    else "runtime.shm_allreduce=false"
                )
                return "shared memory" if why is None else f"gloo ({why})"
        return None

    def autocast(self) -> Any:
        return (
            torch.autocast(self.info.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else nullcontext()
        )

    def optimizer_step(self) -> None:
        """Clip, step (through the scaler), zero the grads, advance the schedule and the EMA."""
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.raw)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def evaluate(self, loader: Any, num_classes: int, model: nn.Module | None = None) -> EvalResult:
        """Exact evaluation of `model`, by default the one reported (the EMA when there is one),
        as it predicts (`data.tta`)."""
        from cnn.models import with_tta

        if model is None:
            model = self.ema.module if self.ema is not None else self.eval_model
        return evaluate(
            with_tta(model, self.cfg.data.tta),
            loader,
            num_classes,
            device=self.info.device,
            autocast_dtype=self.amp_dtype,
            channels_last=self.cfg.perf.channels_last,
        )


class NonFiniteGuard:
    """All ranks agree on the first non-finite loss and stop before anything is saved.

    Checking means a GPU sync or an all-reduce; every 25 steps costs nothing measurable, and the
    error still names the first bad step because `first_bad` records it on the device."""

    BIG = 2**62

    def __init__(self, info: D.DistInfo, steps_per_epoch: int, last_path: Path) -> None:
        self.first_bad = torch.zeros((), dtype=torch.int64, device=info.device)  # BIG - step
        self.every = 1 if info.device.type == "cpu" and info.world_size == 1 else 25
        self.steps_per_epoch, self.last_path = steps_per_epoch, last_path

    def record(self, step_loss: torch.Tensor, step: int) -> None:
        """On the device, no sync: remember `step` if it is the first non-finite one."""
        bad = (self.first_bad == 0) & ~torch.isfinite(step_loss)
        self.first_bad.copy_(torch.where(bad, self.BIG - step, self.first_bad))

    def check(self) -> None:
        worst = int(D.all_reduce_max(self.first_bad.clone()))
        if worst:
            bad_step = self.BIG - worst
            last = self.last_path if self.last_path.exists() else "none yet"
            raise FloatingPointError(
                f"non-finite loss (nan/inf) at epoch {bad_step // self.steps_per_epoch + 1} step "
                f"{bad_step} (global optimizer step); stopped without saving, the last good "
                f"checkpoint ({last}) is kept. Lower lr, set grad_clip, or use precision=fp32"
            )


# ------------------------------------------------------------------------- the engine


def train(cfg: TrainConfig, callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train per `cfg` in this process (one rank of a torchrun job, or alone); return the
    result dict (also written to output_dir/result.json by the main rank). `callbacks` are the
    loop's hooks (tests inject faults through them)."""
    t_start = time.perf_counter()
    _, _, world, local_world = D.env_world()
    cfg.validate(nproc_per_node=local_world, nnodes=max(1, world // local_world))
    if cfg.repro.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls on Ampere+
    info = D.init_distributed(cfg.runtime.device, cfg.runtime.num_threads)
    try:
        return _run(cfg, info, t_start, callbacks or Callbacks())
    finally:
        D.cleanup()


def _run(
    cfg: TrainConfig, info: D.DistInfo, t_start: float, callbacks: Callbacks
) -> dict[str, Any]:
    """Set up, resume, run epochs of `train_one_epoch` + `evaluate`, test the best checkpoint."""
    log = print if info.is_main else _quiet
    ckpt_dir, cfg_hash = Path(cfg.run.output_dir) / "checkpoints", cfg.config_hash()
    resume_path = _resume_point(cfg, info, ckpt_dir, cfg_hash)
    log(
        f"cnn.train: {cfg.model.name} on {cfg.data.dataset}, world {info.world_size} "
        f"({info.local_world_size}/node), device {info.device}, threads/rank "
        f"{torch.get_num_threads()}, config_hash {cfg_hash}",
        flush=True,
    )
    data = _build_data(cfg, info)
    callbacks.on_train_start(data.loaders.train, info.rank)
    eng = _build_engine(cfg, info, data, log)
    state = TrainState()
    ckpt = Checkpointer(
        ckpt_dir,
        {**eng.stateful(), "train_state": state,  # before rng: its reseed reads state.step
         "rng": RankRNG(info.device, info.rank, info.world_size,
                        lambda: seed_everything(cfg.repro.seed + info.rank + 1000 * state.step))},
        config=cfg.to_dict(), config_hash=cfg_hash, meta=data.meta, is_main=info.is_main,
    )  # fmt: skip
    if resume_path is not None:
        ckpt.load(resume_path)
        log(f"resumed from {resume_path} at epoch {state.epoch} step {state.step}", flush=True)
    allreduce = eng.wrap()
    if allreduce:
        log(f"gradient all-reduce: {allreduce}", flush=True)
    tracker = Tracker(cfg.tracking.mlflow_run_id, cfg.tracking.mlflow_tracking_uri, info.is_main)
    tracker.log_params(cfg.sectioned())  # `section.key` names, grouped in the MLflow UI
    for row in state.history:  # idempotent: fills in anything a crash kept from being logged
        tracker.log_metrics(_epoch_metrics(row), step=row["epoch"])

    progress = Progress(
        every_s=cfg.tracking.progress_seconds,
        log_interval=cfg.tracking.log_interval,
        epochs=cfg.optim.epochs,
        steps_per_epoch=data.steps_per_epoch,
        global_batch=cfg.optim.batch_size,
    )
    guard = NonFiniteGuard(info, data.steps_per_epoch, ckpt.last)
    reached = False
    while state.epoch < cfg.optim.epochs and not reached:
        t_epoch = time.perf_counter()
        sums, images_per_s = train_one_epoch(
            eng, data.loaders.train, state, data.steps_per_epoch, progress, guard, ckpt, callbacks
        )
        t_eval = time.perf_counter()
        val = eng.evaluate(data.loaders.val, data.num_classes)
        progress.eval_s.append(time.perf_counter() - t_eval)
        state.epoch_seconds.append(time.perf_counter() - t_epoch)
        row, is_best = state.end_epoch(
            sums, val, lr=eng.lr(), images_per_s=images_per_s,
            elapsed_s=time.perf_counter() - t_start,
        )  # fmt: skip
        tracker.log_metrics(_epoch_metrics(row), step=state.epoch)  # before saving: cnn.tracking
        ckpt.save(best=is_best)
        log(_epoch_line(row, state, cfg.optim.epochs, is_best), flush=True)
        reached = cfg.run.target_accuracy is not None and val.accuracy >= cfg.run.target_accuracy
        if reached:
            log(f"target_accuracy {cfg.run.target_accuracy:.2%} reached at epoch {state.epoch}",
                flush=True)  # fmt: skip

    test = _test_best(eng, ckpt, data)
    result = _result(cfg, info, data, state, test, resume_path, cfg_hash, t_start)
    if info.is_main:
        _report(cfg, tracker, state, data, test, result)
    return result


def train_one_epoch(
    eng: Engine,
    loader: Any,
    state: TrainState,
    steps_per_epoch: int,
    progress: Progress,
    guard: NonFiniteGuard,
    ckpt: Checkpointer,
    callbacks: Callbacks,
) -> tuple[EpochSums, float]:
    """One epoch of optimizer steps from `state`'s position (its rest after a mid-epoch resume),
    with mid-epoch checkpoints every `ckpt_interval_steps`. Returns the epoch's exact train
    sums over all ranks and its training images/s."""
    from cnn.models import main_logits, training_loss

    cfg, info, accum = eng.cfg, eng.info, eng.cfg.optim.grad_accum
    t_epoch = t_mark = time.perf_counter()  # t_mark: last time train_seconds was updated
    start_batch = state.batch
    base = state.partial if start_batch else EpochSums()
    progress.start_epoch(state.epoch, start_batch // accum)
    loader.set_epoch(state.epoch)
    eng.model.train()
    autocast = eng.autocast()
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    correct = torch.zeros((), dtype=torch.int64, device=info.device)
    seen = torch.zeros((), dtype=torch.int64, device=info.device)
    step_loss = torch.zeros((), dtype=torch.float32, device=info.device)
    n_micro = steps_per_epoch * accum

    def summed() -> EpochSums:
        """The epoch so far over all ranks (a collective)."""
        t = D.all_reduce_sum(torch.stack([loss_sum, correct.double(), seen.double()]))
        return base + EpochSums(float(t[0]), int(t[1]), int(t[2]))

    for i, (x, y) in enumerate(loader.iterate(start_batch=start_batch), start_batch):
        if i >= n_micro:  # leftover micro-batches that do not fill an optimizer step
            break
        if cfg.perf.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last_micro = (i + 1) % accum == 0
        sync = nullcontext() if last_micro or info.world_size == 1 else eng.model.no_sync()
        with sync:
            with autocast:
                output = eng.model(x)
                loss = training_loss(output, y, eng.criterion)
            loss = callbacks.on_loss(state.step, loss)
            eng.scaler.scale(loss / accum).backward()
        loss_d = loss.detach().float()
        step_loss += loss_d / accum
        loss_sum += loss_d.double() * y.numel()
        correct += (main_logits(output).argmax(1) == y).sum()
        seen += y.numel()
        if not last_micro:
            continue
        guard.record(step_loss, state.step)
        eng.optimizer_step()
        state.step += 1
        state.train_images += cfg.optim.batch_size
        callbacks.on_step_end(state)
        at_epoch_end = i + 1 >= n_micro
        want_ckpt = cfg.run.ckpt_interval_steps and state.step % cfg.run.ckpt_interval_steps == 0
        if state.step % guard.every == 0 or want_ckpt or at_epoch_end:
            guard.check()
        if info.is_main and progress.due(state.step):
            print(progress.line((i + 1) // accum, step_loss.item(), eng.lr()), flush=True)
        step_loss.zero_()
        if want_ckpt and not at_epoch_end:
            state.batch, state.partial = i + 1, summed()
            state.train_seconds += time.perf_counter() - t_mark
            ckpt.save()
            t_mark = time.perf_counter()
    sums = summed()
    now = time.perf_counter()
    state.train_seconds += now - t_mark
    images = (n_micro - start_batch) // accum * cfg.optim.batch_size
    return sums, images / max(now - t_epoch, 1e-9)


# ------------------------------------------------------------------------- set-up and the end


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`print` on ranks other than the main one."""


def _resume_point(cfg: TrainConfig, info: D.DistInfo, ckpt_dir: Path, cfg_hash: str) -> Path | None:
    """Rank 0 decides the resume point (a config mismatch is refused before anything is
    written), then writes run.yaml; every rank gets the same answer."""
    resume_path = find_resume_checkpoint(ckpt_dir, cfg_hash) if info.is_main else None
    resume_path = D.broadcast_object(resume_path)
    if info.is_main:
        Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(Path(cfg.run.output_dir) / "run.yaml")
    return cast("Path | None", resume_path)


def _build_data(cfg: TrainConfig, info: D.DistInfo) -> Data:
    """Prepare the dataset, decide sizes/normalisation for the model, build the loaders, and
    refuse data that cannot work with the config (before any training step)."""
    from cnn.data import build_loaders
    from cnn.data.resolve import resolve_data_config
    from cnn.models import model_info

    minfo = model_info(cfg.model.name)
    prepared = _prepare_data(cfg, info)
    data_cfg = resolve_data_config(
        model_input_size=minfo.input_size,
        model_resize_size=minfo.resize_size,
        model_mean=minfo.mean,
        model_std=minfo.std,
        model_source=minfo.source,
        data_mean=prepared.mean,
        data_std=prepared.std,
        input_size=cfg.data.input_size,
        aug=cfg.data.aug,
        pretrained=bool(cfg.model.pretrained),
    )
    normalize = (data_cfg.mean, data_cfg.std)
    loaders = build_loaders(
        prepared,
        input_size=data_cfg.input_size,
        resize_size=data_cfg.resize_size,
        style=data_cfg.style,
        batch_size=cfg.optim.batch_size
        // cfg.optim.grad_accum,  # loader batch = one micro-batch (global)
        eval_batch_size=cfg.runtime.eval_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.repro.seed,
        device=info.device,
        mode=cfg.runtime.loader_mode,
        num_workers=cfg.runtime.num_workers,
        normalize=normalize,
        decoder=cfg.data.decoder,
    )
    steps_per_epoch = len(loaders.train) // cfg.optim.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"the train split has {prepared.splits.get('train')} images, fewer than one global "
            f"batch of {cfg.optim.batch_size}; lower batch_size"
        )
    num_classes = cfg.model.num_classes or loaders.num_classes
    if num_classes != loaders.num_classes:
        raise ValueError(
            f"num_classes={cfg.model.num_classes} but dataset {cfg.data.dataset!r} has "
            f"{loaders.num_classes} classes; set num_classes: null (take it from the data)"
        )
    classes = list(loaders.classes)
    meta = {
        "classes": classes,
        "num_classes": num_classes,
        "in_channels": loaders.in_channels,
        "data_config": data_cfg.to_dict(),
        "input_size": data_cfg.input_size,
        "resize_size": data_cfg.resize_size,
        "mean": list(normalize[0]),
        "std": list(normalize[1]),
        "dataset": cfg.data.dataset,
        "test_is_val": bool(prepared.test_is_val),
    }
    return Data(prepared, loaders, data_cfg, num_classes, classes, steps_per_epoch, meta)


def _build_engine(cfg: TrainConfig, info: D.DistInfo, data: Data, log: Any) -> Engine:
    """Model (same seed on every rank -> identical init; DDP also broadcasts rank 0's), EMA,
    optimizer, schedule, precision; then per-rank RNG streams (dropout etc.)."""
    from cnn.models import get_model

    device = info.device
    seed_everything(cfg.repro.seed)
    raw = get_model(
        cfg.model.name,
        num_classes=data.num_classes,
        in_channels=data.loaders.in_channels,
        pretrained=cfg.model.pretrained,
        freeze_backbone=cfg.model.freeze_backbone,
        input_size=data.config.input_size,
    )
    if cfg.perf.sync_bn and info.world_size > 1:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    raw.to(
        device,
        memory_format=torch.channels_last if cfg.perf.channels_last else torch.preserve_format,
    )
    ema = (
        AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay), use_buffers=True)
        if cfg.optim.ema
        else None
    )
    optimizer = build_optimizer(cfg, raw)
    scheduler = build_scheduler(cfg, optimizer, data.steps_per_epoch)
    precision = cfg.resolved_precision(device.type)
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_native_bf16():
        log(
            "warning: bf16 autocast on a CPU without AVX512-BF16/AMX is emulated and was measured "
            "5-7x slower than fp32 for LeNet on an AVX2 CPU; use precision=auto (fp32 on CPU)",
            flush=True,
        )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    seed_everything(cfg.repro.seed + info.rank)  # per-rank streams (dropout etc.) from here on
    return Engine(
        cfg, info, raw, ema, optimizer, scheduler, scaler, criterion, AMP_DTYPES[precision]
    )


def _epoch_line(row: dict[str, Any], state: TrainState, epochs: int, is_best: bool) -> str:
    """The per-epoch line; its ETA is the mean epoch time (evaluation included) of this process."""
    eta = sum(state.epoch_seconds) / len(state.epoch_seconds) * (epochs - state.epoch)
    return (
        f"epoch {state.epoch}/{epochs} train_loss {row['train_loss']:.4f} train_acc "
        f"{row['train_accuracy']:.2%} val_loss {row['val_loss']:.4f} val_acc "
        f"{row['val_accuracy']:.2%} lr {row['lr']:.4g} {row['images_per_s']:.0f} img/s "
        f"eta {_fmt_time(eta)}" + (" *best" if is_best else "")
    )


def _test_best(eng: Engine, ckpt: Checkpointer, data: Data) -> EvalResult:
    """Evaluate the best checkpoint (last.pt when none was best) on the test split."""
    D.barrier(eng.info)
    best = load_checkpoint(ckpt.best if ckpt.best.exists() else ckpt.last)
    if eng.ema is not None and best.get("ema") is not None:
        eng.ema.load_state_dict(best["ema"])
        model: nn.Module = eng.ema.module
    else:
        eng.raw.load_state_dict(best["model"])
        model = eng.eval_model
    return eng.evaluate(data.loaders.test, data.num_classes, model)


def _result(
    cfg: TrainConfig,
    info: D.DistInfo,
    data: Data,
    state: TrainState,
    test: EvalResult,
    resume_path: Path | None,
    cfg_hash: str,
    t_start: float,
) -> dict[str, Any]:
    """result.json (docs/internals.md), plus history, world size, hash, wall time, memory."""
    device = info.device
    return {
        "best_val_accuracy": state.best_val_accuracy,
        "best_epoch": state.best_epoch,
        "epochs_completed": state.epoch,
        "images_per_s": state.train_images / max(state.train_seconds, 1e-9),
        "train_seconds": state.train_seconds,
        "resumed_from": str(resume_path) if resume_path else None,
        "classes": data.classes,
        "test": _test_dict(test, data.classes),
        "test_is_val": bool(data.prepared.test_is_val),
        # additions beyond docs/internals.md (backwards compatible)
        "history": state.history,
        "world_size": info.world_size,
        "config_hash": cfg_hash,
        "node_token": os.environ.get(D.NODE_TOKEN_ENV),  # which node hosted rank 0
        "wall_seconds": time.perf_counter() - t_start,
        "peak_memory_mb": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else None
        ),
    }


def _report(
    cfg: TrainConfig,
    tracker: Tracker,
    state: TrainState,
    data: Data,
    test: EvalResult,
    result: dict[str, Any],
) -> None:
    """Main rank only: result.json, the final metrics in MLflow, the test line."""
    atomic_write_json(Path(cfg.run.output_dir) / "result.json", result)
    tracker.log_metrics(
        {"test_accuracy": test.accuracy, "test_top5": test.top5, "test_loss": test.loss,
         "best_val_accuracy": state.best_val_accuracy},
        step=state.epoch,
    )  # fmt: skip
    print(
        f"test accuracy {test.accuracy:.2%}"
        + (f" top5 {test.top5:.2%}" if test.top5 is not None else "")
        + f" loss {test.loss:.4f} (best epoch {state.best_epoch}, "
        f"{'val' if data.prepared.test_is_val else 'test'} split) -> "
        f"{cfg.run.output_dir}/result.json",
        flush=True,
    )


def _epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_s")
    return {k: row[k] for k in keys}


def _test_dict(result: EvalResult, classes: list[str]) -> dict[str, Any]:
    d = result.to_dict(classes)
    return {k: d[k] for k in ("accuracy", "top5", "loss", "per_class_accuracy",
                              "confusion_matrix", "num_samples")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m cnn.train --config run.yaml [key=value ...]`."""
    parser = argparse.ArgumentParser(prog="python -m cnn.train", description=__doc__)
    parser.add_argument("--config", required=True, help="resolved run.yaml (TrainConfig)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config)
    if args.overrides:
        cfg = cfg.replace(**parse_overrides(args.overrides))
    train(cfg, callbacks=FaultInjection.from_env())  # None unless CNNPIPE_TEST_* is set
    return 0


def exit_without_teardown(code: int) -> NoReturn:
    """End a finished worker process at once: run the atexit hooks (logging, MLflow), join
    non-daemon threads, flush, then `os._exit`. The interpreter's own teardown (freeing every
    module of torch, torchvision, MLflow one object at a time) measured 2.2 s per rank on the
    2-core dev VM, after the job's results were already written; and gloo's worker threads can
    abort that teardown with SIGABRT (pytorch/pytorch#190489). Only for a normal return: an
    exception still leaves through `sys.exit`, with its traceback and torchrun's error file."""
    import atexit

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what sys.exit would run; private but stable since Python 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
