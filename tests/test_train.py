"""The training engine in one process: outputs, resume, config-mismatch refusal, NaN stop,
gradient accumulation. Also holds the helpers the torchrun tests (tests/test_torchrun.py) use.

Everything runs on a tiny generated 3-class image folder with LeNet-5, fp32 on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fakedata import make_imagefolder

from cnn.callbacks import FaultInjection
from cnn.checkpoint import load_checkpoint, load_model_from_checkpoint
from cnn.config import TrainConfig
from cnn.evaluate import evaluate
from cnn.train import build_optimizer, build_scheduler, main, param_groups, train

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "wasp")
# 48 train images -> 6 steps per epoch at global batch 8; 15 val and 15 test images, an odd
# count so the eval shards of 2 ranks are unequal (8 + 7) and exactness is really tested.
N_TRAIN, N_EVAL, BATCH = 16, 5, 8
STEPS_PER_EPOCH = len(CLASSES) * N_TRAIN // BATCH


# ------------------------------------------------------------------ helpers (shared)


@pytest.fixture(scope="session", name="tiny_data")
def tiny_data_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A learnable image folder (train/val/test) and a cache dir, made once per session."""
    root = tmp_path_factory.mktemp("tiny")
    images = make_imagefolder(
        root / "images",
        classes=CLASSES,
        n_train=N_TRAIN,
        n_val=N_EVAL,
        n_test=N_EVAL,
        splits=("train", "val", "test"),
    )
    return {"data_dir": str(images), "cache_dir": str(root / "cache")}


def tiny_config(data: dict[str, str], out_dir: Path, **changes: Any) -> TrainConfig:
    """Deterministic, un-augmented LeNet runs, so different launches can be compared exactly."""
    base: dict[str, Any] = {
        "model": "lenet5",
        "dataset": "imagefolder",
        **data,
        "output_dir": str(out_dir),
        "epochs": 2,
        "batch_size": BATCH,
        "lr": 0.02,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "aug": "none",
        "device": "cpu",
        "num_threads": 1,
        "num_workers": 0,
        "loader_mode": "memory",
        "deterministic": True,
        "seed": 0,
    }
    base.update(changes)
    return TrainConfig().replace(**base)


def write_config(cfg: TrainConfig) -> Path:
    return cfg.to_yaml(Path(cfg.run.output_dir).parent / f"{Path(cfg.run.output_dir).name}.yaml")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session, so a hung job can be killed with all its workers."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for a job; on timeout kill its whole process group and fail with its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"job timed out after {timeout}s: {proc.args}\n{out[-4000:]}")
    return proc.returncode, out


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> tuple[int, str]:
    """Run a real job to the end; return (exit code, stdout+stderr)."""
    return finish(start(cmd, env), timeout)


def model_params(out_dir: str | Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(out_dir) / "checkpoints" / name)["model"]


def assert_params_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=f"parameter {k}")


@pytest.fixture(name="torch_globals")
def torch_globals_fixture() -> Any:
    """train() sets process-wide torch state (threads, deterministic mode): restore it."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    matmul = torch.get_float32_matmul_precision()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    torch.set_float32_matmul_precision(matmul)


# ------------------------------------------------------------------ tests


def test_run_outputs_resume_and_mismatch(
    tiny_data: dict, tmp_path: Path, torch_globals: None, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(tiny_data, out, ckpt_interval_steps=4)
    result = train(cfg)
    printed = capsys.readouterr().out
    # One progress line per epoch with every field.
    lines = [ln for ln in printed.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2
    for field in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "img/s", "eta"):
        assert field in lines[0]
    # Output directory contract (docs/internals.md).
    assert TrainConfig.from_yaml(out / "run.yaml") == cfg
    assert (out / "checkpoints" / "last.pt").is_file() and (
        out / "checkpoints" / "best.pt"
    ).is_file()
    saved = json.loads((out / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in (
        "best_val_accuracy", "best_epoch", "epochs_completed", "images_per_s",
        "train_seconds", "resumed_from", "classes", "test", "test_is_val",
    ):  # fmt: skip
        assert key in saved
    assert saved["epochs_completed"] == 2 and saved["classes"] == list(CLASSES)
    assert saved["resumed_from"] is None and saved["test_is_val"] is False
    test = saved["test"]
    assert set(test["per_class_accuracy"]) == set(CLASSES)
    assert sum(map(sum, test["confusion_matrix"])) == len(CLASSES) * N_EVAL
    assert test["top5"] is None  # 3 classes
    assert saved["best_val_accuracy"] > 1 / len(CLASSES)  # it learned something
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    position = last["train_state"]
    assert (position["epoch"], position["step"], position["batch"]) == (2, 2 * STEPS_PER_EPOCH, 0)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    # The best checkpoint rebuilds the model alone, and gives the reported test accuracy.
    model, saved_cfg, meta = load_model_from_checkpoint(out / "checkpoints" / "best.pt")
    assert saved_cfg.model.name == "lenet5" and meta["classes"] == list(CLASSES)
    from cnn.data import build_loaders

    loaders = build_loaders(
        Path(tiny_data["cache_dir"]).glob("imagefolder-*").__next__(),
        input_size=32,
        style="cifar",
        batch_size=BATCH,
        normalize=(meta["mean"], meta["std"]),
    )
    again = evaluate(model, loaders.test, len(CLASSES), device=torch.device("cpu"))
    assert again.accuracy == pytest.approx(test["accuracy"])

    # Restarting a finished run resumes at its end: no training, same result.
    before = (out / "checkpoints" / "last.pt").read_bytes()
    result2 = train(cfg)
    assert f"resumed from {out / 'checkpoints' / 'last.pt'} at epoch 2 step 12" in (
        capsys.readouterr().out
    )
    assert result2["test"] == result["test"]
    assert (out / "checkpoints" / "last.pt").read_bytes() == before

    # Another config in the same output dir is refused, naming both hashes and the fix.
    other = cfg.replace(lr=0.05)
    with pytest.raises(ValueError) as err:
        train(other)
    msg = str(err.value)
    assert cfg.config_hash() in msg and other.config_hash() in msg and "new output_dir" in msg


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tiny_data: dict, tmp_path: Path, torch_globals: None
) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "nan")
    bad_step = STEPS_PER_EPOCH + 2  # in the second epoch, after the epoch-1 checkpoint
    faults = FaultInjection(nan_at_step=bad_step)  # the loop's hook; jobs use CNNPIPE_TEST_*
    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    with pytest.raises(FloatingPointError, match=rf"non-finite loss .* epoch 2 step {bad_step}\b"):
        train(cfg, callbacks=faults)
    good_bytes, good_mtime = last.read_bytes(), last.stat().st_mtime_ns
    state = load_checkpoint(last)
    assert state["train_state"]["step"] == STEPS_PER_EPOCH  # epoch 1's, before the bad step
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # A restart resumes from it, meets the same bad step, and again leaves it untouched.
    with pytest.raises(FloatingPointError, match=rf"epoch 2 step {bad_step}\b"):
        train(cfg, callbacks=faults)
    assert last.read_bytes() == good_bytes and last.stat().st_mtime_ns == good_mtime


def test_grad_accumulation_matches_full_batch(
    tiny_data: dict, tmp_path: Path, torch_globals: None
) -> None:
    """2 micro-batches of 4 with accumulation = one batch of 8 (LeNet has no batch norm)."""
    full = tiny_config(tiny_data, tmp_path / "full", epochs=1)
    accum = tiny_config(tiny_data, tmp_path / "accum", epochs=1, grad_accum=2)
    train(full)
    train(accum)
    assert_params_close(model_params(full.run.output_dir), model_params(accum.run.output_dir))


def test_features_ema_cosine_smoothing_clip_via_cli(
    tiny_data: dict, tmp_path: Path, torch_globals: None
) -> None:
    """The CLI entry point with overrides, and the optional features on together."""
    cfg = tiny_config(tiny_data, tmp_path / "feat", epochs=2, deterministic=False)
    path = write_config(cfg)
    overrides = ["ema=true", "ema_decay=0.9", "schedule=cosine", "warmup_epochs=0.5",
                 "label_smoothing=0.1", "grad_clip=1.0", "optimizer=adamw", "lr=0.003",
                 "aug=cifar", "channels_last=true", "target_accuracy=0.05"]  # fmt: skip
    assert main(["--config", str(path), *overrides]) == 0
    out = Path(cfg.run.output_dir)
    result = json.loads((out / "result.json").read_text())
    assert result["epochs_completed"] == 1  # target_accuracy reached after epoch 1: early stop
    state = load_checkpoint(out / "checkpoints" / "best.pt")
    assert state["ema"] is not None and state["config"]["schedule"]["name"] == "cosine"
    assert TrainConfig.from_yaml(out / "run.yaml").optim.ema is True


def test_no_weight_decay_on_norm_and_bias() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.shape for p in decay["params"]} == {(4, 3, 3, 3), (2, 4)}
    assert len(no_decay["params"]) == 4  # conv bias, bn weight, bn bias, linear bias


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_is_fused_and_steps_like_the_loop(name: str) -> None:
    """CPU parameters get torch's fused kernel (one call for all of them); its update equals
    the per-parameter loop's (torch's CPU default) up to float rounding."""
    torch.manual_seed(0)
    cfg = TrainConfig().replace(optimizer=name, lr=0.05, momentum=0.9, weight_decay=5e-4)
    if name == "sgd":
        cfg = cfg.replace(nesterov=True)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(6, 2)) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(cfg, models[0])
    assert fused.defaults["fused"] is True
    groups = [{**g, "fused": None, "foreach": False} for g in param_groups(models[1], 5e-4)]
    same = ("lr", "momentum", "nesterov", "betas")
    loop = type(fused)(groups, **{k: v for k, v in fused.defaults.items() if k in same})
    x = torch.randn(5, 3, 8, 8)
    for _ in range(3):
        for model, opt in zip(models, (fused, loop), strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epochs", [3, 10])
@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_schedule_adapts_to_epochs(schedule: str, epochs: int) -> None:
    """The same recipe stretches to any epoch count: peak lr reached, ends annealed."""
    cfg = TrainConfig().replace(
        schedule=schedule, epochs=epochs, lr=0.1, warmup_epochs=1, step_size=epochs / 2
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)
    lrs = []
    for _ in range(epochs * 5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(0.1)
    else:
        assert lrs[-1] < 0.05  # annealed by the end, whatever the length
    if schedule != "onecycle":
        assert lrs[0] < 0.01  # linear warmup from 1% of the peak


@pytest.mark.slow
def test_compile_channels_last_one_step(
    tiny_data: dict, tmp_path: Path, torch_globals: None
) -> None:
    """torch.compile (before DDP) and channels_last on CPU: one short epoch trains and saves
    plain (unprefixed) weights."""
    if sys.platform != "linux":
        pytest.skip("inductor on CPU needs a C++ toolchain")
    cfg = tiny_config(
        tiny_data, tmp_path / "compiled", epochs=1, compile=True, channels_last=True,
        deterministic=False, eval_batch_size=len(CLASSES) * N_EVAL,  # one eval shape: 1 compile
    )  # fmt: skip
    result = train(cfg)
    assert result["epochs_completed"] == 1
    keys = model_params(cfg.run.output_dir).keys()
    assert "features.0.weight" in keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_classes": 5}, r"num_classes=5 but dataset 'imagefolder' has 3 classes"),
        ({"batch_size": 64, "grad_accum": 2}, r"train split has 48 images, fewer than one global"),
    ],
)
def test_data_dependent_errors(
    tiny_data: dict, tmp_path: Path, torch_globals: None, changes: dict, match: str
) -> None:
    """Checks that need the prepared data run in the engine before any training step."""
    with pytest.raises(ValueError, match=match):
        train(tiny_config(tiny_data, tmp_path / "bad", **changes))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_a_finished_worker_exits_without_teardown_but_runs_its_exit_hooks(tmp_path: Path) -> None:
    """`python -m cnn.train` ends through `exit_without_teardown`: the exit code it is given,
    atexit hooks run (logging, MLflow flushes), non-daemon threads joined, output flushed."""
    script = (
        "import atexit, sys, threading, time\n"
        "from cnn.train import exit_without_teardown\n"
        "atexit.register(lambda: print('hook ran'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
        "print('buffered', end='')\n"
        "sys.stderr.write('err buffered')\n"
        "exit_without_teardown(3)\n"
        "print('not reached')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 3
    assert proc.stdout == "bufferedthread done\nhook ran\n"
    assert proc.stderr.endswith("err buffered")


def test_a_lenet_worker_on_a_prepared_folder_never_imports_torchvision(
    tiny_data: dict[str, str], tmp_path: Path
) -> None:
    """A LeNet job on the in-memory cache (flip augmentation and flip TTA, the recipe's) needs
    no torchvision: its import (~1.7 s with torch._dynamo) would delay every such job's start."""
    from cnn.data import prepare_dataset

    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=1, aug="flip", tta="flip")
    prepare_dataset(cfg.data.dataset, **cfg.data_kwargs())  # the job then sees a cache hit
    probe = (
        "import sys\nfrom cnn.train import main\n"
        f"main(['--config', {str(write_config(cfg))!r}])\n"
        "print('torchvision imported:', 'torchvision' in sys.modules)\n"
    )
    code, out = run([sys.executable, "-c", probe], env=subprocess_env(PYTHONPATH=str(REPO)))
    assert code == 0, out
    assert "torchvision imported: False" in out
    assert (tmp_path / "run" / "result.json").is_file()
