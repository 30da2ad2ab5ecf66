"""Real torchrun jobs on the shard store: a rank SIGKILLed mid-epoch resumes without repeating or
skipping a sample (counted per sample), and evaluation stays exact under DDP."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from fakedata import make_imagefolder
from test_torchrun import torchrun_cmd
from test_train import run, subprocess_env, write_config

from cnn.config import TrainConfig
from cnn.data import prepare_dataset

pytestmark = pytest.mark.slow
N_TRAIN, BATCH, CKPT_EVERY = 40, 8, 4  # 3 classes x 40 = 120 train images -> 15 steps/epoch
STEPS = 3 * N_TRAIN // BATCH


def _config(root: Path, out: Path, **changes) -> TrainConfig:
    data = make_imagefolder(
        root / "images",
        classes=("a", "b", "c"),
        n_train=N_TRAIN,
        n_val=5,
        n_test=5,
        size=(40, 80),
        formats=("jpg",),
        splits=("train", "val", "test"),
    )
    base = dict(
        model="lenet5",
        dataset="imagefolder",
        data_dir=str(data),
        cache_dir=str(root / "cache"),
        output_dir=str(out),
        epochs=2,
        batch_size=BATCH,
        lr=0.02,
        aug="finetune",
        storage="shards",
        image_cap=48,
        device="cpu",
        num_threads=1,
        num_workers=1,
        seed=0,
        ckpt_interval_steps=CKPT_EVERY,
    )
    base.update(changes)
    return TrainConfig().replace(**base)


def test_killed_rank_resumes_without_repeating_or_skipping_samples(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tmp_path / "out")
    info = prepare_dataset("imagefolder", **cfg.data_kwargs())  # the job gets a cache hit
    assert info.storage == "shards"
    trace = tmp_path / "trace"
    kill_step = STEPS + 6  # epoch 2, after its step 6; the last checkpoint is at global step 20
    env = subprocess_env(
        CNNPIPE_TEST_KILL_AT_STEP=str(kill_step),
        CNNPIPE_TEST_KILL_RANK="1",
        CNNPIPE_TEST_TRACE_SAMPLES=str(trace),
    )
    cmd = torchrun_cmd(2, write_config(cfg), "--standalone", "--max-restarts", "1")
    code, log = run(cmd, env=env, timeout=300)
    assert code == 0, log[-4000:]
    assert sum("resumed from" in ln for ln in log.splitlines()) == 1, log[-4000:]

    # Per rank and epoch: the first attempt's batches before the resume point, then the second
    # attempt's batches from it. Together they must be every sample of the epoch exactly once.
    used: dict[int, list[int]] = defaultdict(list)
    for rank in (0, 1):
        recs = [json.loads(ln) for ln in (trace / f"rank{rank}.jsonl").read_text().splitlines()]
        second = [r for r in recs if r["attempt"] == 1]
        assert second, "the restarted attempt trained nothing"
        resume = (second[0]["epoch"], second[0]["batch"])
        assert resume == (1, 20 - STEPS)  # from the step-20 checkpoint: epoch 2, batch 5
        first = [r for r in recs if r["attempt"] == 0 and (r["epoch"], r["batch"]) < resume]
        done = {(r["epoch"], r["batch"]) for r in first}
        assert done == {(e, b) for e in range(2) for b in range(STEPS) if (e, b) < resume}
        for r in first + second:
            used[r["epoch"]].extend(r["idx"])
    for epoch in (0, 1):
        assert sorted(used[epoch]) == list(range(STEPS * BATCH)), f"epoch {epoch}"

    result = json.loads((Path(cfg.run.output_dir) / "result.json").read_text())
    assert result["epochs_completed"] == 2 and result["world_size"] == 2
    assert sum(sum(row) for row in result["test"]["confusion_matrix"]) == 15  # every test image
    ckpt_meta = result.get("data_config") or {}
    assert not ckpt_meta or ckpt_meta["input_size"] == 32
