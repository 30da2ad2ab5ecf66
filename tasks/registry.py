"""Registry identity and the champion rule.

Two questions decide where a trained model lands in the MLflow registry:

1. **Which registered model?** The default name identifies the data, so models trained on
   different data never share a name by accident: `<model>-<dataset>` for built-in sets and
   `<model>-<folder name>` for an image folder. When that name is already taken by a model of
   another folder (two folders both called `data`), the folder's short content hash is appended.
2. **May the new version take `champion`?** Only when it was evaluated on the same class list and
   the same evaluation split of the same data (source hash) as the current champion, and only
   when its accuracy is higher. Comparing accuracies across datasets is meaningless: a 1-epoch
   2-class model (62%) would otherwise replace a 10-class one (57%) and then answer "ants" for
   every CIFAR image.

Each version carries its data identity as `data.*` tags, so the rule can be re-checked later and
the MLflow UI shows what a version was trained on. `register` applies the rule in the registry
(a version per run, the alias, the decision as a tag). Plain functions, no Prefect; mlflow is
imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"
DECISION_TAG = "champion_decision"
TAG_PREFIX = "data."
NAME_TAG = "data.name"
SOURCE_TAG = "data.source_hash"
CLASSES_TAG = "data.classes_hash"
CLASS_LIST_TAG = "data.classes"
SPLIT_TAG = "data.eval_split"
FOLDER_TAG = "data.folder"


@dataclass(frozen=True)
class DataIdentity:
    """What a version was trained and evaluated on; equal identities make accuracies comparable."""

    name: str  # dataset name, or the image folder's own name
    source_hash: str  # content hash of the source (checksums, or the folder listing)
    classes: tuple[str, ...]
    eval_split: str  # "test", or "val(fraction=0.1,seed=0)" when the split is a holdout
    folder: str = ""  # absolute path of an image folder ("" for built-in sets)

    @property
    def classes_hash(self) -> str:
        return hashlib.sha256(json.dumps(list(self.classes)).encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        """Model-version tags (values are strings; the class list is cut to MLflow's limit)."""
        return {
            NAME_TAG: self.name,
            SOURCE_TAG: self.source_hash,
            CLASSES_TAG: self.classes_hash,
            CLASS_LIST_TAG: json.dumps(list(self.classes))[:4000],
            SPLIT_TAG: self.eval_split,
            **({FOLDER_TAG: self.folder} if self.folder else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataIdentity:
        """Back from `to_dict` (a Prefect task parameter is plain JSON)."""
        return cls(**{**data, "classes": tuple(data["classes"])})


def _safe(text: str) -> str:
    """A registered-model-name piece: letters, digits, '-', '_', '.' only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-") or "data"


def data_identity(info: Any, data_dir: str | Path | None = None) -> DataIdentity:
    """The identity of a prepared dataset (`cnn.data.PreparedInfo`). For an image folder the
    name is the folder's own name (the one holding train/), not the word `imagefolder`."""
    params = dict(getattr(info, "params", None) or {})
    if info.test_is_val:
        split = f"val(fraction={params.get('val_fraction')},seed={params.get('seed')})"
    else:
        split = "test"
    split += f",n={int(info.splits.get('test', 0))}"
    name, folder = str(info.dataset), ""
    if name == "imagefolder" and data_dir is not None:
        from cnn.folders import find_folder_root

        root = find_folder_root(data_dir).resolve()
        name, folder = _safe(root.name), str(root)
    return DataIdentity(
        name=name,
        source_hash=str(info.source_hash),
        classes=tuple(str(c) for c in info.classes),
        eval_split=split,
        folder=folder,
    )


def registered_name(
    model: str, identity: DataIdentity, register_as: str | None = None, client: Any = None
) -> str:
    """`register_as`, else `<model>-<data name>`; for an image folder whose plain name is
    already held by another folder's model, `<model>-<folder name>-<content hash[:8]>`."""
    if register_as:
        return register_as
    base = f"{_safe(model)}-{identity.name}"
    if not identity.folder or client is None:
        return base
    from mlflow.exceptions import MlflowException

    try:
        existing = client.get_registered_model(base)
    except MlflowException:
        return base  # free
    tags = existing.tags or {}
    owner = tags.get(FOLDER_TAG)
    if owner in (None, identity.folder) or tags.get(SOURCE_TAG) == identity.source_hash:
        return base  # ours (or a model registered before folders were recorded)
    return f"{base}-{identity.source_hash[:8]}"


@dataclass(frozen=True)
class ChampionDecision:
    champion: bool
    reason: str


def mismatch(new: dict[str, str], current: dict[str, str]) -> str | None:
    """Why two versions' data tags are not comparable, or None when they are."""
    if not current.get(SOURCE_TAG) or not current.get(CLASSES_TAG):
        return "the champion has no data identity recorded (registered before it was tracked)"
    problems = []
    if new.get(NAME_TAG) != current.get(NAME_TAG):
        problems.append(f"dataset {new.get(NAME_TAG)} vs {current.get(NAME_TAG)}")
    if new.get(CLASSES_TAG) != current.get(CLASSES_TAG):
        n_new = len(json.loads(new.get(CLASS_LIST_TAG) or "[]") or [])
        n_cur = len(json.loads(current.get(CLASS_LIST_TAG) or "[]") or [])
        problems.append(f"class list differs ({n_new} vs {n_cur} classes)")
    if new.get(SOURCE_TAG) != current.get(SOURCE_TAG):
        problems.append(
            f"source hash {str(new.get(SOURCE_TAG))[:12]} vs {str(current.get(SOURCE_TAG))[:12]}"
        )
    if new.get(SPLIT_TAG) != current.get(SPLIT_TAG):
        problems.append(f"evaluation split {new.get(SPLIT_TAG)} vs {current.get(SPLIT_TAG)}")
    return "; ".join(problems) or None


def decide(
    *,
    name: str,
    version: str,
    accuracy: float,
    identity_tags: dict[str, str],
    current_version: str | None,
    current_tags: dict[str, str] | None,
    current_accuracy: float | None,
) -> ChampionDecision:
    """The champion rule: first version wins; later ones must match the champion's data and
    beat its accuracy. The reason is stored as a version tag and shown by `cnnpipe train`."""
    # True labels: an image folder without a test split is evaluated on its validation split.
    split = str(identity_tags.get(SPLIT_TAG) or "test")
    metric = f"{'val' if split.startswith('val') else 'test'}_accuracy"
    if current_version is None:
        return ChampionDecision(
            True, f"first champion of {name}: {metric} {accuracy:.4f} (split {split})"
        )
    if str(current_version) == str(version):
        return ChampionDecision(True, "already the champion")
    why = mismatch(identity_tags, current_tags or {})
    if why:
        return ChampionDecision(
            False,
            f"not comparable with champion v{current_version}: {why}; alias unchanged "
            f"(register under another name, or move the alias by hand if intended)",
        )
    cmp = "n/a" if current_accuracy is None else f"{current_accuracy:.4f}"
    if current_accuracy is None or accuracy > current_accuracy:
        return ChampionDecision(
            True,
            f"{metric} {accuracy:.4f} beats champion v{current_version} ({cmp}) on split {split}",
        )
    return ChampionDecision(
        False,
        f"{metric} {accuracy:.4f} does not beat champion v{current_version} ({cmp}) on split "
        f"{split}; alias unchanged",
    )


def champion_accuracy(mv: Any, c: Any) -> float | None:
    """A version's test accuracy: its tag, else its run's `test_accuracy` metric."""
    tag = (mv.tags or {}).get(ACCURACY_TAG)
    if tag is not None:
        try:
            return float(tag)
        except ValueError:
            pass
    if mv.run_id:
        value = c.get_run(mv.run_id).data.metrics.get("test_accuracy")
        return None if value is None else float(value)
    return None


@dataclass
class Registration:
    """What `register` did: the version, whether it holds `champion`, and why."""

    name: str
    version: str
    champion: bool
    reason: str
    reused: bool  # the run already had a version (a retried task): nothing new was registered
    previous_champion: str | None = None  # the version that held `champion` before this call

    @property
    def champion_moved(self) -> bool:
        """The alias now points at a different version than before (worth an event)."""
        return self.champion and self.previous_champion != self.version

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "champion_moved": self.champion_moved}


def register(
    model_uri: str,
    *,
    name: str,
    run_id: str,
    test_accuracy: float,
    identity: DataIdentity | None = None,
    uri: str | None = None,
) -> Registration:
    """Register `model_uri` as a version of `name` (once per run) and move `champion` to it
    when `decide` says so; the decision is a version tag. `identity` is the training data's."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks import mlflow_utils

    uri = mlflow_utils.resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)  # mlflow.register_model uses the process default
    c = mlflow_utils.client(uri)
    identity_tags = identity.tags() if identity is not None else {}
    with mlflow_utils.store_lock(uri):
        existing = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        reused = bool(existing)
        if reused:
            mv = sorted(existing, key=lambda v: int(v.version))[0]
        else:
            tags = {ACCURACY_TAG: f"{test_accuracy:.6f}", "run_id": run_id, **identity_tags}
            mv = mlflow.register_model(model_uri, name, tags=tags)
            rm_tags = c.get_registered_model(name).tags or {}
            for key in (NAME_TAG, FOLDER_TAG, SOURCE_TAG):
                if key in identity_tags and key not in rm_tags:  # who owns this name
                    c.set_registered_model_tag(name, key, identity_tags[key])
        try:
            current = c.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            current = None
        if reused and current is not None and str(current.version) == str(mv.version):
            decision = ChampionDecision(
                True, (mv.tags or {}).get(DECISION_TAG) or "already the champion"
            )
        else:
            decision = decide(
                name=name,
                version=str(mv.version),
                accuracy=test_accuracy,
                identity_tags=dict(mv.tags or {}) | identity_tags,
                current_version=None if current is None else str(current.version),
                current_tags=None if current is None else dict(current.tags or {}),
                current_accuracy=None if current is None else champion_accuracy(current, c),
            )
        if decision.champion:
            c.set_registered_model_alias(name, CHAMPION, str(mv.version))
        c.set_model_version_tag(name, str(mv.version), DECISION_TAG, decision.reason)
    previous = None if current is None else str(current.version)
    return Registration(name, str(mv.version), decision.champion, decision.reason, reused, previous)
