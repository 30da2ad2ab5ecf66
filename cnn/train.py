"""The training engine: `python -m cnn.train --config run.yaml [key=value ...]`, or under
`torchrun [...] -m cnn.train --config run.yaml`.

One readable loop in the style of nanoGPT's train.py: set up (distributed, data, model,
optimizer, resume), then epochs of steps, with one `is_main` flag gating every side effect
(printing, files, MLflow). Imports only torch/torchvision/numpy/PIL/yaml; MLflow is reached
lazily through cnn.tracking.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cnn import dist as D
from cnn.atomic import atomic_write_json
from cnn.checkpoint import (
    copy_checkpoint,
    find_resume_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
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
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> lr_scheduler.LRScheduler:
    """torch's schedulers, stepped once per optimizer step, with lengths derived from epochs
    (so a recipe's schedule stretches or shrinks with `epochs`)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and total >= 4:
        # OneCycleLR divides by zero when a phase is shorter than one step: clamp for tiny runs.
        pct = min(max(cfg.pct_start, 2 / total), (total - 2) / total)
        return lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total,
            pct_start=pct,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            cycle_momentum=False,  # keep the configured momentum / beta1
        )
    warm = min(round(cfg.warmup_epochs * steps_per_epoch), max(total - 1, 0))
    if cfg.schedule == "cosine":
        main: lr_scheduler.LRScheduler = lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(total - warm, 1), eta_min=cfg.lr * cfg.min_lr_frac
        )
    elif cfg.schedule == "step":
        main = lr_scheduler.StepLR(
            optimizer, step_size=max(1, round(cfg.step_size * steps_per_epoch)), gamma=cfg.gamma
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


def _test_hooks() -> dict[str, Any]:
    """TEST HOOKS ONLY (used by tests/test_torchrun*.py): fault injection from env vars.
    CNNPIPE_TEST_KILL_AT_STEP=S kills rank CNNPIPE_TEST_KILL_RANK (default 1) with SIGKILL after
    optimizer step S, on the first torchrun attempt only; CNNPIPE_TEST_NAN_AT_STEP=S makes the
    loss of step S NaN; CNNPIPE_TEST_TRACE_SAMPLES=DIR records the sample indices of every
    training batch per rank (to count samples across a kill and resume).
    (CNNPIPE_TEST_KILL_IN_SAVE lives in cnn/checkpoint.py.)"""

    def get(name: str) -> int | None:
        value = os.environ.get(name)
        return int(value) if value else None

    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    return {
        "kill_step": get("CNNPIPE_TEST_KILL_AT_STEP") if first_attempt else None,
        "kill_rank": 1 if get("CNNPIPE_TEST_KILL_RANK") is None else get("CNNPIPE_TEST_KILL_RANK"),
        "nan_step": get("CNNPIPE_TEST_NAN_AT_STEP"),
        "trace_samples": os.environ.get("CNNPIPE_TEST_TRACE_SAMPLES") or None,
    }


def _install_sample_trace(loader: Any, directory: str, rank: int) -> None:
    """TEST HOOK ONLY: append ``{attempt, epoch, batch, indices}`` per training batch to
    ``DIR/rank<r>.jsonl``, outside the training loop (the loader calls it as it yields)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    path = Path(directory) / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def trace(i: int, idx: torch.Tensor) -> None:
        rec = {"attempt": attempt, "epoch": loader.plan.epoch, "batch": i, "idx": idx.tolist()}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    loader.trace = trace


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
            kwargs["download"] = cfg.download and info.local_rank == 0
            prepared = prepare_dataset(cfg.dataset, **kwargs)
        D.barrier(info)
    return prepared


# ------------------------------------------------------------------------- the engine


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train per `cfg` in this process (one rank of a torchrun job, or alone); return the
    result dict (also written to output_dir/result.json by the main rank)."""
    t_start = time.perf_counter()
    _, _, world, local_world = D.env_world()
    cfg.validate(nproc_per_node=local_world, nnodes=max(1, world // local_world))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls on Ampere+
    info = D.init_distributed(cfg.device, cfg.num_threads)
    try:
        return _run(cfg, info, t_start)
    finally:
        D.cleanup()


def _run(cfg: TrainConfig, info: D.DistInfo, t_start: float) -> dict[str, Any]:
    from cnn.data import build_loaders
    from cnn.data.resolve import resolve_data_config
    from cnn.models import get_model, main_logits, model_info, training_loss

    log = print if info.is_main else (lambda *a, **k: None)
    device, is_main = info.device, info.is_main
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    cfg_hash = cfg.config_hash()
    hooks = _test_hooks()

    # ---- resume point (rank 0 decides; a config mismatch is refused before anything is written)
    resume_path = find_resume_checkpoint(ckpt_dir, cfg_hash) if is_main else None
    resume_path = D.broadcast_object(resume_path)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out_dir / "run.yaml")
    log(
        f"cnn.train: {cfg.model} on {cfg.dataset}, world {info.world_size} "
        f"({info.local_world_size}/node), device {device}, threads/rank "
        f"{torch.get_num_threads()}, config_hash {cfg_hash}",
        flush=True,
    )

    # ---- data
    minfo = model_info(cfg.model)
    prepared = _prepare_data(cfg, info)
    data_cfg = resolve_data_config(
        model_input_size=minfo.input_size,
        model_resize_size=minfo.resize_size,
        model_mean=minfo.mean,
        model_std=minfo.std,
        model_source=minfo.source,
        data_mean=prepared.mean,
        data_std=prepared.std,
        input_size=cfg.input_size,
        aug=cfg.aug,
        pretrained=bool(cfg.pretrained),
    )
    input_size, resize_size = data_cfg.input_size, data_cfg.resize_size
    normalize = (data_cfg.mean, data_cfg.std)
    loaders = build_loaders(
        prepared,
        input_size=input_size,
        resize_size=resize_size,
        style=data_cfg.style,
        batch_size=cfg.batch_size // cfg.grad_accum,  # loader batch = one micro-batch (global)
        eval_batch_size=cfg.eval_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
        device=device,
        mode=cfg.loader_mode,
        num_workers=cfg.num_workers,
        normalize=normalize,
        decoder=cfg.decoder,
    )
    if hooks.get("trace_samples"):
        _install_sample_trace(loaders.train, hooks["trace_samples"], info.rank)
    accum = cfg.grad_accum
    steps_per_epoch = len(loaders.train) // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"the train split has {prepared.splits.get('train')} images, fewer than one global "
            f"batch of {cfg.batch_size}; lower batch_size"
        )
    num_classes = cfg.num_classes or loaders.num_classes
    if num_classes != loaders.num_classes:
        raise ValueError(
            f"num_classes={cfg.num_classes} but dataset {cfg.dataset!r} has "
            f"{loaders.num_classes} classes; set num_classes: null (take it from the data)"
        )
    classes = list(loaders.classes)

    # ---- model: same seed on every rank -> identical init (DDP also broadcasts rank 0's)
    seed_everything(cfg.seed)
    raw = get_model(
        cfg.model,
        num_classes=num_classes,
        in_channels=loaders.in_channels,
        pretrained=cfg.pretrained,
        freeze_backbone=cfg.freeze_backbone,
        input_size=input_size,
    )
    if cfg.sync_bn and info.world_size > 1:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    raw.to(
        device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format
    )
    ema = (
        AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema
        else None
    )
    optimizer = build_optimizer(cfg, raw)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    precision = cfg.resolved_precision(device.type)
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_native_bf16():
        log(
            "warning: bf16 autocast on a CPU without AVX512-BF16/AMX is emulated and was measured "
            "5-7x slower than fp32 for LeNet on an AVX2 CPU; use precision=auto (fp32 on CPU)",
            flush=True,
        )
    amp_dtype = AMP_DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    seed_everything(cfg.seed + info.rank)  # per-rank streams (dropout etc.) from here on

    # ---- resume
    epoch, step, start_batch = 0, 0, 0
    meta: dict[str, Any] = {"best_val_accuracy": -1.0, "best_epoch": 0, "history": [],
                            "train_seconds": 0.0, "train_images": 0}  # fmt: skip
    partial = [0.0, 0, 0]  # epoch-so-far (loss sum, correct, seen), summed over ranks
    if resume_path is not None:
        state = load_checkpoint(resume_path)  # on CPU; load_state_dict copies to the device
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        epoch, step, start_batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
        meta.update(state["meta"])
        partial = list(meta.pop("partial", partial))
        rngs = state["rng"]
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank], device)
        else:  # world size changed: continue with fresh, still reproducible, per-rank streams
            seed_everything(cfg.seed + info.rank + 1000 * step)
        log(f"resumed from {resume_path} at epoch {epoch} step {step}", flush=True)
    meta.pop("partial", None)
    resumed_from = str(resume_path) if resume_path else None

    # ---- compile before wrapping in DDP, as the engine's contract says
    model: nn.Module = torch.compile(raw) if cfg.compile else raw
    eval_model = model  # unwrapped by DDP: ranks may hold unequal eval shards
    if info.world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    )

    tracker = Tracker(cfg.mlflow_run_id, cfg.mlflow_tracking_uri, is_main)
    tracker.log_params(cfg.to_dict())
    for row in meta["history"]:  # idempotent: fills in anything a crash kept from being logged
        tracker.log_metrics(_epoch_metrics(row), step=row["epoch"])

    # ---- state shared by the checkpoint and the non-finite-loss check
    BIG = 2**62
    first_bad = torch.zeros((), dtype=torch.int64, device=device)  # BIG - step of 1st non-finite
    # Checking means a GPU sync or an all-reduce; every 25 steps costs nothing measurable, and the
    # error still names the first bad step because `first_bad` records it on the device.
    check_every = 1 if device.type == "cpu" and info.world_size == 1 else 25

    def check_finite() -> None:
        """All ranks agree on the first non-finite loss; stop before anything is saved."""
        worst = int(D.all_reduce_max(first_bad.clone()))
        if worst:
            bad_step = BIG - worst
            raise FloatingPointError(
                f"non-finite loss (nan/inf) at epoch {bad_step // steps_per_epoch + 1} step "
                f"{bad_step} (global optimizer step); stopped without saving, the last good "
                f"checkpoint ({last_path if last_path.exists() else 'none yet'}) is kept. Lower "
                "lr, set grad_clip, or use precision=fp32"
            )

    def save(pos_epoch: int, pos_batch: int, sums: list[float], best: bool = False) -> None:
        """Gather per-rank RNG states (collective), then rank 0 writes atomically."""
        rngs = D.all_gather_object(rng_state(device))
        if not is_main:
            return
        state = {
            "format": 1,
            "model": unwrap_model(raw).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": pos_epoch,
            "step": step,
            "batch": pos_batch,
            "rng": rngs,
            "config": cfg.to_dict(),
            "config_hash": cfg_hash,
            "meta": {**meta, "partial": list(sums), **data_meta},
        }
        save_checkpoint(state, last_path)
        if best:
            copy_checkpoint(last_path, best_path)

    data_meta = {
        "classes": classes,
        "num_classes": num_classes,
        "in_channels": loaders.in_channels,
        "data_config": data_cfg.to_dict(),
        "input_size": input_size,
        "resize_size": resize_size,
        "mean": list(normalize[0]),
        "std": list(normalize[1]),
        "dataset": cfg.dataset,
        "test_is_val": bool(prepared.test_is_val),
    }

    # ---- the loop
    epoch_times: list[float] = []
    global_batch = cfg.batch_size
    progress = Progress(
        every_s=cfg.progress_seconds,
        log_interval=cfg.log_interval,
        epochs=cfg.epochs,
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
    )
    stop = epoch >= cfg.epochs
    while not stop:
        t_epoch = t_mark = time.perf_counter()  # t_mark: last time train_seconds was updated
        progress.start_epoch(epoch, start_batch // accum)
        loaders.train.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = torch.zeros((), dtype=torch.int64, device=device)
        step_loss = torch.zeros((), dtype=torch.float32, device=device)
        base = partial if start_batch else [0.0, 0, 0]
        n_micro = steps_per_epoch * accum
        for i, (x, y) in enumerate(loaders.train.iterate(start_batch=start_batch), start_batch):
            if i >= n_micro:  # leftover micro-batches that do not fill an optimizer step
                break
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_micro = (i + 1) % accum == 0
            sync = nullcontext() if last_micro or info.world_size == 1 else model.no_sync()
            with sync:
                with autocast:
                    output = model(x)
                    loss = training_loss(output, y, criterion)
                if hooks["nan_step"] == step:
                    loss = loss * float("nan")
                scaler.scale(loss / accum).backward()
            loss_d = loss.detach().float()
            step_loss += loss_d / accum
            loss_sum += loss_d.double() * y.numel()
            correct += (main_logits(output).argmax(1) == y).sum()
            seen += y.numel()
            if not last_micro:
                continue
            first_bad.copy_(
                torch.where((first_bad == 0) & ~torch.isfinite(step_loss), BIG - step, first_bad)
            )
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(raw)
            step += 1
            meta["train_images"] += global_batch
            if hooks["kill_step"] == step and info.rank == hooks["kill_rank"]:
                os.kill(os.getpid(), signal.SIGKILL)  # TEST HOOK: a rank dies mid-epoch
            at_epoch_end = i + 1 >= n_micro
            want_ckpt = cfg.ckpt_interval_steps and step % cfg.ckpt_interval_steps == 0
            if step % check_every == 0 or want_ckpt or at_epoch_end:
                check_finite()
            if is_main and progress.due(step):
                line = progress.line((i + 1) // accum, step_loss.item(), scheduler.get_last_lr()[0])
                log(line, flush=True)
            step_loss.zero_()
            if want_ckpt and not at_epoch_end:
                sums = D.all_reduce_sum(torch.stack([loss_sum, correct.double(), seen.double()]))
                sums = [base[0] + float(sums[0]), base[1] + int(sums[1]), base[2] + int(sums[2])]
                meta["train_seconds"] += time.perf_counter() - t_mark
                save(epoch, i + 1, sums)
                t_mark = time.perf_counter()
        # ---- epoch end: exact train metrics, validation, best/last checkpoints, logging
        sums = D.all_reduce_sum(torch.stack([loss_sum, correct.double(), seen.double()]))
        tot_loss, tot_correct, tot_seen = (
            base[0] + float(sums[0]), base[1] + int(sums[1]), base[2] + int(sums[2]),
        )  # fmt: skip
        now = time.perf_counter()
        train_time = now - t_epoch
        images = (n_micro - start_batch) // accum * global_batch
        meta["train_seconds"] += now - t_mark
        t_eval = time.perf_counter()
        val = evaluate(
            ema.module if ema is not None else eval_model,
            loaders.val,
            num_classes,
            device=device,
            autocast_dtype=amp_dtype,
            channels_last=cfg.channels_last,
        )
        progress.eval_s.append(time.perf_counter() - t_eval)
        epoch += 1
        start_batch = 0
        epoch_times.append(time.perf_counter() - t_epoch)
        is_best = val.accuracy > meta["best_val_accuracy"]
        if is_best:
            meta["best_val_accuracy"], meta["best_epoch"] = val.accuracy, epoch
        row = {
            "epoch": epoch,
            "train_loss": tot_loss / max(tot_seen, 1),
            "train_accuracy": tot_correct / max(tot_seen, 1),
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": images / max(train_time, 1e-9),
            "elapsed_s": time.perf_counter() - t_start,
            "train_seconds": meta["train_seconds"],  # cumulative, training steps only
        }
        meta["history"] = [*meta["history"], row]
        tracker.log_metrics(_epoch_metrics(row), step=epoch)  # before saving: see cnn.tracking
        save(epoch, 0, [0.0, 0, 0], best=is_best)
        eta = sum(epoch_times) / len(epoch_times) * (cfg.epochs - epoch)
        log(
            f"epoch {epoch}/{cfg.epochs} train_loss {row['train_loss']:.4f} train_acc "
            f"{row['train_accuracy']:.2%} val_loss {val.loss:.4f} val_acc {val.accuracy:.2%} "
            f"lr {row['lr']:.4g} {row['images_per_s']:.0f} img/s eta {_fmt_time(eta)}"
            + (" *best" if is_best else ""),
            flush=True,
        )
        reached = cfg.target_accuracy is not None and val.accuracy >= cfg.target_accuracy
        if reached:
            log(f"target_accuracy {cfg.target_accuracy:.2%} reached at epoch {epoch}", flush=True)
        stop = epoch >= cfg.epochs or reached

    # ---- final: the best checkpoint on the test split
    D.barrier(info)
    best = load_checkpoint(best_path if best_path.exists() else last_path)
    if ema is not None and best.get("ema") is not None:
        ema.load_state_dict(best["ema"])
        final_model: nn.Module = ema.module
    else:
        raw.load_state_dict(best["model"])
        final_model = eval_model
    test = evaluate(
        final_model,
        loaders.test,
        num_classes,
        device=device,
        autocast_dtype=amp_dtype,
        channels_last=cfg.channels_last,
    )
    result = {
        "best_val_accuracy": meta["best_val_accuracy"],
        "best_epoch": meta["best_epoch"],
        "epochs_completed": epoch,
        "images_per_s": meta["train_images"] / max(meta["train_seconds"], 1e-9),
        "train_seconds": meta["train_seconds"],
        "resumed_from": resumed_from,
        "classes": classes,
        "test": _test_dict(test, classes),
        "test_is_val": bool(prepared.test_is_val),
        # additions beyond docs/internals.md (backwards compatible)
        "history": meta["history"],
        "world_size": info.world_size,
        "config_hash": cfg_hash,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_memory_mb": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else None
        ),
    }
    if is_main:
        atomic_write_json(Path(cfg.output_dir) / "result.json", result)
        tracker.log_metrics(
            {"test_accuracy": test.accuracy, "test_top5": test.top5, "test_loss": test.loss,
             "best_val_accuracy": meta["best_val_accuracy"]},
            step=epoch,
        )  # fmt: skip
        log(
            f"test accuracy {test.accuracy:.2%}"
            + (f" top5 {test.top5:.2%}" if test.top5 is not None else "")
            + f" loss {test.loss:.4f} (best epoch {meta['best_epoch']}, "
            f"{'val' if prepared.test_is_val else 'test'} split) -> {cfg.output_dir}/result.json",
            flush=True,
        )
    return result


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
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
