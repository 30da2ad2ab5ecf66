"""The registered model needs nothing of this project (issue 8, item 2).

A model is logged as a `torch.export` network plus `tasks/served_model.py` (MLflow model from
code). The slow test builds a bare virtual environment with `uv` holding only the locked
mlflow, torch, torchvision, numpy and pillow, loads `models:/NAME@champion` there in a
subprocess (cnnpipe not importable), and serves one with `mlflow models serve --env-manager
local`, POSTing an image to /invocations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from flows_helpers import REPO, log_and_register, tiny_classifier
from servers import ServerProcess, free_port, wait_http_ok

from cnn.export import ImageClassifier
from tasks import mlflow_utils

LOCKED = ("mlflow", "torch", "torchvision", "numpy", "pillow")


def _finetuned_mobilenet(shared_data: Path) -> ImageClassifier:
    """mobilenet_v2 with ImageNet weights (the shared copy when present) and a new 2-class head,
    fine-tuned for two steps so the BatchNorm statistics are its own."""
    weights = shared_data / "mobilenet_v2-imagenet-dequantized.pth"
    clf = tiny_classifier(
        ["ants", "bees"], "mobilenet_v2", str(weights) if weights.is_file() else None
    )
    net = clf.model.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.rand(4, 3, 224, 224, generator=gen), torch.tensor([0, 1, 0, 1])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    clf.eval()
    return clf


def _log_and_register(store: str, name: str, clf: ImageClassifier) -> str:
    reg = log_and_register(store, name, clf)
    assert reg.champion
    return f"models:/{name}@champion"


def test_pyfunc_and_cnnpipe_load_the_same_model(mlflow_store: str) -> None:
    """One logged model, two consumers: MLflow's generic pyfunc (class names + probabilities)
    and `cnnpipe predict/evaluate` (`load_model` -> ImageClassifier); same numbers as the
    eager network for an odd-sized uint8 batch, and the signature says images in."""
    import mlflow

    clf = tiny_classifier(["a", "b", "c"], "lenet5")
    uri = _log_and_register(mlflow_store, "tiny", clf)
    images = np.random.default_rng(1).integers(0, 256, (3, 3, 57, 43), dtype=np.uint8)
    want = clf(torch.from_numpy(images)).detach()

    loaded = mlflow_utils.load_model(uri, mlflow_store)
    assert loaded.classes == ["a", "b", "c"] and loaded.input_size == 32
    torch.testing.assert_close(loaded(torch.from_numpy(images)).detach(), want)
    assert loaded.eval() is loaded  # the exported graph tolerates eval()/train() calls

    pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(images)
    assert list(out.columns) == ["label", "probability", "probabilities"]
    got = torch.tensor([[row[c] for c in "abc"] for row in out["probabilities"]])
    torch.testing.assert_close(got, want)
    assert list(out["label"]) == ["abc"[i] for i in want.argmax(1)]
    info = mlflow.models.get_model_info(uri)
    spec = info.signature.inputs.inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, 3, -1, -1)
    assert [c.name for c in info.signature.outputs.inputs] == list(out.columns)
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert info.metadata["classes"] == ["a", "b", "c"]
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert (local / "artifacts" / "network.pt2").is_file()
    assert not (local / "uv.lock").exists()  # the model does not carry this project's lock
    reqs = (local / "requirements.txt").read_text()
    assert "torch==" in reqs and "cnnpipe" not in reqs


def test_bad_model_uris_name_the_uri(mlflow_store: str) -> None:
    import mlflow

    with pytest.raises(ValueError, match="'models:/nope@champion' was not found"):
        mlflow_utils.load_model("models:/nope@champion", mlflow_store)
    uri = _log_and_register(mlflow_store, "gone", tiny_classifier(["a", "b"], "lenet5"))
    # The registered version's files vanish (a wiped artifact store).
    local = Path(mlflow.MlflowClient(mlflow_store).get_model_version_download_uri("gone", "1"))
    shutil.rmtree(local.as_posix().removeprefix("file://"))
    with pytest.raises(ValueError, match="'models:/gone@champion'"):
        mlflow_utils.load_model(uri, mlflow_store)


# -------------------------------------------------------------------- the bare environment


def _locked_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in LOCKED}


def _bare_env(root: Path) -> tuple[Path, str]:
    """A venv with only the locked mlflow, torch, torchvision, numpy, pillow (transitive
    dependencies pinned to uv.lock). Offline from uv's cache when it can; the registry else."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    constraints = root / "constraints.txt"
    subprocess.run(
        [uv, "export", "--frozen", "--no-hashes", "--no-emit-project", "--format",
         "requirements-txt", "-o", str(constraints)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    venv = root / "bare"
    subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    pins = [f"{p}=={v}" for p, v in _locked_versions().items()]
    cmd = [uv, "pip", "install", "-q", "-p", str(python), "-c", str(constraints), *pins]
    how = "offline"
    if subprocess.run([*cmd, "--offline"], capture_output=True, text=True).returncode != 0:
        how = "registry"
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return python, how


def _bare_run(python: Path, code: str, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_registered_models_load_and_serve_without_cnnpipe(
    mlflow_store: str, tmp_path: Path, shared_data: Path
) -> None:
    models = {
        "lenet5-bare": tiny_classifier(["cat", "dog", "eel"], "lenet5"),
        "resnet18_cifar-bare": tiny_classifier([f"c{i}" for i in range(10)], "resnet18_cifar"),
        "googlenet-bare": tiny_classifier(["x", "y", "z"], "googlenet"),  # auxiliary heads
        "mobilenet_v2-bare": _finetuned_mobilenet(shared_data),
    }
    image = np.random.default_rng(2).integers(0, 256, (1, 3, 71, 53), dtype=np.uint8)
    want = {}
    for name, clf in models.items():
        _log_and_register(mlflow_store, name, clf)
        want[name] = clf(torch.from_numpy(image)).detach()[0].tolist()

    python, how = _bare_env(tmp_path)
    print(f"bare environment installed ({how})", file=sys.stderr)
    work = tmp_path / "elsewhere"
    work.mkdir()
    np.save(work / "image.npy", image)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_store
    out = _bare_run(python, f"""
        import importlib.util, json, sys
        import mlflow, numpy as np
        for pkg in ("cnn", "tasks", "flows"):
            assert importlib.util.find_spec(pkg) is None, f"{{pkg}} must not be importable here"
        image = np.load("image.npy")
        res = {{}}
        for name in {list(models)!r}:
            df = mlflow.pyfunc.load_model(f"models:/{{name}}@champion").predict(image)
            res[name] = df.to_dict(orient="records")[0]
        print(json.dumps(res))
    """, work, env)  # fmt: skip
    got = json.loads(out.strip().splitlines()[-1])
    for name, clf in models.items():
        row = got[name]
        probs = [row["probabilities"][c] for c in clf.classes]
        np.testing.assert_allclose(probs, want[name], rtol=1e-4, atol=1e-5)
        assert row["label"] == clf.classes[int(np.argmax(want[name]))]

    # `mlflow models serve` from the bare environment, then POST an image.
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [str(python.parent / "mlflow"), "models", "serve", "-m",
             "models:/mobilenet_v2-bare@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = ServerProcess("mlflow models serve", proc, log, f"http://127.0.0.1:{port}")
    try:
        wait_http_ok(server, f"{server.url}/ping", timeout=180)
        body = json.dumps({"inputs": image.tolist()}).encode()
        req = urllib.request.Request(
            f"{server.url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            served = json.loads(resp.read())["predictions"][0]
    finally:
        server.stop()
    expected = want["mobilenet_v2-bare"]
    assert served["label"] == ["ants", "bees"][int(np.argmax(expected))]
    np.testing.assert_allclose(
        [served["probabilities"][c] for c in ("ants", "bees")], expected, rtol=1e-4, atol=1e-5
    )
