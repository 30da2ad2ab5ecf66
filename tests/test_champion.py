"""Registry identity and the champion rule (tasks/registry.py) on a real SQLite MLflow store and
real prepared image folders: the ants/bees-vs-CIFAR case of issue 8."""

from __future__ import annotations

from pathlib import Path

from fakedata import make_imagefolder
from flows_helpers import log_and_register, tiny_classifier

from cnn.data import prepare_dataset
from tasks import registry

CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _prepared(root: Path, classes: tuple[str, ...], seed: int = 0) -> tuple[object, Path]:
    make_imagefolder(root, classes=classes, n_train=4, n_val=2, size=16, seed=seed)
    info = prepare_dataset("imagefolder", data_dir=root, cache_dir=root.parent / "cache")
    return info, root


def _register(
    store: str, name: str, identity: registry.DataIdentity, acc: float
) -> registry.Registration:
    return log_and_register(
        store, name, tiny_classifier(list(identity.classes)), acc, identity=identity
    )


def test_names_identify_the_data(tmp_path: Path, mlflow_store: str) -> None:
    import mlflow

    c = mlflow.MlflowClient(mlflow_store)
    bees_info, bees = _prepared(tmp_path / "hymenoptera_data", ("ants", "bees"))
    cifar_info, cifar = _prepared(tmp_path / "cifar_photos", CIFAR)
    bees_id = registry.data_identity(bees_info, bees)
    cifar_id = registry.data_identity(cifar_info, cifar)
    assert registry.registered_name("lenet5", bees_id, None, c) == "lenet5-hymenoptera_data"
    assert registry.registered_name("lenet5", cifar_id, None, c) == "lenet5-cifar_photos"
    assert registry.registered_name("lenet5", bees_id, "mine", c) == "mine"
    assert bees_id.eval_split.startswith("val(") and bees_id.folder == str(bees.resolve())

    # Built-in sets keep their dataset name (no folder, no lookup).
    builtin = registry.DataIdentity("cifar10", "abc", CIFAR, "test,n=10000")
    assert registry.registered_name("lenet5", builtin, None, c) == "lenet5-cifar10"

    # Two folders with the same name: the second one gets its short content hash.
    _register(mlflow_store, "lenet5-hymenoptera_data", bees_id, 0.6)
    other_info, other = _prepared(tmp_path / "elsewhere" / "hymenoptera_data", ("ants", "bees"), 1)
    other_id = registry.data_identity(other_info, other)
    assert other_id.source_hash != bees_id.source_hash
    assert (
        registry.registered_name("lenet5", other_id, None, c)
        == f"lenet5-hymenoptera_data-{other_id.source_hash[:8]}"
    )
    # ... while the first folder keeps its plain name on later runs.
    assert registry.registered_name("lenet5", bees_id, None, c) == "lenet5-hymenoptera_data"


def test_ants_bees_cannot_take_cifars_champion(tmp_path: Path, mlflow_store: str) -> None:
    """The issue's case: a 2-class ants/bees model at 62.75% registered under the name of a
    10-class CIFAR model at 57.76% must not become that name's champion."""
    import mlflow

    c = mlflow.MlflowClient(mlflow_store)
    cifar_info, cifar = _prepared(tmp_path / "cifar_photos", CIFAR)
    bees_info, bees = _prepared(tmp_path / "hymenoptera_data", ("ants", "bees"))
    cifar_id = registry.data_identity(cifar_info, cifar)
    bees_id = registry.data_identity(bees_info, bees)

    first = _register(mlflow_store, "lenet5-shared", cifar_id, 0.5776)
    assert first.champion and first.champion_moved
    intruder = _register(mlflow_store, "lenet5-shared", bees_id, 0.6275)
    assert not intruder.champion and not intruder.champion_moved
    assert "not comparable with champion v1" in intruder.reason
    assert "class list differs (2 vs 10 classes)" in intruder.reason
    assert "source hash" in intruder.reason
    champion = c.get_model_version_by_alias("lenet5-shared", "champion")
    assert str(champion.version) == "1"
    tags = c.get_model_version("lenet5-shared", intruder.version).tags
    assert "class list differs" in tags["champion_decision"]
    assert tags[registry.CLASSES_TAG] == bees_id.classes_hash

    # Same data, better accuracy: the alias moves, and the registration says from where.
    better = _register(mlflow_store, "lenet5-shared", cifar_id, 0.60)
    assert better.champion and better.previous_champion == "1" and better.champion_moved
    assert str(c.get_model_version_by_alias("lenet5-shared", "champion").version) == "3"

    # Same classes and source but another evaluation split: not comparable either.
    other_split = registry.DataIdentity(**{**cifar_id.to_dict(), "eval_split": "test,n=99"})
    moved = _register(mlflow_store, "lenet5-shared", other_split, 0.99)
    assert not moved.champion and "evaluation split" in moved.reason


def test_a_champion_without_identity_is_not_replaced_blindly() -> None:
    decision = registry.decide(
        name="m", version="2", accuracy=0.9, identity_tags={registry.SOURCE_TAG: "x"},
        current_version="1", current_tags={}, current_accuracy=0.1,
    )  # fmt: skip
    assert not decision.champion and "no data identity" in decision.reason


def test_champion_reason_names_the_split_it_used() -> None:
    """A folder without a test split is judged on val: the reason says val, not test."""
    from tasks import registry

    val = {registry.SPLIT_TAG: "val(fraction=0.1,seed=0)"}
    none = dict(current_version=None, current_tags=None, current_accuracy=None)
    first = registry.decide(name="m", version="1", accuracy=0.5, identity_tags=val, **none)
    assert "val_accuracy 0.5000" in first.reason and "test_accuracy" not in first.reason
    assert "split val(fraction=0.1,seed=0)" in first.reason
    test = {registry.SPLIT_TAG: "test"}
    first = registry.decide(name="m", version="1", accuracy=0.5, identity_tags=test, **none)
    assert "test_accuracy 0.5000" in first.reason
