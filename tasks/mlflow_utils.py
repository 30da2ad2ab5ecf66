"""MLflow side of the pipeline: tracking URI, fail-fast connectivity, runs and model logging
(registering a version and the `champion` rule are `tasks.registry`'s). Plain functions (the
Prefect tasks wrap them); mlflow is imported lazily so the CLI's fast paths do not pay for it.

Local default: `sqlite:///<cwd>/mlflow.db` (see `cnn.tracking.tracking_uri`), which `mlflow ui`
started in the same folder shows. SQLite needs care with several pipelines at once: creating the
schema is not safe to race (two processes both run the migrations and one fails), and two
processes moving the alias could interleave. Both happen under an exclusive file lock next to the
database file (`store_lock`); ordinary writes rely on SQLite's own locking.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cnn.tracking import sqlite_database
from cnn.tracking import tracking_uri as _default_tracking_uri

DEFAULT_EXPERIMENT = "cnnpipe"


class TrackingUnavailableError(ConnectionError):
    """The MLflow tracking store cannot be reached; raised before any training starts."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit value, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (one rule,
    shared with the training engine's tracker)."""
    return _default_tracking_uri(uri)


def experiment_name(name: str | None = None) -> str:
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store (None: a server, or an in-memory store)."""
    raw = sqlite_database(uri)
    return Path(raw) if raw and raw != ":memory:" else None


def store_exists(uri: str) -> bool:
    """False only for a local SQLite store whose file is not there yet (servers: True)."""
    path = _sqlite_path(uri)
    return path is None or path.exists()


def create_deferred_store(uri: str) -> None:
    """Create the new local store that `check_tracking(defer_new=True)` left for the run (a
    no-op when the store exists: that call checked it already)."""
    if not store_exists(uri):
        check_tracking(uri)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive cross-process lock for a local SQLite store (no-op for servers)."""
    from tasks.common import file_lock

    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        yield


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> str:
    """A tracking server answers its health check within `timeout` seconds (stdlib only, so
    the CLI can ask before importing mlflow). Raises TrackingUnavailableError with the fix,
    instead of MLflow's minutes of HTTP retries after training has already run."""
    uri = resolve_tracking_uri(uri)
    if urlparse(uri).scheme in ("http", "https"):
        from tasks.common import health_problem

        problem = health_problem(uri.rstrip("/") + "/health", timeout)
        if problem is not None:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({problem}); start it (see "
                "infra/README.md) or unset MLFLOW_TRACKING_URI to use the local "
                "sqlite:///mlflow.db store"
            )
    return uri


def check_tracking(
    uri: str | None = None, timeout: float = 5.0, create: bool = True, defer_new: bool = False
) -> str:
    """Make sure the tracking store answers (and, for SQLite, has its schema) and make it the
    process default. With `create=False` (read-only commands) a missing local store is an error
    rather than a new empty database; with `defer_new` it is left to be created by a later call
    (when the run starts), so a run that fails before it (bad images) leaves no store behind."""
    uri = check_reachable(uri, timeout)
    path = _sqlite_path(uri)
    if path is not None and not path.exists():
        if not create:
            raise TrackingUnavailableError(
                f"no MLflow store at {path} (nothing was trained or registered here yet); run "
                "`cnnpipe train` in this folder first, or set MLFLOW_TRACKING_URI"
            )
        if defer_new:
            from tasks.plan import check_tracking_destination

            return check_tracking_destination(uri)  # its folder is there and writable
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with store_lock(uri):  # first contact creates/migrates the schema: never concurrently
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        raise TrackingUnavailableError(f"MLflow tracking store {uri} is unusable: {exc}") from None
    mlflow.set_tracking_uri(uri)  # mlflow.register_model & co. use the process default
    return uri


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a block."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def client(uri: str | None = None) -> Any:
    import mlflow

    return mlflow.MlflowClient(resolve_tracking_uri(uri))


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI opens on training runs, not GenAI
REPO_ROOT = Path(__file__).resolve().parents[1]


def get_or_create_experiment(name: str | None = None, uri: str | None = None) -> str:
    """Experiment id by name, marked as a model-training experiment (MLflow 3's UI otherwise
    opens a new experiment on the GenAI overview); creating it is race-safe (two pipelines may
    start together)."""
    from mlflow.exceptions import MlflowException

    c, name = client(uri), experiment_name(name)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by another process
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            return exp_id
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_tags(entrypoint: str = "cnnpipe") -> dict[str, str]:
    """MLflow's system tags for where a run came from: source name and type, the git commit
    (with `-dirty` noted separately) and branch, and the user."""
    import getpass

    tags = {"mlflow.source.name": entrypoint, "mlflow.source.type": "JOB"}
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
        if branch := _git("rev-parse", "--abbrev-ref", "HEAD"):
            tags["mlflow.source.git.branch"] = branch
        if remote := _git("config", "--get", "remote.origin.url"):
            tags["mlflow.source.git.repoURL"] = remote
    return tags


def start_run(
    run_name: str,
    *,
    experiment: str | None = None,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    description: str | None = None,
    params: dict[str, Any] | None = None,
    uri: str | None = None,
) -> str:
    """Create a run (RUNNING) with source/git tags, a description (the UI's run notes) and
    optional params; return its id. The training job logs into it by id."""
    from mlflow.entities import Param

    all_tags = {**source_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if description:
        all_tags["mlflow.note.content"] = description
    c = client(uri)
    run = c.create_run(get_or_create_experiment(experiment, uri), run_name=run_name, tags=all_tags)
    if params:
        batch = [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
        c.log_batch(run.info.run_id, params=batch)
    return run.info.run_id


FLOW_RUN_TAG = "prefect.flow_run_id"
FLOW_TAG = "cnnpipe.flow"
CONFIG_HASH_TAG = "config_hash"


class ConfigChangedError(ValueError):
    """A retried flow run would train with another config than its first attempt."""


def find_flow_run_run(
    flow_run_id: str, flow: str, *, experiment: str | None = None, uri: str | None = None
) -> Any:
    """The MLflow run an earlier attempt of this Prefect flow run created, or None. A retried
    or rescheduled flow run (`prefect flow-run retry`, a crashed worker, flow retries) keeps
    its id, so this finds its run, and with it its output directory and checkpoints."""
    if not flow_run_id:
        return None
    c = client(uri)
    found = c.search_runs(
        [get_or_create_experiment(experiment, uri)],
        filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and tags.`{FLOW_TAG}` = '{flow}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return found[0] if found else None


def reopen_run(
    run: Any, config_hash: str, *, tags: dict[str, Any] | None = None, uri: str | None = None
) -> str:
    """Continue an earlier attempt's run: refuse when the config changed (its checkpoints
    belong to the other config and must not be overwritten), else mark it RUNNING again with
    fresh owner tags. Returns the run id."""
    old = run.data.tags.get(CONFIG_HASH_TAG)
    if old and old != config_hash:
        raise ConfigChangedError(
            f"this flow run's earlier attempt trained with config hash {old} (MLflow run "
            f"{run.info.run_id}, output {run.data.tags.get('output_dir', '?')}); this attempt has "
            f"config hash {config_hash}. Refusing to resume or overwrite its checkpoints: start a "
            "new flow run for the new config"
        )
    c = client(uri)
    c.update_run(run.info.run_id, status="RUNNING")
    for key, value in (tags or {}).items():
        c.set_tag(run.info.run_id, key, str(value))
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    client(uri).set_terminated(run_id, status=status)


def log_metrics(run_id: str, metrics: dict[str, float | None], uri: str | None = None) -> None:
    """Log finite metrics in one batch."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and v == v]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


def log_dataset(run_id: str, info: Any, identity: Any, uri: str | None = None) -> None:
    """Record the training data as the run's input (the UI's Dataset column): name, source
    (folder path or torchvision download), content digest and split sizes as its profile."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = identity.folder or f"torchvision:{info.dataset}"
    dataset = Dataset(
        name=identity.name,
        digest=str(info.source_hash)[:36],
        source_type="local" if identity.folder else "code",
        source=json.dumps({"uri": source}),
        profile=json.dumps(
            {
                "splits": dict(info.splits),
                "num_classes": len(info.classes),
                "resolution": info.resolution,
                "evaluation": identity.eval_split,
            }
        ),
    )
    tags = [InputTag("mlflow.data.context", "training")]
    client(uri).log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])


def log_model_metrics(
    run_id: str,
    model_uri: str,
    metrics: dict[str, float | None],
    *,
    dataset: Any = None,
    step: int = 0,
    uri: str | None = None,
) -> None:
    """Log `metrics` linked to the logged model (`model_id`) and the evaluation dataset, so
    `mlflow.search_logged_models(order_by=[{"field_name": "metrics.test_accuracy",
    "ascending": False}])` ranks models and the model page shows them."""
    import time

    from mlflow.entities import Metric

    model_id = model_uri.removeprefix("models:/")
    c = client(uri)
    logged = c.get_logged_model(model_id)
    if any(m.key in metrics for m in (logged.metrics or [])):
        return  # a retried task: already linked
    now = int(time.time() * 1000)
    name = getattr(dataset, "name", None)
    digest = str(getattr(dataset, "source_hash", ""))[:36] or None
    if name is None or digest is None:  # MLflow wants both or neither
        name = digest = None
    batch = [
        Metric(k, float(v), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
        for k, v in metrics.items()
        if v is not None and v == v
    ]
    if batch:
        c.log_batch(run_id, metrics=batch)


def run_url(run_id: str, uri: str | None = None) -> str:
    """The run's page in the MLflow UI: the tracking server itself, else MLFLOW_UI_URL, else
    what `mlflow ui` serves by default next to a local store."""
    uri = resolve_tracking_uri(uri)
    base = uri if urlparse(uri).scheme in ("http", "https") else None
    base = (base or os.environ.get("MLFLOW_UI_URL") or "http://127.0.0.1:5000").rstrip("/")
    exp = client(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{exp}/runs/{run_id}"


def log_run_files(run_id: str, output_dir: str | Path, uri: str | None = None) -> None:
    """The run's resolved config and result as artifacts (what reproduces and explains it)."""
    c = client(uri)
    for name in ("run.yaml", "result.json", "train.log"):
        path = Path(output_dir) / name
        if path.is_file():
            c.log_artifact(run_id, str(path), "run")


# -------------------------------------------------------------------- model logging


def _pip_requirements() -> list[str]:
    """Pinned from the running environment: MLflow's own inference would load the model in a
    subprocess to find them, which costs seconds on every registration."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "torchvision", "numpy", "pillow", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


SERVED_MODEL_FILE = Path(__file__).with_name("served_model.py")


def model_signature(in_channels: int, classes: list[str] | None = None) -> Any:
    """uint8 images of any size in (N, C, H, W); per image the top `label`, its `probability`
    and every class's probability by name out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Map

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, in_channels, -1, -1))]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "probability"),
                ColSpec(Map(DataType.double), "probabilities"),
            ]
        ),
    )


def find_logged_model(run_id: str, name: str = "model", uri: str | None = None) -> str | None:
    """URI of a model this run already logged under `name` (a retried task reuses it)."""
    c = client(uri)
    run = c.get_run(run_id)
    try:
        found = c.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        )
    except Exception:  # older servers without logged-model search: log again
        return None
    ready = [m for m in found if str(m.status).endswith("READY")]  # not a half-logged one
    return f"models:/{ready[0].model_id}" if ready else None


def log_model(
    run_id: str, model: Any, example: Any, *, name: str = "model", uri: str | None = None
) -> str:
    """Log an `ImageClassifier` as a model that needs nothing of this project: the network as
    a `torch.export` program (`.pt2`, dynamic batch) plus `tasks/served_model.py` (MLflow model
    from code: resize, normalisation, class names) and a JSON of the preprocessing. It loads
    and serves where only mlflow, torch and torchvision are installed. Signature and a uint8
    input example included; returns the model URI. Idempotent per (run, name)."""
    import json
    import tempfile

    existing = find_logged_model(run_id, name, uri)
    if existing:
        return existing
    import mlflow
    from mlflow.models import Model

    from cnn.export import export_network, preprocessing_config

    mlflow.set_tracking_uri(resolve_tracking_uri(uri))  # Model.log uses the process default
    config = preprocessing_config(model)
    # MLflow copies a uv project's uv.lock into the model when logged from its folder; this
    # model needs only `pip_requirements`, not this project's lock.
    with tempfile.TemporaryDirectory() as tmp, _env("MLFLOW_LOG_UV_FILES", "false"):
        network = export_network(model, Path(tmp) / "network.pt2")
        prep = Path(tmp) / "preprocessing.json"
        prep.write_text(json.dumps(config, indent=1))
        # Create the LoggedModel in the run's experiment explicitly: logging alone would put it
        # in the process's "current" experiment, which is not the run's when no run is active.
        logged = mlflow.initialize_logged_model(
            name=name,
            source_run_id=run_id,
            experiment_id=client(uri).get_run(run_id).info.experiment_id,
            model_type="image-classifier",
            tags={"architecture": str(config["info"].get("model", "")), "format": "pt2"},
        )
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(SERVED_MODEL_FILE),
            artifacts={"network": str(network), "preprocessing": str(prep)},
            signature=model_signature(model.in_channels, config["classes"]),
            input_example=example,
            pip_requirements=_pip_requirements(),
            metadata={"classes": config["classes"], "input_size": config["input_size"]},
            flavor_name="pyfunc.ModelFromCode",
        )
    return info.model_uri


# -------------------------------------------------------------------- model loading


def _missing_model_error(model_uri: str, tracking: str, exc: BaseException) -> ValueError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ValueError(
        f"model URI {model_uri!r} was not found in {tracking} ({msg}); list models with "
        "`mlflow models` / the MLflow UI, e.g. models:/lenet5-cifar10@champion"
    )


# What `log_model` writes: MLflow's model-from-code loader running served_model.py, with the
# exported network and the preprocessing JSON as artifacts.
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"
SERVED_ARTIFACTS = ("network", "preprocessing")
# The only workspace of MLflow's plain SQL store (mlflow.utils.workspace_utils) and the stage
# MLflow gives a deleted version it keeps (model_version_stages.STAGE_DELETED_INTERNAL).
DEFAULT_WORKSPACE = "default"
DELETED_STAGE = "Deleted_Internal"


def _parse_registered_uri(model_uri: str) -> tuple[str, str | None, int | None] | None:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, as MLflow's
    `_parse_model_uri` splits them; None for every other form (stages, `latest`, model ids,
    `runs:/`, a Databricks profile), which MLflow resolves itself."""
    if not model_uri.startswith("models:/") or model_uri.startswith("models://"):
        return None
    parts = model_uri.removeprefix("models:/").split("/")
    if len(parts) == 2 and parts[0].strip() and parts[1].isdigit():
        return parts[0], None, int(parts[1])
    if len(parts) == 1 and "@" in parts[0]:
        name, alias = parts[0].rsplit("@", 1)
        if name.strip() and alias.strip() and alias.lower() != "latest":
            return name, alias, None
    return None


def _local_dir(location: str | None) -> Path | None:
    """A model version's storage location when it is a local folder (plain path or file://)."""
    if not location:
        return None
    if location.startswith("file://"):
        from urllib.parse import unquote

        parsed = urlparse(location)
        return Path(unquote(parsed.path)) if parsed.netloc in ("", "localhost") else None
    return Path(location) if Path(location).is_absolute() else None


def registered_model_dir(model_uri: str, uri: str | None = None) -> Path | None:
    """The local folder of the version that `models:/NAME@ALIAS` / `models:/NAME/VERSION`
    names in a local SQLite store, read with the stdlib's sqlite3 (read-only) the way MLflow's
    SQL registry store reads it: alias -> version -> `storage_location`. Why: importing MLflow
    and opening its SQLAlchemy stores costs more than a one-image prediction. None whenever the
    answer might differ from MLflow's (another registry URI, workspaces, no such store, alias
    or version, a version not READY, remote artifacts, a schema this query does not fit), so
    the caller takes MLflow's own route and its errors."""
    import sqlite3
    import sys
    from urllib.parse import quote

    parsed = _parse_registered_uri(model_uri)
    tracking = resolve_tracking_uri(uri)
    path = _sqlite_path(tracking)
    if parsed is None or path is None or not path.is_file():
        return None
    if os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true"):
        return None
    if os.environ.get("MLFLOW_WORKSPACE"):
        return None
    if os.environ.get("MLFLOW_REGISTRY_URI", tracking) != tracking:
        return None
    if "mlflow" in sys.modules:  # this process may have set another registry URI
        import mlflow

        mlflow.set_tracking_uri(tracking)  # as the MLflow route does
        if mlflow.get_registry_uri() != tracking:
            return None
    name, alias, version = parsed
    try:
        db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        if alias is not None:
            row = db.execute(
                "SELECT version FROM registered_model_aliases "
                "WHERE workspace = ? AND name = ? AND alias = ?",
                (DEFAULT_WORKSPACE, name, alias),
            ).fetchone()
            if row is None:
                return None
            version = int(row[0])
        rows = db.execute(
            "SELECT storage_location, source, status FROM model_versions "
            "WHERE workspace = ? AND name = ? AND version = ? AND current_stage != ?",
            (DEFAULT_WORKSPACE, name, version, DELETED_STAGE),
        ).fetchall()
    except (sqlite3.Error, ValueError, TypeError):
        return None
    finally:
        db.close()
    if len(rows) != 1 or rows[0][2] != "READY":
        return None
    storage_location, source, _ = rows[0]
    folder = _local_dir(storage_location or source)  # MLflow's get_model_version_download_uri
    return folder if folder is not None and (folder / "MLmodel").is_file() else None


def _served_model_files(folder: Path) -> tuple[Path, Path] | None:
    """(network.pt2, preprocessing.json) of a model that `log_model` wrote, from its MLmodel
    file; None for any other model (MLflow's route loads those)."""
    import yaml  # MLflow's own dependency; MLmodel is YAML

    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
        pyfunc = meta["flavors"]["python_function"]
        if pyfunc.get("loader_module") != CODE_MODEL_LOADER:
            return None
        if Path(str(pyfunc.get("model_code_path") or "")).name != SERVED_MODEL_FILE.name:
            return None
        network, prep = (folder / pyfunc["artifacts"][k]["path"] for k in SERVED_ARTIFACTS)
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return (network, prep) if network.is_file() and prep.is_file() else None


def load_local_model(model_uri: str, uri: str | None = None) -> Any:
    """The classifier behind a registered `models:/` URI of a local SQLite store, loaded from
    the version's own folder without importing MLflow (no copy, no pyfunc wrapper), or None
    when it cannot be (see `registered_model_dir`). It does what `served_model.py`'s
    `load_context` and `load_model` do with the same files -- the preprocessing JSON and
    `torch.export.load(network).module()` into `from_exported` -- so the predictions are the
    MLflow route's, bit for bit."""
    import json

    folder = registered_model_dir(model_uri, uri)
    files = _served_model_files(folder) if folder is not None else None
    if files is None:
        return None
    from cnn.export import from_exported

    network, prep = files
    return from_exported(network, json.loads(prep.read_text()))


def load_model(model_uri: str, uri: str | None = None, *, local: bool = True) -> Any:
    """Load a logged/registered classifier (`models:/NAME@champion`, `runs:/ID/model`,
    `models:/NAME/3`) as an `ImageClassifier` through `mlflow.pyfunc.load_model`: the same
    exported network and preprocessing that a bare environment or `mlflow models serve` uses.
    A clear ValueError naming the URI when it names nothing or its files are missing, checked
    before anything is loaded. `local`: a registered version of a local SQLite store is read
    from its folder directly first (`load_local_model`: the same files, seconds faster)."""
    if local:
        model = load_local_model(model_uri, uri)
        if model is not None:
            return model
    import mlflow
    from mlflow.exceptions import MlflowException

    from cnn.export import from_exported

    tracking = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(tracking)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    except MlflowException as exc:
        raise _missing_model_error(model_uri, tracking, exc) from None
    except OSError as exc:
        raise ValueError(f"model URI {model_uri!r}: its files could not be read ({exc})") from None
    if not (Path(local) / "MLmodel").is_file():
        raise ValueError(
            f"model URI {model_uri!r} has no MLmodel file in its artifacts ({local}); the model's "
            "files are missing or incomplete: log and register it again"
        )
    try:
        pyfunc = mlflow.pyfunc.load_model(local)
    except (MlflowException, OSError, RuntimeError) as exc:
        raise ValueError(f"model URI {model_uri!r} could not be loaded: {exc}") from None
    inner = None
    with contextlib.suppress(MlflowException, AttributeError):
        inner = pyfunc.unwrap_python_model()
    if inner is not None and hasattr(inner, "network") and hasattr(inner, "config"):
        return from_exported(inner.network, inner.config)
    import mlflow.pytorch  # a version logged before the exported format: a pickled module

    model = mlflow.pytorch.load_model(local, map_location="cpu")
    if not hasattr(model, "classes") or not hasattr(model, "preprocess"):
        raise ValueError(
            f"{model_uri!r} is not a cnnpipe image classifier (no class names/preprocessing)"
        )
    return model
