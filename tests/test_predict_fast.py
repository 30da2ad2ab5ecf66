"""A registered model of the local SQLite store loads without MLflow (issue 9, item 1).

`cnnpipe predict --model-uri models:/NAME@champion` reads the alias and the version's folder
from mlflow.db with the stdlib and loads the exported network from that folder
(`mlflow_utils.load_local_model`), instead of importing MLflow, opening its SQLAlchemy stores
and copying the model through `mlflow.pyfunc`. These tests hold it to MLflow's own answers on
a real store: the same folder for every URI MLflow resolves, MLflow's route (and its errors)
for every URI it does not, and the same predictions bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flows_helpers import REPO, cli_env, cnnpipe, log_and_register, tiny_classifier
from PIL import Image

from tasks import mlflow_utils


def _mlflow_dir(store: str, model_uri: str) -> Path | None:
    """The folder MLflow itself resolves `model_uri` to in `store` (what its
    ModelsArtifactRepository downloads from), or None when it names nothing."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    c = mlflow.MlflowClient(store, registry_uri=store)
    try:
        found = get_model_name_and_version(c, model_uri)
        if len(found) == 1:
            location = c.get_logged_model(found[0]).artifact_location
        else:
            location = c.get_model_version_download_uri(*found)
    except MlflowException:
        return None
    return Path(location.removeprefix("file://"))


def test_local_resolution_matches_mlflow(mlflow_store: str) -> None:
    """Every models:/ form either resolves to MLflow's folder or is left to MLflow (None):
    aliases, versions, a moved alias, a deleted version, unknown names, other URI forms."""
    import mlflow

    c = mlflow.MlflowClient(mlflow_store)
    log_and_register(mlflow_store, "tiny", tiny_classifier(["a", "b"], "lenet5"))
    log_and_register(mlflow_store, "tiny", tiny_classifier(["a", "b"], "lenet5"), 0.4)
    c.set_registered_model_alias("tiny", "staging", "2")
    c.set_registered_model_alias("tiny", "champion", "2")  # the alias moves: 1 -> 2
    v1 = _mlflow_dir(mlflow_store, "models:/tiny/1")
    v2 = _mlflow_dir(mlflow_store, "models:/tiny/2")
    assert v1 is not None and v2 is not None and v1 != v2
    assert mlflow_utils.registered_model_dir("models:/tiny@champion", mlflow_store) == v2
    assert mlflow_utils.registered_model_dir("models:/tiny@staging", mlflow_store) == v2
    assert mlflow_utils.registered_model_dir("models:/tiny/1", mlflow_store) == v1
    # Forms MLflow resolves by other rules than alias/version are MLflow's.
    logged_id = c.get_model_version("tiny", "1").source  # models:/m-...
    other = ("models:/tiny/latest", "models:/tiny@latest", "models:/tiny/None", logged_id,
             "runs:/abc/model", "models:/tiny@", "models://profile/tiny/1")  # fmt: skip
    for uri in other:
        assert mlflow_utils.registered_model_dir(uri, mlflow_store) is None, uri
    # Names and aliases that do not exist, and a deleted version (MLflow keeps its row).
    c.delete_model_version("tiny", "2")
    for uri in ("models:/tiny/2", "models:/tiny@staging", "models:/tiny@champion",
                "models:/ghost@champion", "models:/ghost/1", "models:/tiny/3"):  # fmt: skip
        assert _mlflow_dir(mlflow_store, uri) is None, uri
        assert mlflow_utils.registered_model_dir(uri, mlflow_store) is None, uri
    assert mlflow_utils.registered_model_dir("models:/tiny/1", mlflow_store) == v1


def test_local_load_equals_the_mlflow_route(mlflow_store: str) -> None:
    """The same classifier (classes, sizes, info) and the same numbers, bit for bit, as
    `mlflow.pyfunc` on a copy of the model; no file is written into the store."""
    clf = tiny_classifier(["cat", "dog", "eel"], "lenet5")
    log_and_register(mlflow_store, "tiny", clf)
    folder = mlflow_utils.registered_model_dir("models:/tiny@champion", mlflow_store)
    assert folder is not None
    files_before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    fast = mlflow_utils.load_local_model("models:/tiny@champion", mlflow_store)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == files_before
    slow = mlflow_utils.load_model("models:/tiny@champion", mlflow_store, local=False)
    assert fast is not None
    assert type(fast) is type(slow) and type(fast.model) is type(slow.model)
    for attr in ("classes", "input_size", "resize_size", "in_channels", "info"):
        assert getattr(fast, attr) == getattr(slow, attr), attr
    images = torch.from_numpy(
        np.random.default_rng(3).integers(0, 256, (4, 3, 61, 47), dtype=np.uint8)
    )
    assert torch.equal(fast(images), slow(images))
    assert fast.topk(images[0], k=3) == slow.topk(images[0], k=3)
    # `load_model` takes the local route by default: the same numbers again.
    assert torch.equal(
        mlflow_utils.load_model("models:/tiny/1", mlflow_store)(images), slow(images)
    )


def test_other_registries_and_workspaces_take_mlflows_route(
    mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    log_and_register(mlflow_store, "tiny", tiny_classifier(["a", "b"], "lenet5"))
    uri = "models:/tiny@champion"
    assert mlflow_utils.registered_model_dir(uri, mlflow_store) is not None
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:////elsewhere/registry.db")
    assert mlflow_utils.registered_model_dir(uri, mlflow_store) is None
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    mlflow.set_registry_uri("sqlite:////elsewhere/registry.db")  # set in this process
    try:
        assert mlflow_utils.registered_model_dir(uri, mlflow_store) is None
    finally:
        mlflow.set_registry_uri(None)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI")  # set_registry_uri exports it too
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "true")
    assert mlflow_utils.registered_model_dir(uri, mlflow_store) is None
    monkeypatch.delenv("MLFLOW_ENABLE_WORKSPACES")
    # A model that is not cnnpipe's served model (no exported network): MLflow's route.
    folder = mlflow_utils.registered_model_dir(uri, mlflow_store)
    assert folder is not None
    (folder / "artifacts" / "network.pt2").rename(folder / "network.moved")
    assert mlflow_utils.load_local_model(uri, mlflow_store) is None


def test_cli_predict_on_the_local_store_imports_no_mlflow(
    mlflow_store: str, tmp_path: Path
) -> None:
    """`cnnpipe predict` in a fresh process (the store in its cwd, no MLflow settings) prints
    what MLflow's route computes, and never imports mlflow or SQLAlchemy."""
    clf = tiny_classifier(["cat", "dog", "eel"], "lenet5")
    log_and_register(mlflow_store, "tiny", clf)
    image = tmp_path / "x.png"
    pixels = np.random.default_rng(4).integers(0, 256, (45, 38, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    slow = mlflow_utils.load_model("models:/tiny@champion", mlflow_store, local=False)
    from cnn.export import load_image

    want = [[label, p] for label, p in slow.topk(load_image(image), k=3)[0]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    code = (
        "import json, sys\n"
        "from flows.cli import main\n"
        "code = main(['predict', '--model-uri', 'models:/tiny@champion', '--topk', '3',"
        " '--json', sys.argv[1]])\n"
        "heavy = sorted(m for m in ('mlflow', 'sqlalchemy', 'alembic', 'pandas', 'prefect')"
        " if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(image)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    assert status == {"code": 0, "heavy": []}
    (result,) = json.loads(proc.stdout)
    assert [[p["label"], p["probability"]] for p in result["predictions"]] == want


def test_cli_predict_as_a_flow_on_the_embedded_prefect_api(
    mlflow_store: str, tmp_path: Path
) -> None:
    """`cnnpipe predict --flow` with no Prefect server configured: the console script starts
    Prefect's embedded API itself (flows/prefect_api.py), the predictions come from the
    "batch-predict" flow run, and they equal the plain function's."""
    log_and_register(mlflow_store, "tiny", tiny_classifier(["cat", "dog", "eel"], "lenet5"))
    image = tmp_path / "x.png"
    pixels = np.random.default_rng(5).integers(0, 256, (40, 33, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    env = cli_env(tmp_path / "prefect-home")
    runs = {}
    for mode in ([], ["--flow"]):
        proc = subprocess.run(
            cnnpipe("predict", *mode, "--model-uri", "models:/tiny@champion", "--json",
                    str(image)),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[tuple(mode)] = (json.loads(proc.stdout), proc.stderr)
    assert runs[("--flow",)][0] == runs[()][0]
    flow_log = runs[("--flow",)][1]
    assert "Beginning flow run" in flow_log and "batch-predict" in flow_log
    assert "Finished in state Completed" in flow_log
    assert "Beginning flow run" not in runs[()][1]
    assert (tmp_path / "prefect-home" / "prefect.db").is_file()  # the embedded server's store
