"""TrainConfig: resolution order, recipes, overrides, validation errors that name the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from cnn import config as C
from cnn.config import TrainConfig, find_recipe, parse_overrides, resolve_config


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private recipes folder, so these tests do not depend on the shipped recipes' values."""
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "default.yaml").write_text("optim:\n  epochs: 3\n  lr: 0.01\n")
    (d / "lenet.yaml").write_text(
        "optim:\n  epochs: 7\n  optimizer: adam\n  lr: 0.002\n  batch_size: 64\n"
    )
    (d / "lenet5-cifar10.yaml").write_text(
        "optim:\n  epochs: 12\n  lr: 0.004\nschedule:\n  name: onecycle\n"
    )
    monkeypatch.setattr(C, "RECIPES_DIR", d)
    return d


def test_recipe_lookup_order(recipes: Path) -> None:
    assert find_recipe("lenet5", "cifar10").name == "lenet5-cifar10.yaml"
    assert find_recipe("lenet5", "mnist").name == "lenet.yaml"  # family default
    assert find_recipe("resnet18", "mnist").name == "default.yaml"
    assert find_recipe("resnet18", "mnist", recipe="lenet").name == "lenet.yaml"
    with pytest.raises(ValueError, match=r"unknown recipe 'lenett'.*did you mean 'lenet'"):
        find_recipe("lenet5", "cifar10", recipe="lenett")


def test_resolve_layers_recipe_file_overrides(recipes: Path, tmp_path: Path) -> None:
    file = tmp_path / "mine.yaml"
    file.write_text("optim:\n  lr: 0.05\n  batch_size: 32\n")
    cfg = resolve_config(
        model="lenet5",
        dataset="cifar10",
        config_file=file,
        overrides=["epochs=4", "label_smoothing=0.1", "pretrained=null", "ema=true"],
    )
    assert cfg.run.recipe == "lenet5-cifar10"
    assert cfg.schedule.name == "onecycle"  # from the recipe
    assert cfg.optim.lr == 0.05 and cfg.optim.batch_size == 32  # the file beats the recipe
    o = cfg.optim
    assert o.epochs == 4 and o.ema is True and o.label_smoothing == 0.1  # overrides win
    assert cfg.run.output_dir == str(Path("runs") / "lenet5-cifar10")


def test_family_recipe_then_flags(recipes: Path) -> None:
    cfg = resolve_config(model="lenet5", dataset="mnist", overrides={"epochs": 2})
    got = (cfg.run.recipe, cfg.optim.optimizer, cfg.optim.batch_size, cfg.optim.epochs)
    assert got == ("lenet", "adam", 64, 2)


def test_override_type_coercion() -> None:
    got = parse_overrides(
        ["lr=1e-3", "epochs=5", "nesterov=yes", "num_classes=none", "warmup_epochs=1", "seed=1e3"]
    )
    assert got == {
        "optim.lr": 0.001,
        "optim.epochs": 5,
        "optim.nesterov": True,
        "model.num_classes": None,
        "schedule.warmup_epochs": 1.0,
        "repro.seed": 1000,
    }
    assert isinstance(got["schedule.warmup_epochs"], float)
    assert parse_overrides({"pretrained": True}) == {"model.pretrained": "DEFAULT"}
    assert parse_overrides({"batch-size": "16"}) == {"optim.batch_size": 16}
    assert parse_overrides(["aug=none"]) == {"data.aug": "none"}  # a choice, not a null


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("epochs=abc", r"epochs='abc' is not a valid int"),
        ("lr=fast", r"lr='fast' is not a valid float"),
        ("ema=maybe", r"ema='maybe' is not a valid bool"),
        ("epochs=2.5", r"epochs=2.5 is not a valid int"),
        ("epochs=null", r"epochs cannot be null"),
        ("noequals", r"not key=value"),
    ],
)
def test_bad_override_values(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_overrides([override])


def test_unknown_key_suggests_close_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*"):
        parse_overrides(["learning_rat=0.1"])
    with pytest.raises(ValueError, match=r"'epoch'.*did you mean 'epochs'"):
        parse_overrides(["epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: lenet5\noptim:\n  batchsize: 8\n")
    with pytest.raises(ValueError, match=rf"'optim.batchsize' in {bad}.*did you mean 'batch_size'"):
        TrainConfig.from_yaml(bad)
    bad.write_text("optimm:\n  lr: 0.1\n")
    with pytest.raises(ValueError, match=r"no section 'optimm' \(did you mean 'optim'\?\)"):
        TrainConfig.from_yaml(bad)


def test_yaml_roundtrip_and_hash(tmp_path: Path) -> None:
    cfg = TrainConfig().replace(
        model="lenet5", epochs=3, lr=0.02, pretrained=None, num_classes=None
    )
    path = cfg.to_yaml(tmp_path / "run.yaml")
    back = TrainConfig.from_yaml(path)
    assert back == cfg
    assert set(yaml.safe_load(path.read_text())) == set(C.SECTIONS)
    assert back.config_hash() == cfg.config_hash()
    # Operational keys do not change the hash; result-changing ones do.
    assert cfg.replace(output_dir="elsewhere", data_dir="x").config_hash() == cfg.config_hash()
    assert cfg.replace(mlflow_run_id="abc", log_interval=5).config_hash() == cfg.config_hash()
    assert cfg.replace(lr=0.03).config_hash() != cfg.config_hash()
    assert cfg.replace(epochs=4).config_hash() != cfg.config_hash()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"optimizer": "adamm"}, r"optimizer='adamm' is not valid.*did you mean 'adam'"),
        ({"schedule": "cosin"}, r"schedule.name='cosin'.*did you mean 'cosine'"),
        ({"precision": "fp8"}, r"precision='fp8' is not valid; choose one of auto, bf16"),
        ({"device": "tpu"}, r"device='tpu' is not valid"),
        ({"aug": "heavy"}, r"aug='heavy' is not valid"),
        ({"loader_mode": "disk"}, r"loader_mode='disk' is not valid"),
        ({"epochs": 0}, r"epochs=0 must be > 0"),
        ({"lr": -0.1}, r"lr=-0.1 must be > 0"),
        ({"batch_size": 0}, r"batch_size=0 must be > 0"),
        ({"grad_accum": 0}, r"grad_accum=0 must be > 0"),
        ({"weight_decay": -1.0}, r"weight_decay=-1.0 must be >= 0"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0 must be in \(0, 1\)"),
        ({"val_fraction": 0.0}, r"val_fraction=0.0 must be in \(0, 1\).*held out"),
        ({"label_smoothing": 1.5}, r"label_smoothing=1.5 must be in"),
        ({"momentum": 1.0}, r"momentum=1.0 must be in"),
        ({"ema_decay": 1.0}, r"ema_decay=1.0 must be in"),
        ({"num_classes": 0}, r"num_classes=0 must be >= 1"),
        ({"target_accuracy": 67.0}, r"target_accuracy=67.0 must be in \(0, 1\]"),
        ({"warmup_epochs": 5.0, "epochs": 2}, r"warmup_epochs=5.0 exceeds epochs=2"),
        ({"model": "lenet55"}, r"unknown model 'lenet55'.*lenet5"),
        ({"input_size": 16}, r"input size 16 is below the minimum 32"),
        ({"freeze_backbone": True}, r"freeze_backbone=true without pretrained"),
        ({"precision": "fp16", "device": "cpu"}, r"precision='fp16' needs CUDA"),
        ({"sync_bn": True, "device": "cpu"}, r"sync_bn=true needs CUDA"),
    ],
)
def test_validate_rejects(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig().replace(**{"device": "cpu", **changes}).validate(nproc_per_node=2)


@pytest.mark.parametrize(
    ("changes", "launch", "fix"),
    [
        ({"optim.lr": -0.1}, {}, "with --set optim.lr=VALUE"),
        ({"optim.weight_decay": -1.0}, {}, "with --set optim.weight_decay=VALUE"),
        ({"data.val_fraction": 1.0}, {}, "with --set data.val_fraction=VALUE"),
        ({"runtime.num_threads": 0}, {}, "with --set runtime.num_threads=VALUE"),
        ({}, {"nproc_per_node": 0}, "pass --nproc-per-node N"),
        ({}, {"nnodes": 0}, "pass --nnodes N"),
    ],
)
def test_bad_values_say_where_to_fix_them(changes: dict, launch: dict, fix: str) -> None:
    """A range error names the value and where it is set, on one line."""
    with pytest.raises(ValueError) as err:
        TrainConfig().replace(**{"device": "cpu", **changes}).validate(**launch)
    assert fix in str(err.value) and "\n" not in str(err.value)


def test_validate_rejects_a_bad_choice_set_directly() -> None:
    """A section built in code skips coercion; validate still checks the Literal choices."""
    cfg = TrainConfig(optim=C.OptimSection(optimizer="adamm"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"optim.optimizer='adamm' is not valid.*'adam'"):
        cfg.validate()


def test_bad_tta_names_the_choices() -> None:
    msg = r"data.tta='sideways' is not valid; choose one of none, flip"
    with pytest.raises(ValueError, match=msg):
        TrainConfig().replace(tta="sideways")


def test_batch_not_divisible_by_world_size_names_numbers_and_fix() -> None:
    cfg = TrainConfig().replace(batch_size=100, device="cpu")
    cfg.validate(nproc_per_node=2)  # 100 / 2 is fine
    with pytest.raises(ValueError) as err:
        cfg.validate(nproc_per_node=3, nnodes=2)
    msg = str(err.value)
    assert "batch_size=100" in msg and "world size 6" in msg
    assert "use batch_size=96 or 102" in msg
    with pytest.raises(ValueError, match=r"grad_accum=4 = 8; use batch_size=96 or 104"):
        cfg.replace(grad_accum=4).validate(nproc_per_node=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_gpu() -> None:
    with pytest.raises(ValueError, match=r"device='cuda' was requested but no CUDA GPU"):
        TrainConfig().replace(device="cuda").validate()


def test_more_processes_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend this host has 2 GPUs: the check compares nproc_per_node with the device count.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = TrainConfig().replace(device="cuda", batch_size=64)
    cfg.validate(nproc_per_node=2)
    with pytest.raises(ValueError, match=r"nproc_per_node=4 exceeds the 2 GPU\(s\)"):
        cfg.validate(nproc_per_node=4)


def test_resolve_validates_early(recipes: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=63 is not divisible by world size 2"):
        resolve_config(
            model="lenet5",
            dataset="cifar10",
            overrides=["batch_size=63", "device=cpu"],
            nproc_per_node=2,
        )


def test_shipped_recipes_parse() -> None:
    """Every YAML shipped in cnn/recipes/ holds only known keys with valid types."""
    for name in C.list_recipes():
        data = yaml.safe_load((C.RECIPES_DIR / f"{name}.yaml").read_text()) or {}
        cfg = TrainConfig.from_dict(data, source=name)
        assert cfg.optim.epochs >= 1


def test_plain_names_are_unique_across_sections() -> None:
    """`--set lr=0.1` must name one key: every key has its own plain name."""
    keys = [(s, f.name) for s, cls in C.SECTIONS.items() for f in dataclasses.fields(cls)]
    assert len(C.PLAIN_KEYS) == len(keys)
    assert sorted(C.PLAIN_KEYS.values()) == sorted(f"{s}.{k}" for s, k in keys)


def test_hash_covers_exactly_the_hashed_sections() -> None:
    """By structure: changing any key of a HASHED section changes the hash, any other not."""
    base = TrainConfig()
    changed = {bool: lambda v: not v, int: lambda v: (v or 1) + 1, float: lambda v: v + 0.5,
               str: lambda v: (v or "x") + "y"}  # fmt: skip
    for name, cls in C.SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = getattr(getattr(base, name), f.name)
            tp = type(value) if value is not None else str
            section = dataclasses.replace(getattr(base, name), **{f.name: changed[tp](value)})
            other = dataclasses.replace(base, **{name: section})
            assert (other.config_hash() != base.config_hash()) == cls.HASHED, f"{name}.{f.name}"
    hashed = {name for name, cls in C.SECTIONS.items() if cls.HASHED}
    assert hashed == {"model", "data", "optim", "schedule", "perf", "repro"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("lr: 0.1\n", r"'lr' in .* is a flat key .*it is now optim.lr: write 'lr:' under 'optim:'"),
        ("model: lenet5\n", r"'model' in .* is a config section.*write model: \{name: lenet5\}"),
        ("schedule: cosine\n", r"write schedule: \{name: cosine\} \(the key schedule.name\)"),
        ("nproc_per_node: 2\n", r"nproc_per_node .* is a launch setting.*--nproc-per-node"),
        ("run:\n  max_restarts: 2\n", r"section 'run' has no 'max_restarts'"),
    ],
)
def test_old_flat_yaml_names_the_new_key(tmp_path: Path, text: str, match: str) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(text)
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_yaml(old)
    with pytest.raises(ValueError, match=match):
        resolve_config(model="lenet5", dataset="cifar10", config_file=old)


def test_launch_settings_are_not_config_keys() -> None:
    for key in C.LAUNCH_KEYS:
        with pytest.raises(ValueError, match=rf"{key} in overrides is a launch setting"):
            parse_overrides([f"{key}=2"])
        with pytest.raises(ValueError, match="is a launch setting"):
            TrainConfig().replace(**{key: 2})


def test_sectioned_keys_in_overrides_and_params() -> None:
    assert parse_overrides(["optim.lr=0.2", "model.name=resnet18_cifar"]) == {
        "optim.lr": 0.2,
        "model.name": "resnet18_cifar",
    }
    assert parse_overrides(["model=resnet18_cifar", "schedule=cosine"]) == {
        "model.name": "resnet18_cifar",
        "schedule.name": "cosine",
    }
    with pytest.raises(ValueError, match="'lr' is in section 'optim'"):
        parse_overrides(["data.lr=0.2"])
    with pytest.raises(ValueError, match="section 'optim' has no 'lrr'.*did you mean 'lr'"):
        parse_overrides(["optim.lrr=0.2"])
    sections = TrainConfig().replace(lr=0.2).sectioned()
    assert sections["optim"]["lr"] == 0.2 and sections["model"]["name"] == "lenet5"
    assert "pretrained" not in sections["model"]  # unset (None) values are left out
