"""Real torchrun jobs on CPU (gloo): DDP equivalence, a rank SIGKILLed and resumed, a kill during
a checkpoint write, two torchrun agents forming one 2-node job, and MLflow logging from rank 0.

All jobs share one config (tiny LeNet, deterministic, no augmentation; see tests/test_train.py),
so every variant is compared with the same uninterrupted 2-rank reference run."""

from __future__ import annotations

import json
import random
import socket
import sys
from pathlib import Path

import pytest
from test_train import (
    STEPS_PER_EPOCH,
    assert_params_close,
    finish,
    model_params,
    run,
    start,
    subprocess_env,
    tiny_config,
    tiny_data_fixture,  # noqa: F401  (the `tiny_data` fixture)
    torch_globals_fixture,  # noqa: F401  (the `torch_globals` fixture)
    write_config,
)

from cnn.checkpoint import load_checkpoint
from cnn.train import train

pytestmark = pytest.mark.slow
TIMEOUT = 300
CKPT_EVERY = 4


def torchrun_cmd(nproc: int, config: Path, *launch: str) -> list[str]:
    """`torchrun` as `python -m torch.distributed.run` (the same program, this interpreter)."""
    return [
        sys.executable, "-m", "torch.distributed.run", *launch, "--nproc-per-node", str(nproc),
        "-m", "cnn.train", "--config", str(config),
    ]  # fmt: skip


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), so no outgoing connection can take it
    between this check and torchrun binding it."""
    for port in random.Random().sample(range(20000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


@pytest.fixture(scope="module")
def reference(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-rank run every other job is compared with."""
    cfg = tiny_config(
        tiny_data, tmp_path_factory.mktemp("ref") / "out", ckpt_interval_steps=CKPT_EVERY
    )
    code, log = run(torchrun_cmd(2, write_config(cfg), "--standalone"), timeout=TIMEOUT)
    assert code == 0, log[-4000:]
    assert log.count("epoch 1/2 train_loss") == 1  # progress printed by rank 0 only
    assert "gradient all-reduce: shared memory" in log  # one host: not gloo
    return Path(cfg.run.output_dir)


def test_two_ranks_equal_one_rank(
    reference: Path, tiny_data: dict, tmp_path: Path, torch_globals: None
) -> None:
    """Same global batch on 1 and 2 ranks -> the same parameters and exactly the same
    evaluation counts (the 2-rank eval shards are unequal: 8 + 7 images). The 1-rank run is
    in-process (no launch cost)."""
    cfg = tiny_config(tiny_data, tmp_path / "one", ckpt_interval_steps=CKPT_EVERY)
    train(cfg)
    assert_params_close(model_params(reference), model_params(cfg.run.output_dir), atol=1e-5)
    two = json.loads((reference / "result.json").read_text())
    one = json.loads((Path(cfg.run.output_dir) / "result.json").read_text())
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["test"]["confusion_matrix"] == one["test"]["confusion_matrix"]
    assert two["test"]["accuracy"] == one["test"]["accuracy"]
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=1e-4)
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_sigkilled_rank_resumes_and_mlflow_logs_once(
    reference: Path, tiny_data: dict, tmp_path: Path
) -> None:
    """Rank 1 is SIGKILLed after step 9 (mid epoch 2); torchrun restarts the job, which resumes
    from the step-8 checkpoint and ends with the reference parameters. Rank 0 alone logs to the
    given MLflow run; the restart (and a later re-run) adds no duplicate metric steps."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("engine-test")
    run_id = client.create_run(exp).info.run_id
    cfg = tiny_config(
        tiny_data,
        tmp_path / "fault",
        ckpt_interval_steps=CKPT_EVERY,
        mlflow_run_id=run_id,
        mlflow_tracking_uri=uri,
    )
    kill_step = STEPS_PER_EPOCH + 3  # step 9: epoch 2, one step after the step-8 checkpoint
    env = subprocess_env(CNNPIPE_TEST_KILL_AT_STEP=str(kill_step), CNNPIPE_TEST_KILL_RANK="1")
    cmd = torchrun_cmd(2, write_config(cfg), "--standalone", "--max-restarts", "1")
    code, log = run(cmd, env=env, timeout=TIMEOUT)
    assert code == 0, log[-4000:]
    resumed = [ln for ln in log.splitlines() if "resumed from" in ln]
    assert len(resumed) == 1, log[-4000:]
    assert resumed[0].endswith(f"checkpoints/last.pt at epoch 1 step {2 * CKPT_EVERY}")
    redone = kill_step - 2 * CKPT_EVERY
    assert 0 < redone <= CKPT_EVERY  # at most one checkpoint interval of work repeated
    result = json.loads((Path(cfg.run.output_dir) / "result.json").read_text())
    assert result["resumed_from"].endswith("last.pt") and result["epochs_completed"] == 2
    assert_params_close(model_params(reference), model_params(cfg.run.output_dir), atol=1e-6)

    # The restarted attempt re-logged epoch 1 from its checkpoint history: no duplicate steps.
    def check_mlflow() -> None:
        assert len(client.search_runs([exp])) == 1  # no second run was created
        params = client.get_run(run_id).data.params
        assert params["model.name"] == "lenet5" and params["optim.lr"] == "0.02"
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                    "images_per_s"):  # fmt: skip
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == [1, 2], (key, steps)  # one point per epoch, no duplicates
        assert [m.step for m in client.get_metric_history(run_id, "test_accuracy")] == [2]

    check_mlflow()


def test_kill_during_checkpoint_write(
    reference: Path, tiny_data: dict, tmp_path: Path, torch_globals: None
) -> None:
    """The job dies (SIGKILL) half-way through writing its 2nd checkpoint: the 1st still loads,
    and a re-run (in-process) resumes from it and ends with the reference parameters."""
    cfg = tiny_config(tiny_data, tmp_path / "ksave", ckpt_interval_steps=CKPT_EVERY)
    cmd = [sys.executable, "-m", "cnn.train", "--config", str(write_config(cfg))]
    code, log = run(cmd, env=subprocess_env(CNNPIPE_TEST_KILL_IN_SAVE="2"), timeout=TIMEOUT)
    assert code == -9, log[-4000:]
    ckpts = Path(cfg.run.output_dir) / "checkpoints"
    assert list(ckpts.glob(".last.pt.tmp-*"))  # the partial write that never replaced last.pt
    assert load_checkpoint(ckpts / "last.pt")["train_state"]["step"] == CKPT_EVERY
    assert train(cfg)["resumed_from"] == str(ckpts / "last.pt")
    assert_params_close(model_params(reference), model_params(cfg.run.output_dir), atol=1e-5)


def test_two_torchrun_agents_form_one_job(reference: Path, tiny_data: dict, tmp_path: Path) -> None:
    """Multi-node for real: two agents on 127.0.0.1 (1 process each) meet through c10d
    rendezvous and train as one 2-rank job (gloo all-reduce), matching the standalone 2-rank
    run (shared-memory all-reduce)."""
    cfg = tiny_config(tiny_data, tmp_path / "nodes", ckpt_interval_steps=CKPT_EVERY)
    path = write_config(cfg)
    port = free_port()
    procs = [
        start(
            torchrun_cmd(
                1,
                path,
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "engine-test",
            )  # fmt: skip
        )
        for node in (0, 1)
    ]
    codes, outs = zip(*(finish(p, TIMEOUT) for p in procs), strict=True)
    assert codes == (0, 0), "\n".join(o[-3000:] for o in outs)
    result = json.loads((Path(cfg.run.output_dir) / "result.json").read_text())
    assert result["world_size"] == 2
    assert sum("epoch 2/2 train_loss" in o for o in outs) == 1  # one job, one main rank
    # Two hosts as far as the ranks know: gloo, and the same parameters as shared memory.
    assert sum("gradient all-reduce: gloo (ranks on other hosts" in o for o in outs) == 1
    assert_params_close(model_params(reference), model_params(cfg.run.output_dir), atol=1e-6)
