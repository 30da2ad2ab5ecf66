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
