"""GPU paths (marker `gpu`, skipped cleanly without CUDA) and the checks that keep them runnable
from a CPU machine: the engine needs nothing but torch/torchvision/numpy/PIL/yaml, and
`benchmarks/gpu_check.py --cpu-smoke` runs every step of the GPU check end to end.

Why here: GPU hosts are lent for minutes and have no package registry, so whatever would break
there (an import of prefect/mlflow, a CUDA-only code path) must be caught on CPU first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import (
    CLASSES,
    N_EVAL,
    assert_params_close,
    model_params,
    run,
    subprocess_env,
    tiny_config,
    tiny_data_fixture,  # noqa: F401  (the `tiny_data` fixture)
    torch_globals_fixture,  # noqa: F401  (the `torch_globals` fixture)
    write_config,
)

from cnn.train import train

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"
CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Distributions in pyproject's dependencies that the GPU host does not have, as module names,
# plus what they would pull in. The engine may import none of them, not even lazily on the
# training path.
NOT_ON_GPU_HOST = ("prefect", "mlflow", "pydantic", "matplotlib", "litdata", "streaming",
                   "psutil", "pynvml", "boto3", "pandas", "sklearn")  # fmt: skip

# Hides installed packages exactly as if they were absent: the path finder on sys.meta_path is
# wrapped so that it finds nothing for them (importlib.util.find_spec returns None, an import
# raises ModuleNotFoundError), which is what optional-dependency probes in torch expect.
BLOCKER = textwrap.dedent(
    """
    import importlib.machinery, sys
    BLOCKED = {blocked!r}
    class HideBlocked(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return super().find_spec(name, path, target)
    sys.meta_path[:] = [HideBlocked if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
    """
)


def test_engine_trains_without_prefect_mlflow_or_pydantic(tiny_data: dict, tmp_path: Path) -> None:
    """`cnn/` imports nothing beyond the GPU host's packages, at module level or on the
    training path: import every engine module and train one epoch with them blocked."""
    cfg = tiny_config(tiny_data, tmp_path / "bare", epochs=1)
    code = BLOCKER.format(blocked=NOT_ON_GPU_HOST) + textwrap.dedent(
        f"""
        import cnn.checkpoint, cnn.config, cnn.data, cnn.dist, cnn.evaluate, cnn.export
        import cnn.models, cnn.tracking, cnn.train
        from cnn.config import TrainConfig
        from cnn.train import train
        result = train(TrainConfig.from_yaml({str(write_config(cfg))!r}))
        assert result["epochs_completed"] == 1
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not bad, bad
        print("ENGINE-OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=subprocess_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0 and "ENGINE-OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]


def test_blocker_really_blocks(tmp_path: Path) -> None:
    """The finder above hides a package that is installed here."""
    code = BLOCKER.format(blocked=("prefect",)) + "import prefect\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'prefect'" in proc.stderr


@pytest.mark.slow
@pytest.mark.data
def test_gpu_check_cpu_smoke_runs_every_step(tmp_path: Path, shared_data: Path) -> None:
    """`gpu_check.py --cpu-smoke` passes end to end: one JSON object on stdout, the same in the
    file, every step present; CUDA steps say "skipped: no CUDA" and ran on CPU at toy size."""
    out = tmp_path / "gpu.json"
    code, text = run(
        [sys.executable, str(GPU_CHECK), "--cpu-smoke", "--data-dir", str(shared_data),
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        env=subprocess_env(CUDA_VISIBLE_DEVICES=""),
        timeout=900,
    )  # fmt: skip
    assert code == 0, text[-6000:]
    report = json.loads(out.read_text())
    start = text.index('{\n  "benchmark": "gpu_check"')
    printed, _ = json.JSONDecoder().raw_decode(text[start:])
    assert printed == report
    assert report["mode"] == "cpu-smoke" and report["failed_steps"] == []
    steps = report["steps"]
    expected = {
        "prepare_data", "ddp_world1", "ddp_world2", "precision_layout_compile", "memory_loader",
        "decode_jpeg", "engine_ddp", "fastest_to_94", "resnet18_cifar_to_94",
        "resnet50_synthetic", "resnet50_real_data",
    }  # fmt: skip
    assert set(steps) == expected
    assert steps["prepare_data"]["status"] == "ok"
    for name in expected - {"prepare_data"}:
        assert steps[name]["status"] == "skipped: no CUDA", name
        assert steps[name]["cpu_smoke"]["status"] == "ok", (name, steps[name])
    smoke = {name: steps[name]["cpu_smoke"] for name in expected - {"prepare_data"}}
    assert smoke["ddp_world2"]["equal_to_one_process"] and smoke["ddp_world2"]["world_size"] == 2
    variants = smoke["precision_layout_compile"]
    assert all(variants[v]["images_per_s"] > 0 for v in ("fp32", "bf16_channels_last_compile"))
    assert smoke["engine_ddp"]["world_size"] == 2
    assert smoke["fastest_to_94"]["epochs_completed"] == 1
    assert smoke["resnet50_real_data"]["stream"]["images_per_s"] >= 0


# ------------------------------------------------------------------ on a GPU (marker `gpu`)


def _ddp_worker(nproc: int, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(nproc), str(GPU_CHECK), "--ddp-worker", str(out), "--worker-device", "cuda",
    ]  # fmt: skip
    code, text = run(cmd, timeout=300)
    assert code == 0, text[-4000:]
    return json.loads(out.read_text())


@pytest.mark.gpu
@needs_cuda
def test_nccl_ddp_equals_one_rank(tiny_data: dict, tmp_path: Path, torch_globals: None) -> None:
    """DDP over NCCL (world size 1, and 2 when two GPUs are visible) gives the parameters of one
    process on the whole batch; with two GPUs the engine's 2-rank run equals its 1-rank run."""
    for world in sorted({1, min(2, GPUS)}):
        result = _ddp_worker(world, tmp_path / f"ddp{world}.json")
        assert result["backend"] == "nccl" and result["world_size"] == world
        assert result["equal_to_one_process"] and result["all_reduce_sum_ok"], result
    if GPUS < 2:
        return
    # The engine itself on 2 GPUs. Not deterministic mode (torch has no deterministic CUDA
    # kernel for some losses/pools) and TF32 convolutions may pick other algorithms per batch
    # size, so agreement is to TF32 rounding; the exact NCCL check is the worker's above.
    two = tiny_config(tiny_data, tmp_path / "two", device="cuda", deterministic=False)
    code, text = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "cnn.train", "--config", str(write_config(two))], timeout=300,
    )  # fmt: skip
    assert code == 0, text[-4000:]
    one = tiny_config(tiny_data, tmp_path / "one", device="cuda", deterministic=False)
    train(one)
    assert_params_close(
        model_params(two.run.output_dir), model_params(one.run.output_dir), atol=5e-3
    )


@pytest.mark.gpu
@needs_cuda
def test_bf16_compile_channels_last_train_on_cuda(
    tiny_data: dict, tmp_path: Path, torch_globals: None
) -> None:
    """bf16 autocast + channels_last + torch.compile (Inductor/Triton) train an epoch on the GPU
    and save plain weights; peak GPU memory is reported."""
    cfg = tiny_config(
        tiny_data, tmp_path / "gpu", device="cuda", epochs=1, precision="bf16", compile=True,
        channels_last=True, deterministic=False, eval_batch_size=len(CLASSES) * N_EVAL,
    )  # fmt: skip
    result = train(cfg)
    assert result["epochs_completed"] == 1 and result["peak_memory_mb"] > 0
    keys = model_params(cfg.run.output_dir).keys()
    assert "features.0.weight" in keys and not any("_orig_mod" in k for k in keys)
    eager = train(cfg.replace(compile=False, output_dir=str(tmp_path / "eager")))
    assert eager["epochs_completed"] == 1


@pytest.mark.gpu
@needs_cuda
def test_memory_loader_on_cuda(tiny_data: dict, tmp_path: Path) -> None:
    """The in-memory loader keeps the splits on the GPU and augments there; its batches equal
    the CPU loader's (the randomness is drawn on the CPU from the same per-batch seeds)."""
    from cnn.data import build_loaders, prepare_dataset

    info = prepare_dataset("imagefolder", **tiny_config(tiny_data, tmp_path).data_kwargs())
    kw = {"input_size": 32, "style": "cifar", "batch_size": 8, "mode": "memory", "seed": 3}
    gpu = build_loaders(info.path, device="cuda", **kw)
    cpu = build_loaders(info.path, device="cpu", **kw)
    for loader in (gpu.train, cpu.train):
        loader.set_epoch(1)
    n = 0
    for (xg, yg), (xc, yc) in zip(gpu.train, cpu.train, strict=True):
        assert xg.is_cuda and yg.is_cuda
        torch.testing.assert_close(xg.cpu(), xc, atol=1e-5, rtol=1e-5)
        assert torch.equal(yg.cpu(), yc)
        n += len(yg)
    assert n == len(gpu.train) * 8
    seen = sum(len(y) for _, y in gpu.val)
    assert seen == gpu.val.num_samples
