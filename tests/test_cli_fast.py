"""Issue 9, item 1: a fast command line. `cnnpipe models`, `--help` and the plan step's bad-input
errors import neither torch nor Prefect nor MLflow; the models table they read is kept in step
with the registry here; the plan's recipe choice (made from the table) equals the config's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flows_helpers import REPO, tiny_dataset

from cnn.config import find_recipe
from tasks.plan import build_models_table, models_table, recipe_for

HEAVY = ("torch", "torchvision", "prefect", "mlflow")

# Runs the CLI in a fresh interpreter and reports which heavy packages it imported.
_PROBE = """
import json, sys
from flows.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.__stderr__)
"""


def _probe(args: list[str], cwd: Path) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report["code"], report["heavy"], proc.stdout + proc.stderr


def test_models_table_matches_the_registry() -> None:
    """Regenerate with `uv run python -m tasks.plan` after registering a model."""
    assert build_models_table() == models_table(), (
        "tasks/models_table.json is out of date: run `uv run python -m tasks.plan`"
    )


def test_recipe_from_the_table_equals_the_configs_choice() -> None:
    for model in models_table()["models"]:
        for dataset in ("cifar10", "imagefolder"):
            assert recipe_for(model, dataset) == find_recipe(model, dataset).stem, model


@pytest.mark.parametrize(
    "args",
    [
        ["models"],
        ["models", "resnet*"],
        ["--help"],
        ["train", "--help"],
        ["train", "--model", "lenet6", "--dataset", "cifar10"],
        ["train", "--model", "lenet5", "--dataset", "cifar11"],
        ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "nowhere"],
        ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "data",
         "--batch-size", "999"],
        ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "data",
         "--epochs", "0"],
        ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "data",
         "--set", "lr_max=1"],
        ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "data",
         "--recipe", "nosuch"],
        ["compare", "--models", "lenet5,vgg99", "--dataset", "imagefolder", "--data-dir", "data"],
        ["predict", "--model-uri", "not-a-uri", "x.png"],
        ["evaluate", "--model-uri", "models:/x@champion", "--dataset", "imagefolder",
         "--data-dir", "data", "--split", "test"],
    ],
)  # fmt: skip
def test_fast_paths_import_no_torch_prefect_or_mlflow(tmp_path: Path, args: list[str]) -> None:
    tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    code, heavy, output = _probe(args, tmp_path)
    assert heavy == [], f"{args} imported {heavy}"
    if args[0] == "models" or "--help" in args:
        assert code == 0, output
    else:
        assert code == 2, output
        assert "error: " in output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_models_lists_what_the_registry_has(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["models", "lenet*"]) == 0
    out = capsys.readouterr().out
    assert "lenet5" in out and "62,006" in out and out.strip().endswith("1 models")


# The pipeline's own process up to the job's launch: the flow module and its tasks imported, a
# lenet5 request planned, Prefect's stored prepare result unpickled, the store checked, the
# model built. None of it may import torchvision (~1.6 s with torch._dynamo), which loads in
# the background while the job runs (flows.pipeline.EVALUATE_IMPORTS, REGISTER_IMPORTS).
_LAUNCH_PROBE = """
import json, pickle, sys
import flows.pipeline
from cnn.data.shards import store_exists
from cnn.models import get_model
from tasks.plan import plan_training
from tasks.request import TrainRequest

plan_training(TrainRequest(model="lenet5", dataset="imagefolder", data_dir=sys.argv[1],
                           batch_size=4))
with open(sys.argv[2], "rb") as f:
    info = pickle.load(f)
store_exists(info.path)
get_model("lenet5", num_classes=info.num_classes)
before = "torchvision" in sys.modules
get_model("resnet18", num_classes=3)  # a zoo name registers the zoo on first need
print(json.dumps({"before": before, "after": "torchvision" in sys.modules,
                  "type": type(info).__module__ + "." + type(info).__qualname__}))
"""


def test_the_pipeline_reaches_the_job_without_torchvision(tmp_path: Path) -> None:
    import cloudpickle

    from cnn.data import PreparedInfo

    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    info = PreparedInfo(path=tmp_path / "cache", dataset="imagefolder", classes=["a", "b", "c"],
                        num_classes=3, in_channels=3, resolution=32, splits={"train": 12},
                        test_is_val=True, mean=(0.5,) * 3, std=(0.2,) * 3, source_hash="x",
                        cache_hit=False, seconds=0.0)  # fmt: skip
    blob = tmp_path / "result.pickle"
    blob.write_bytes(cloudpickle.dumps(info))  # as Prefect's pickle serializer stores it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCH_PROBE, str(data), str(blob)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"before": False, "after": True, "type": "cnn.data.info.PreparedInfo"}


def test_cnn_data_names_load_on_first_use() -> None:
    import cnn.data

    assert sorted(cnn.data.__all__) == sorted(cnn.data._MODULE_OF)
    for name in cnn.data.__all__:
        assert getattr(cnn.data, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        cnn.data.no_such_name  # noqa: B018
