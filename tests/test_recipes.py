"""The shipped recipes (cnn/recipes/*.yaml): each one is a valid TrainConfig, every registered
model resolves to a recipe of its family (or its own), flags win over recipes, and the
learning-rate schedule stretches with the epoch count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cnn.config import (
    RECIPES_DIR,
    TrainConfig,
    find_recipe,
    list_recipes,
    resolve_config,
    values_of_file,
)
from cnn.models import list_models, model_info
from cnn.train import build_scheduler

# Recipes named in issue 4 (the model/dataset ones use the registry's model names).
REQUIRED = (
    "default",
    "finetune",
    "lenet5-cifar10",
    "alexnet-hymenoptera",
    "mobilenet_v2-hymenoptera",
    "resnet18_cifar-cifar10",
    "vgg11_bn_cifar-cifar10",
    "googlenet_cifar-cifar10",
    "densenet_bc_100_k12_cifar-cifar10",
    "efficientnet_b0-hymenoptera",
)


def _families() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in list_models():
        out.setdefault(model_info(name).family, []).append(name)
    return out


def _model_for(recipe: str) -> str:
    """A registered model the recipe is meant for: `<model>-<dataset>`, a family, or any."""
    if "-" in recipe:
        return recipe.split("-", 1)[0]
    return _families().get(recipe, ["lenet5"])[0]


def test_required_recipes_are_shipped() -> None:
    missing = sorted(set(REQUIRED) - set(list_recipes()))
    assert not missing, f"recipes missing from {RECIPES_DIR}: {missing}"


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_is_a_valid_config(name: str) -> None:
    path = RECIPES_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw, f"{path} is empty or not a mapping"
    unknown = set(raw) - {f for f in TrainConfig.__dataclass_fields__}
    assert not unknown, f"{path} has sections TrainConfig does not know: {sorted(unknown)}"
    values = values_of_file(path)  # keys known, types coerce (e.g. `lr: 1.0e-3` is a float)
    model = _model_for(name)
    cfg = resolve_config(model=model, dataset="cifar10", recipe=name)  # validates
    assert cfg.run.recipe == name
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        got = getattr(getattr(cfg, section), key)
        assert got == value, f"{name}: {dotted} not taken from the recipe"
    # Warm-up in epochs would not fit `--epochs 1`: recipes warm up by fraction (one-cycle).
    assert cfg.schedule.warmup_epochs == 0, f"{name}: use schedule onecycle + pct_start for warm-up"


@pytest.mark.parametrize("model", list_models())
def test_every_model_resolves_to_its_family_or_own_recipe(model: str) -> None:
    info = model_info(model)
    path = find_recipe(model, "cifar10")
    allowed = {f"{model}-cifar10", info.family}
    if info.source == "torchvision":
        allowed |= {f"{info.family}-finetune", "finetune"}
    assert path.stem in allowed, (
        f"{model} (family {info.family!r}) falls back to {path.name}; "
        f"ship cnn/recipes/{info.family}.yaml"
    )


def test_imagenet_models_of_a_from_scratch_family_get_the_finetune_recipe() -> None:
    """resnet.yaml is tuned for resnet*_cifar from scratch (lr 0.1); torchvision's ImageNet
    ResNet must not inherit it."""
    assert find_recipe("resnet34_cifar", "cifar10").stem == "resnet"
    assert find_recipe("resnet50", "cifar10").stem == "finetune"
    assert find_recipe("vgg13", "mnist").stem == "finetune"
    assert find_recipe("mobilenet_v3_small", "cifar10").stem == "mobilenet"


def test_model_dataset_recipe_wins_over_family() -> None:
    assert find_recipe("lenet5", "cifar10").stem == "lenet5-cifar10"
    assert find_recipe("lenet5", "mnist").stem == "lenet"
    assert find_recipe("resnet18_cifar", "cifar10").stem == "resnet18_cifar-cifar10"
    assert find_recipe("resnet34_cifar", "cifar10").stem == "resnet"


def test_lenet_on_an_image_folder_trains_like_the_benchmarked_cifar10_recipe() -> None:
    """A CIFAR-like 32-px folder (`--dataset imagefolder`) gets the `lenet` family recipe; it
    must train as `lenet5-cifar10` does (issue 9: as well on any CIFAR-like folder)."""
    folder = resolve_config(model="lenet5", dataset="imagefolder")
    cifar = resolve_config(model="lenet5", dataset="cifar10")
    assert folder.run.recipe == "lenet"
    for section in ("optim", "schedule", "perf"):
        assert getattr(folder, section) == getattr(cifar, section), section
    assert folder.data.aug == cifar.data.aug == "flip"


def test_unknown_model_falls_back_to_default() -> None:
    assert find_recipe("no_such_model", "cifar10").stem == "default"


def test_overrides_and_config_file_win_over_the_recipe(tmp_path: Path) -> None:
    recipe = yaml.safe_load((RECIPES_DIR / "lenet5-cifar10.yaml").read_text())["optim"]
    cfg = resolve_config(model="lenet5", dataset="cifar10")
    got = (cfg.run.recipe, cfg.optim.epochs, cfg.optim.lr)
    assert got == ("lenet5-cifar10", recipe["epochs"], recipe["lr"])

    file = tmp_path / "mine.yaml"
    file.write_text("optim:\n  epochs: 3\n  lr: 0.2\n")
    cfg = resolve_config(
        model="lenet5", dataset="cifar10", config_file=file, overrides=["lr=0.3", "batch_size=64"]
    )
    assert cfg.optim.epochs == 3  # config file over recipe
    assert cfg.optim.lr == 0.3  # flag over config file
    assert cfg.optim.batch_size == 64  # flag over recipe
    assert cfg.optim.optimizer == recipe["optimizer"]  # the rest still comes from the recipe
    assert cfg.run.recipe == "lenet5-cifar10"


def test_explicit_recipe_name_and_bad_name() -> None:
    cfg = resolve_config(
        model="mobilenet_v2", dataset="imagefolder", recipe="mobilenet_v2-hymenoptera"
    )
    assert cfg.model.pretrained == "DEFAULT" and cfg.run.recipe == "mobilenet_v2-hymenoptera"
    with pytest.raises(ValueError, match="mobilenet_v2-hymenoptera"):  # suggests the close name
        resolve_config(
            model="mobilenet_v2", dataset="imagefolder", recipe="mobilenet_v2-hymenopter"
        )


def test_recipe_file_with_unknown_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        resolve_config(model="lenet5", dataset="cifar10", recipe=str(bad))


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9)
    sched = build_scheduler(cfg, opt, steps_per_epoch)
    lrs = []
    for _ in range(cfg.optim.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    ("model", "dataset", "recipe"),
    [
        ("lenet5", "cifar10", None),  # one-cycle
        ("resnet18_cifar", "cifar10", None),  # one-cycle
        ("mobilenet_v2", "imagefolder", "mobilenet_v2-hymenoptera"),  # fine-tuning
        ("vit_b_16", "imagefolder", None),  # AdamW fine-tuning
    ],
)
@pytest.mark.parametrize("epochs", [1, 3, 40])
def test_schedule_adapts_to_epochs(model: str, dataset: str, recipe: str | None, epochs: int):
    """Whatever `--epochs` is, the run warms up, peaks at the recipe's lr and anneals to near
    zero by its last step (never stopping half-way or restarting)."""
    cfg = resolve_config(
        model=model, dataset=dataset, recipe=recipe, overrides=[f"epochs={epochs}"]
    )
    steps = 20
    lrs = _lrs(cfg, steps)
    peak = max(lrs)
    assert peak == pytest.approx(cfg.optim.lr, rel=0.05)
    assert lrs[0] < 0.5 * cfg.optim.lr, "no warm-up"
    assert lrs[-1] < 0.05 * cfg.optim.lr, "not annealed by the last step"
    top = lrs.index(peak)
    assert 0 < top < len(lrs) - 1
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:top], lrs[1 : top + 1], strict=True))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[top:], lrs[top + 1 :], strict=False))
    # The peak sits at the same fraction of the run, whatever its length.
    frac = top / len(lrs)
    assert cfg.schedule.name == "onecycle"
    assert frac == pytest.approx(cfg.schedule.pct_start, abs=2 / len(lrs) + 0.01)


# ------------------------------------------------------------------ benchmarks/bench_train.py


def _bench_main():
    import importlib.util
    import sys

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))  # bench_train imports its sibling bench_data
    try:
        spec = importlib.util.spec_from_file_location("bench_train", bench_dir / "bench_train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench_dir))
    return module.main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data-dir", "/nonexistent/data"], "cifar10-jpeg-train.tar.gz not found"),
        (["--target", "67"], "--target 67.0 must be a fraction"),
        (["--rounds", "0"], "--rounds 0 must be at least 1"),
    ],
)
def test_bench_train_refuses_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main = _bench_main()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
