"""Prove every GPU path in one command (issue 9): prints one JSON object, writes it to
benchmarks/results/gpu-<date>.json.

    python benchmarks/gpu_check.py                 # on a GPU host: under 8 minutes on one H200
    python benchmarks/gpu_check.py --cpu-smoke     # every step at toy size on CPU (CI, laptops)

On a lent GPU machine only the checkout travels: carry the CIFAR archive in an ignored folder
and pass ``--data-dir`` (see benchmarks/results/README.md).

Why one script: the GPU host has torch, torchvision, NumPy, Pillow and PyYAML only (no Prefect,
MLflow, pydantic or package registry) and is lent for minutes at a time, so the check must run
the engine alone, in one call, and leave its figures even when a step fails or time runs out
(the JSON is rewritten after every step). Steps:

- ``environment``: torch/CUDA/cuDNN/NCCL versions, GPUs;
- ``prepare_data``: unpack the CIFAR-10 training JPEGs (../shared/data) into a work dir and
  prepare them through the ``imagefolder`` path with 10% held out for validation;
- ``ddp_world1`` / ``ddp_world2``: DDP over NCCL (gloo on CPU) under torchrun, parameters after
  a few steps equal a single process on the global batch; an all-reduce bandwidth figure;
- ``precision_layout_compile``: training steps in fp32, bf16 autocast, bf16 + channels_last and
  bf16 + channels_last + ``torch.compile`` (images/s and peak memory of each);
- ``memory_loader``: the on-device in-memory loader (tensors on the GPU, batch augmentation);
- ``decode_jpeg``: torchvision's GPU JPEG decoder on real files against the CPU decoder;
- ``engine_ddp``: ``torchrun -m cnn.train`` with 2 ranks (2 GPUs over NCCL; gloo on CPU);
- ``resnet18_cifar_to_94`` / ``fastest_to_94``: the ``resnet18_cifar-cifar10`` and
  ``resnet9_cifar-cifar10`` recipes through the engine (``python -m cnn.train``), stopped at 94%
  validation accuracy, with time to target and peak memory;
- ``resnet50_synthetic`` / ``resnet50_real_data``: ResNet-50 at 224 px, bf16 + channels_last,
  images/s on synthetic tensors and through the real data path (the prepared CIFAR images on
  the device, RandomResizedCrop to 224 on the GPU; and the streaming DataLoader path).

A step that needs CUDA reports ``"status": "skipped: no CUDA"`` on a CPU-only host; with
``--cpu-smoke`` it still runs at toy size on CPU (under ``cpu_smoke``), so every code path it
shares with the GPU run is exercised. Exit code 0 when no step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script on a host where cnnpipe is not installed

import torch  # noqa: E402

SHARED_DATA = Path(os.environ.get("CNNPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
ARCHIVE = "cifar10-jpeg-train.tar.gz"
TARGET = 0.94
NO_CUDA = "skipped: no CUDA"


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON object."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """Full sizes for the GPU run; toy sizes for --cpu-smoke (same code, smaller numbers)."""

    smoke: bool
    per_class: int | None = None  # JPEGs unpacked per class (None = all 5,000)
    micro_model: str = "resnet18_cifar"
    micro_batch: int = 512
    micro_steps: int = 30
    ddp_steps: int = 5
    ddp_batch: int = 64
    allreduce_mb: int = 256
    loader_batch: int = 512
    engine_overrides: list[str] = field(default_factory=list)
    engine_timeout: float = 300.0
    r50_batch: int = 256
    r50_size: int = 224
    r50_steps: int = 30
    warmup: int = 3
    stream_workers: int = 8
    # inductor (Triton on CUDA); aot_eager on CPU smoke runs the same dynamo + AOTAutograd
    # capture without minutes of C++ code generation on a 2-core machine
    compile_backend: str = "inductor"

    @classmethod
    def for_mode(cls, smoke: bool) -> Sizes:
        if not smoke:
            return cls(smoke=False, stream_workers=min(8, os.cpu_count() or 1))
        return cls(
            smoke=True,
            per_class=12,
            micro_model="lenet5",
            micro_batch=8,
            micro_steps=3,
            ddp_steps=3,
            ddp_batch=8,
            allreduce_mb=4,
            loader_batch=32,
            engine_overrides=["epochs=1", "batch_size=32", "eval_batch_size=64", "input_size=16"],
            engine_timeout=180.0,
            r50_batch=2,
            r50_size=32,
            r50_steps=1,
            warmup=1,
            stream_workers=1,
            compile_backend="aot_eager",
        )


# ------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset_peak, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def timed_steps(step: Callable[[], int], steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of ``step`` (returns the images it processed) after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        n += step()
    sync(device)
    rate = n / max(time.perf_counter() - t0, 1e-9)
    finite = getattr(step, "finite", None)
    if finite is not None and not bool(finite):
        raise FloatingPointError("non-finite loss during the timed steps")
    return rate


def train_step_fn(
    model: torch.nn.Module,
    batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    amp: torch.dtype | None,
    channels_last: bool,
    device: torch.device,
) -> Callable[[], int]:
    """One SGD step (forward, backward, update) per call, as the engine's loop does it. Every
    loss is checked for finiteness on the device, without a host sync per step; the check
    raises at the next call after 10 steps (and ``timed_steps`` syncs at its end)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    finite = torch.ones((), dtype=torch.bool, device=device)
    calls = [0]

    def step() -> int:
        calls[0] += 1
        if calls[0] % 10 == 0 and not bool(finite):
            raise FloatingPointError("non-finite loss")
        x, y = batches()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        finite.logical_and_(torch.isfinite(loss.detach()))
        return len(y)

    step.finite = finite  # type: ignore[attr-defined]
    return step


def run_logged(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """Run ``cmd`` in its own process group, echo its output to stderr, kill the whole group on
    timeout. Returns (exit code, output, seconds); exit code 124 on timeout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    deadline = t0 + timeout

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            print("    | " + line.rstrip(), file=sys.stderr, flush=True)

    import threading

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.2)
    code = proc.poll()
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = 124
    reader.join(timeout=5)
    return code, "".join(lines), time.perf_counter() - t0


def child_env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ------------------------------------------------------------------------- the report


class Report:
    """The JSON object, rewritten atomically after every step (a timeout keeps what ran)."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path, self.data = path, {**head, "steps": {}}
        self.failed: list[str] = []

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def step(
        self, name: str, fn: Callable[[torch.device], dict[str, Any]], *, needs_cuda: bool,
        cuda: bool, smoke: bool,
    ) -> dict[str, Any] | None:  # fmt: skip
        """Run one step and record it. A CUDA step without CUDA is reported as skipped, and
        under --cpu-smoke still run on CPU (its result under ``cpu_smoke``)."""
        entry: dict[str, Any]
        result: dict[str, Any] | None = None
        if needs_cuda and not cuda and not smoke:
            entry = {"status": NO_CUDA}
        else:
            device = torch.device("cuda" if cuda else "cpu")
            log(f"step {name} on {device}")
            t0 = time.perf_counter()
            try:
                result = fn(device)
                run = {"status": "ok", **result}
            except Exception as exc:  # one failing step must not hide the others' figures
                run = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=6)[-3000:],
                }
                self.failed.append(name)
                log(f"step {name} FAILED: {type(exc).__name__}: {exc}")
            run["seconds"] = round(time.perf_counter() - t0, 2)
            if run["status"] == "ok" and run.get("skipped"):
                run["status"] = f"skipped: {run.pop('skipped')}"
            entry = {"status": NO_CUDA, "cpu_smoke": run} if needs_cuda and not cuda else run
        self.data["steps"][name] = entry
        self.write()
        return result


# ------------------------------------------------------------------------- steps


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    with contextlib.suppress(Exception):
        import torchvision

        env["torchvision"] = torchvision.__version__
    if cuda:
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(Exception):
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    missing = []
    for mod in ("prefect", "mlflow", "pydantic"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    env["absent_optional_packages"] = missing  # expected on the GPU host: all three
    return env


def unpack(archive: Path, work: Path, per_class: int | None) -> Path:
    """Unpack the CIFAR-10 JPEG tarball (or ``per_class`` images of each class) into ``work``;
    returns the image folder (``<root>/train/<class>/*.jpg``). Reused when already complete."""
    root = work / ("cifar10-jpeg" if per_class is None else f"cifar10-jpeg-{per_class}")
    if (root / ".done").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    tmp = work / (root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    counts: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/train/<class>/<file>
            if not member.isfile() or len(parts) != 4 or parts[1] != "train":
                continue
            cls = parts[2]
            if per_class is not None and counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            dest = tmp / "train" / cls / parts[3]
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            dest.write_bytes(src.read())
    tmp.rename(root)
    (root / ".done").touch()
    return root


def ddp_worker(out: Path, device_kind: str, steps: int, batch: int, allreduce_mb: int) -> None:
    """One rank of the DDP check (run under torchrun): NCCL on CUDA, gloo on CPU, even with
    world size 1. After ``steps`` SGD steps on shards of a fixed global batch, rank 0 compares
    the parameters with one process training on the whole batch (LeNet-5: no batch norm, so
    the two must agree), and times an all-reduce."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cnn.models import get_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_kind == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cudnn.allow_tf32 = False  # exact comparison: no TF32 convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    backend = dist.get_backend()
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(steps, batch, 3, 32, 32, generator=gen)
    ys = torch.randint(0, 10, (steps, batch), generator=gen)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return get_model("lenet5", num_classes=10).to(device)

    def run(model: torch.nn.Module, shard: slice) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for s in range(steps):
            x, y = xs[s, shard].to(device), ys[s, shard].to(device)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    b = batch // world
    ddp = DDP(
        build(),
        device_ids=[local] if device.type == "cuda" else None,
        bucket_cap_mb=25,
        gradient_as_bucket_view=True,
    )
    run(ddp, slice(rank * b, (rank + 1) * b))
    # All-reduce: correctness (sum of ranks) and bus bandwidth of a large buffer.
    t = torch.full((1,), float(rank + 1), device=device)
    dist.all_reduce(t)
    sum_ok = float(t.item()) == world * (world + 1) / 2
    buf = torch.ones(allreduce_mb * 2**20 // 4, device=device)
    dist.all_reduce(buf)
    sync(device)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        dist.all_reduce(buf)
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    # ring all-reduce moves 2(n-1)/n of the buffer per rank ("bus bandwidth", as nccl-tests)
    busbw = buf.numel() * 4 * (2 * (world - 1) / world) / dt / 1e9 if world > 1 else None
    if rank == 0:
        ref = build()
        run(ref, slice(0, batch))
        diff = max(
            (a - r).abs().max().item()
            for a, r in zip(ddp.module.parameters(), ref.parameters(), strict=True)
        )
        out.write_text(
            json.dumps(
                {
                    "backend": backend,
                    "world_size": world,
                    "device": str(device),
                    "max_abs_param_diff_vs_one_process": diff,
                    "equal_to_one_process": diff < 1e-4,
                    "all_reduce_sum_ok": sum_ok,
                    "all_reduce_mb": allreduce_mb,
                    "all_reduce_ms": round(dt * 1000, 3),
                    "all_reduce_busbw_gbps": round(busbw, 1) if busbw else None,
                }
            )
        )
    # The DDP wrapper goes before the process group, as in the engine: a DDP reducer outliving
    # its group can hang or abort the process at exit (seen once here as a torchrun timeout).
    del ddp
    dist.barrier()
    dist.destroy_process_group()


def ddp_step(world: int, sizes: Sizes, work: Path) -> Callable[[torch.device], dict[str, Any]]:
    def fn(device: torch.device) -> dict[str, Any]:
        if device.type == "cuda" and torch.cuda.device_count() < world:
            return {"skipped": f"{world} GPUs needed, {torch.cuda.device_count()} visible"}
        out = work / f"ddp-world{world}.json"
        out.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={world}", str(Path(__file__).resolve()), "--ddp-worker", str(out),
            "--worker-device", device.type, "--worker-steps", str(sizes.ddp_steps),
            "--worker-batch", str(sizes.ddp_batch), "--worker-allreduce-mb",
            str(sizes.allreduce_mb),
        ]  # fmt: skip
        code, text, secs = run_logged(cmd, child_env(threads=1), timeout=180)
        if code != 0 or not out.exists():
            raise RuntimeError(f"torchrun exited {code}: {text[-1500:]}")
        result = json.loads(out.read_text())
        if not (result["equal_to_one_process"] and result["all_reduce_sum_ok"]):
            raise AssertionError(f"DDP differs from one process: {result}")
        return {**result, "wall_s": round(secs, 1)}

    return fn


def precision_layout_compile(sizes: Sizes) -> Callable[[torch.device], dict[str, Any]]:
    """Training steps of one model in each precision/layout/compile variant, same data."""

    def fn(device: torch.device) -> dict[str, Any]:
        from cnn.models import get_model

        variants = {
            "fp32": (None, False, False),
            "bf16": (torch.bfloat16, False, False),
            "bf16_channels_last": (torch.bfloat16, True, False),
            "bf16_channels_last_compile": (torch.bfloat16, True, True),
        }
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(sizes.micro_batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (sizes.micro_batch,), generator=gen).to(device)
        out: dict[str, Any] = {
            "model": sizes.micro_model,
            "batch": sizes.micro_batch,
            "compile_backend": sizes.compile_backend,
        }
        for name, (amp, cl, compiled) in variants.items():
            reset_peak(device)
            torch.manual_seed(0)
            model = get_model(sizes.micro_model, num_classes=10).to(device)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            run_model: torch.nn.Module = (
                torch.compile(model, backend=sizes.compile_backend) if compiled else model
            )
            step = train_step_fn(
                run_model, lambda: (x, y), amp=amp, channels_last=cl, device=device
            )
            t0 = time.perf_counter()
            step()  # first call: compilation (when on), cuDNN autotuning
            sync(device)
            first = time.perf_counter() - t0
            ips = timed_steps(step, sizes.micro_steps, warmup=sizes.warmup, device=device)
            out[name] = {
                "images_per_s": round(ips),
                "first_step_s": round(first, 2),
                "peak_memory_mb": peak_mb(device),
            }
            log(f"  {name}: {ips:.0f} img/s (first step {first:.1f} s)")
        base = out["fp32"]["images_per_s"]
        for name in variants:
            out[name]["speedup_vs_fp32"] = round(out[name]["images_per_s"] / max(base, 1), 2)
        return out

    return fn


def memory_loader(prepared: Any, sizes: Sizes) -> Callable[[torch.device], dict[str, Any]]:
    """The in-memory loader on the device: whole splits as uint8 tensors there, one gather and
    the batch augmentation per batch, nothing on the host per step."""

    def fn(device: torch.device) -> dict[str, Any]:
        from cnn.data import build_loaders

        reset_peak(device)
        loaders = build_loaders(
            prepared.path, input_size=32, style="cifar", batch_size=sizes.loader_batch,
            device=device, mode="memory", seed=0,
        )  # fmt: skip
        train = loaders.train
        train.set_epoch(0)
        n, t0 = 0, time.perf_counter()
        for x, y in train:
            if x.device.type != device.type or y.device.type != device.type:
                raise AssertionError(f"batch on {x.device}/{y.device}, expected {device}")
            if x.dtype != torch.float32 or x.shape[1:] != (3, 32, 32):
                raise AssertionError(f"batch {x.dtype} {tuple(x.shape)}")
            n += len(y)
        sync(device)
        secs = time.perf_counter() - t0
        images = getattr(train, "images", None)
        return {
            "mode": loaders.mode,
            "train_tensor_device": str(images.device) if images is not None else None,
            "batches": len(train),
            "images_per_s": round(n / max(secs, 1e-9)),
            "epoch_s": round(secs, 3),
            "peak_memory_mb": peak_mb(device),
        }

    return fn


def decode_jpeg(data_root: Path, sizes: Sizes) -> Callable[[torch.device], dict[str, Any]]:
    """torchvision.io.decode_jpeg on the device (nvJPEG on CUDA) against the CPU decoder."""

    def fn(device: torch.device) -> dict[str, Any]:
        from torchvision.io import decode_jpeg as dec
        from torchvision.io import read_file

        files = sorted((data_root / "train").glob("*/*.jpg"))[: max(sizes.loader_batch, 8)]
        raw = [read_file(str(f)) for f in files]
        cpu = dec(raw)
        t0 = time.perf_counter()
        out = dec(raw, device=device)
        sync(device)
        secs = time.perf_counter() - t0
        diff = max((a.cpu().int() - b.int()).abs().float().mean().item() for a, b in zip(
            out, cpu, strict=True))  # fmt: skip
        if diff > 2.0:
            raise AssertionError(f"{device} decode differs from CPU by {diff:.2f}/255 on average")
        return {
            "images": len(raw),
            "decoder": "nvjpeg" if device.type == "cuda" else "libjpeg",
            "images_per_s": round(len(raw) / max(secs, 1e-9)),
            "mean_abs_diff_vs_cpu": round(diff, 3),
        }

    return fn


def engine_run(
    name: str, model: str, recipe: str | None, overrides: list[str], nproc: int,
    ctx: dict[str, Any], timeout: float,
) -> Callable[[torch.device], dict[str, Any]]:  # fmt: skip
    """One run of the engine as users launch it (``python -m cnn.train`` / torchrun)."""

    def fn(device: torch.device) -> dict[str, Any]:
        from cnn.config import resolve_config

        if device.type == "cuda" and torch.cuda.device_count() < nproc:
            return {"skipped": f"{nproc} GPUs needed, {torch.cuda.device_count()} visible"}
        work: Path = ctx["work"]
        out = work / "runs" / name
        if out.exists():
            shutil.rmtree(out)  # a leftover checkpoint with the same hash would be resumed
        threads = max(1, (os.cpu_count() or 1) // nproc) if device.type == "cpu" else None
        cfg = resolve_config(
            model=model,
            dataset="imagefolder",
            recipe=recipe,
            overrides=[
                f"data_dir={ctx['data_root']}", f"cache_dir={ctx['cache']}", f"output_dir={out}",
                f"device={device.type}", "download=false",
                *(["num_threads=" + str(threads)] if threads else []), *overrides,
            ],
            nproc_per_node=nproc,
        )  # fmt: skip
        run_yaml = cfg.to_yaml(work / f"{name}.yaml")
        if nproc == 1:
            cmd = [sys.executable, "-m", "cnn.train", "--config"]
            cmd.append(str(run_yaml))
        else:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd = [*launch, f"--nproc-per-node={nproc}", "-m", "cnn.train", "--config"]
            cmd.append(str(run_yaml))
        code, text, secs = run_logged(cmd, child_env(threads), timeout)
        result_path = out / "result.json"
        if code != 0 or not result_path.exists():
            why = "timed out" if code == 124 else f"exited {code}"
            raise RuntimeError(f"{name}: cnn.train {why} after {secs:.0f} s: {text[-1500:]}")
        result = json.loads(result_path.read_text())
        hist = result["history"]
        target = cfg.run.target_accuracy
        hit = next((r for r in hist if target is not None and r["val_accuracy"] >= target), None)
        return {
            "recipe": cfg.run.recipe,
            "model": model,
            "world_size": result.get("world_size"),
            "epochs_planned": cfg.optim.epochs,
            "batch_size": cfg.optim.batch_size,
            "precision": cfg.resolved_precision(device.type),
            "channels_last": cfg.perf.channels_last,
            "compile": cfg.perf.compile,
            "target_val_accuracy": target,
            "reached": hit is not None,
            "epoch_reached": hit["epoch"] if hit else None,
            # from the start of cnn.train (data load, model build, every evaluation included)
            "seconds_to_target": round(hit["elapsed_s"], 1) if hit else None,
            "best_val_accuracy": result["best_val_accuracy"],
            "epochs_completed": result["epochs_completed"],
            "train_seconds": round(result["train_seconds"], 1),
            "images_per_s": round(result["images_per_s"]),
            "peak_memory_mb": result.get("peak_memory_mb"),
            "wall_s": round(secs, 1),
            "val_accuracy_per_epoch": [round(r["val_accuracy"], 4) for r in hist],
        }

    return fn


def resnet50_synthetic(sizes: Sizes) -> Callable[[torch.device], dict[str, Any]]:
    def fn(device: torch.device) -> dict[str, Any]:
        from cnn.models import get_model

        reset_peak(device)
        torch.manual_seed(0)
        model = get_model("resnet50", num_classes=1000)
        model = model.to(device, memory_format=torch.channels_last)
        b, s = sizes.r50_batch, sizes.r50_size
        x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (b,), device=device)
        step = train_step_fn(
            model, lambda: (x, y), amp=torch.bfloat16, channels_last=True, device=device
        )
        ips = timed_steps(step, sizes.r50_steps, warmup=sizes.warmup, device=device)
        return {
            "input_size": s, "batch": b, "precision": "bf16", "channels_last": True,
            "images_per_s": round(ips), "peak_memory_mb": peak_mb(device),
        }  # fmt: skip

    return fn


def resnet50_real_data(prepared: Any, sizes: Sizes) -> Callable[[torch.device], dict[str, Any]]:
    """ResNet-50 fed by the product's loaders at 224 px: the prepared images on the device with
    RandomResizedCrop + flip there (``memory``), and the DataLoader-worker path (``stream``)."""

    def fn(device: torch.device) -> dict[str, Any]:
        from cnn.data import build_loaders
        from cnn.models import IMAGENET_MEAN, IMAGENET_STD, get_model

        out: dict[str, Any] = {"input_size": sizes.r50_size, "batch": sizes.r50_batch}
        for mode in ("memory", "stream"):
            reset_peak(device)
            torch.manual_seed(0)
            model = get_model("resnet50", num_classes=10).to(
                device, memory_format=torch.channels_last
            )
            loaders = build_loaders(
                prepared.path, input_size=sizes.r50_size, style="finetune",
                batch_size=sizes.r50_batch, device=device, mode=mode, seed=0,
                num_workers=sizes.stream_workers, normalize=(IMAGENET_MEAN, IMAGENET_STD),
            )  # fmt: skip
            it = _cycle(loaders.train)
            step = train_step_fn(
                model, lambda it=it: next(it), amp=torch.bfloat16, channels_last=True,
                device=device,
            )  # fmt: skip
            ips = timed_steps(step, sizes.r50_steps, warmup=sizes.warmup, device=device)
            out[mode] = {"images_per_s": round(ips), "peak_memory_mb": peak_mb(device)}
            if mode == "stream":
                out[mode]["num_workers"] = sizes.stream_workers
            log(f"  resnet50 via {mode} loader: {ips:.0f} img/s")
        out["shard_store_gpu_jpeg"] = "skipped: no sharded streaming store in this checkout"
        return out

    return fn


def _cycle(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every step at toy size on CPU")
    parser.add_argument(
        "--data-dir", type=Path, default=SHARED_DATA,
        help=f"folder holding {ARCHIVE} (default ../shared/data or $CNNPIPE_SHARED_DATA)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    parser.add_argument("--only", default=None, help="comma-separated step names to run")
    # internal: one rank of the DDP check, launched by torchrun
    parser.add_argument("--ddp-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--worker-steps", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--worker-allreduce-mb", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker is not None:
        ddp_worker(
            args.ddp_worker, args.worker_device, args.worker_steps, args.worker_batch,
            args.worker_allreduce_mb,
        )  # fmt: skip
        return 0
    archive = args.data_dir / ARCHIVE
    if not archive.is_file():
        parser.error(f"{archive} not found; pass --data-dir (the folder holding {ARCHIVE})")

    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # library prints must not corrupt the JSON
        report, failed = run_checks(args, archive)
    print(json.dumps(report.data, indent=2, default=str), file=stdout, flush=True)
    log(f"wrote {report.path}" + (f"; FAILED steps: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def run_checks(args: argparse.Namespace, archive: Path) -> tuple[Report, list[str]]:
    smoke = bool(args.cpu_smoke)
    cuda = torch.cuda.is_available() and not smoke
    sizes = Sizes.for_mode(smoke)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    default_name = f"cpu-smoke-{stamp}.json" if smoke else f"gpu-{stamp}.json"
    out = args.out or REPO / "benchmarks" / "results" / default_name
    work = (args.workdir or Path(tempfile.gettempdir()) / "cnnpipe-gpu-check").resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report = Report(
        out,
        {
            "benchmark": "gpu_check",
            "mode": "cpu-smoke" if smoke else "gpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "target_val_accuracy": TARGET,
            "environment": environment(),
        },
    )
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    only = set(args.only.split(",")) if args.only else None

    def step(name: str, fn: Callable[[torch.device], dict[str, Any]], needs_cuda: bool = True
             ) -> dict[str, Any] | None:  # fmt: skip
        if only is not None and name not in only:
            return None
        return report.step(name, fn, needs_cuda=needs_cuda, cuda=cuda, smoke=smoke)

    ctx: dict[str, Any] = {"work": work, "cache": work / "cache"}

    def prepare(_: torch.device) -> dict[str, Any]:
        from cnn.config import TrainConfig
        from cnn.data import prepare_dataset

        t0 = time.perf_counter()
        root = unpack(archive, work, sizes.per_class)
        unpack_s = time.perf_counter() - t0
        # The engine's own data kwargs, so every engine run below gets a cache hit.
        cfg = TrainConfig().replace(dataset="imagefolder", data_dir=str(root),
                                    cache_dir=str(ctx["cache"]), val_fraction=0.1, seed=0,
                                    download=False)  # fmt: skip
        info = prepare_dataset("imagefolder", **cfg.data_kwargs())
        ctx["data_root"], ctx["prepared"] = root, info
        return {"images_dir": str(root), "unpack_s": round(unpack_s, 1), "splits": info.splits,
                "prepare_s": round(info.seconds, 1), "cache_hit": info.cache_hit}  # fmt: skip

    prep = step("prepare_data", prepare, needs_cuda=False)
    step("ddp_world1", ddp_step(1, sizes, work))
    step("ddp_world2", ddp_step(2, sizes, work))
    step("precision_layout_compile", precision_layout_compile(sizes))
    have_data = prep is not None or "prepared" in ctx
    if have_data:
        step("memory_loader", memory_loader(ctx["prepared"], sizes))
        step("decode_jpeg", decode_jpeg(ctx["data_root"], sizes))
        tiny = ["epochs=1", "batch_size=64", "aug=none", "precision=fp32"]
        step("engine_ddp", engine_run("engine-ddp", "lenet5", "lenet5-cifar10", tiny, 2, ctx, 300))
        target = [f"target_accuracy={TARGET}", *sizes.engine_overrides]
        step(
            "fastest_to_94",
            engine_run("resnet9", "resnet9_cifar", "resnet9_cifar-cifar10", target, 1, ctx,
                       sizes.engine_timeout),
        )  # fmt: skip
        step(
            "resnet18_cifar_to_94",
            engine_run("resnet18", "resnet18_cifar", "resnet18_cifar-cifar10", target, 1, ctx,
                       sizes.engine_timeout),
        )  # fmt: skip
    step("resnet50_synthetic", resnet50_synthetic(sizes))
    if have_data:
        step("resnet50_real_data", resnet50_real_data(ctx["prepared"], sizes))
    report.data["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report.data["failed_steps"] = report.failed
    report.write()
    return report, report.failed


if __name__ == "__main__":
    sys.exit(main())
