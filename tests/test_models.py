"""The model library: registry, every model's forward/backward, pretrained loading, errors."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F

from cnn.models import (
    _api,
    check_input_size,
    get_model,
    list_models,
    main_logits,
    model_info,
    register_model,
    training_loss,
)
from cnn.models.lenet import chapter_order
from cnn.models.zoo import ZOO_MODELS, weights_cache_path
from tasks.plan import format_models_table  # the CLI's table (kept equal to the registry)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tests run many tiny ops: one thread is as fast as two, and on a busy two-core
    machine OpenMP threads waiting for each other made single tests 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Models that need several GB of memory and >5 s of CPU for one step (measured: build plus
# train step plus eval forward at the minimum size, one thread). All others together take ~75 s.
GIANTS = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32"}

PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg13": 133_047_848,
    "googlenet": 6_624_904,
    "inception_v3": 27_161_264,
    "resnet50": 25_557_032,
    "densenet121": 7_978_856,
    "efficientnet_b0": 5_288_548,
    "mnasnet1_0": 4_383_312,
    "lenet5": 62_006,
}


def _param(name: str) -> object:
    return pytest.param(name, marks=pytest.mark.slow) if name in GIANTS else name


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_backbone_equal(
    model: nn.Module, state: dict[str, torch.Tensor], head: str | tuple[str, ...]
) -> None:
    own = model.state_dict()
    compared = 0
    for key, value in state.items():
        if key.startswith(head) or key not in own:
            continue
        assert torch.equal(own[key], value), key
        compared += 1
    assert compared >= 4  # really compared the backbone, not an empty intersection


# ---------------------------------------------------------------- registry


def test_every_torchvision_classification_model_is_registered() -> None:
    names = set(list_models())
    assert len(ZOO_MODELS) == 80
    assert set(ZOO_MODELS) <= names
    for name in ("lenet5", "alexnet_cifar", "googlenet_cifar", "densenet121_cifar"):
        assert name in names
    for depth in (11, 13, 16, 19):
        assert {f"vgg{depth}_cifar", f"vgg{depth}_bn_cifar"} <= names
    for depth in (18, 34, 50, 101, 152):
        assert f"resnet{depth}_cifar" in names


def test_list_models_filters_with_fnmatch_and_sorts() -> None:
    resnets = list_models("resnet*_cifar")
    assert resnets == sorted(resnets)
    assert set(resnets) == {f"resnet{d}_cifar" for d in (9, 18, 34, 50, 101, 152)}
    assert list_models("efficientnet_b?") == [f"efficientnet_b{i}" for i in range(8)]
    assert list_models("no-such-*") == []


def test_duplicate_name_raises() -> None:
    with pytest.raises(ValueError, match="'lenet5' is already registered"):
        register_model("lenet5", family="lenet", min_input_size=32)(lambda **kw: nn.Identity())


def test_unknown_name_lists_the_closest_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'.*resnet18") as err:
        get_model("resnet19", num_classes=10)
    assert "cnnpipe models" in str(err.value)
    with pytest.raises(ValueError, match="closest names: .*efficientnet_b0"):
        model_info("efficentnet_b0")


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_equal_the_published_ones(name: str) -> None:
    expected = PUBLISHED_PARAMS[name]
    assert model_info(name).params == expected
    num_classes = 10 if model_info(name).source == "cnn" else 1000
    # GoogLeNet is published without its auxiliary heads (torchvision drops them with weights).
    kw = {"aux_logits": False} if name == "googlenet" else {}
    with torch.device("meta"):
        model = get_model(name, num_classes=num_classes, **kw)
    assert _n_params(model) == expected


def test_model_info_takes_geometry_and_normalization_from_the_weights() -> None:
    lenet = model_info("lenet5")
    assert (lenet.family, lenet.source, lenet.input_size, lenet.min_input_size) == (
        "lenet",
        "cnn",
        32,
        32,
    )
    assert lenet.weights == () and not lenet.pretrained
    assert lenet.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    inception = model_info("inception_v3")
    assert (inception.input_size, inception.resize_size, inception.min_input_size) == (
        299,
        342,
        299,
    )
    assert inception.family == "inception" and inception.pretrained
    assert "IMAGENET1K_V1" in inception.weights
    assert model_info("efficientnet_b3").input_size == 300
    assert model_info("efficientnet_v2_l").mean == (0.5, 0.5, 0.5)
    resnet = model_info("resnet50")
    assert resnet.weights == ("IMAGENET1K_V1", "IMAGENET1K_V2")
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406))
    assert model_info("vgg11_bn").family == "vgg"
    assert model_info("wide_resnet50_2").family == "wide_resnet"


def test_models_table_lists_name_family_params_size_and_pretrained() -> None:
    table = format_models_table("resnet*")
    lines = table.splitlines()
    assert lines[0].split() == ["name", "family", "params", "input", "min", "pretrained", "source"]
    row = next(line for line in lines if line.startswith("resnet50 "))
    assert row.split()[:6] == ["resnet50", "resnet", "25,557,032", "224", "1", "yes"]
    row = next(line for line in lines if line.startswith("resnet18_cifar"))
    assert row.split()[5] == "no"
    assert lines[-1] == f"{len(list_models('resnet*'))} models"
    assert "no model matches" in format_models_table("zzz*")
    # Every model, parameter counts included, without building any for real.
    assert len(format_models_table().splitlines()) == len(list_models()) + 3


# ---------------------------------------------------------------- every model trains


@pytest.mark.parametrize("name", [_param(n) for n in list_models()])
def test_forward_backward_at_min_input_size(name: str) -> None:
    """Build for 7 classes, one training step at the minimum size, then eval gives logits."""
    torch.manual_seed(0)
    info = model_info(name)
    size = info.min_input_size
    model = get_model(name, num_classes=7, input_size=size)
    model.train()
    x = torch.randn(2, 3, size, size)
    target = torch.tensor([0, 6])
    out = model(x)
    loss = training_loss(out, target, F.cross_entropy)
    loss.backward()
    logits = main_logits(out)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all() and math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Only the heads' gradients must be finite: at a 1x1 input, batch norm over two values can
    # blow up gradients deep in a 150-layer net; that is arithmetic, not a wiring bug.
    for path in _api._present_heads(model, name):
        assert all(torch.isfinite(p.grad).all() for p in model.get_submodule(path).parameters())
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert type(eval_out) is torch.Tensor and eval_out.shape == (2, 7)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_aux_heads_in_train_mode_and_plain_logits_in_eval(name: str) -> None:
    torch.manual_seed(0)
    size = model_info(name).min_input_size
    model = get_model(name, num_classes=4)
    x = torch.randn(2, 3, size, size)
    out = model.train()(x)
    assert isinstance(out, tuple) and len(out) == (3 if name == "googlenet" else 2)
    assert all(o.shape == (2, 4) for o in out)
    with torch.no_grad():
        eval_out = model.eval()(x)
    assert type(eval_out) is torch.Tensor and eval_out.shape == (2, 4)


def test_training_loss_weights_aux_logits_by_0_3() -> None:
    torch.manual_seed(0)
    y = torch.tensor([0, 2, 1])
    main, aux1, aux2 = (torch.randn(3, 3) for _ in range(3))
    ce = F.cross_entropy
    assert torch.equal(training_loss(main, y, ce), ce(main, y))
    expected = ce(main, y) + 0.3 * ce(aux1, y) + 0.3 * ce(aux2, y)
    assert torch.allclose(training_loss((main, aux1, aux2), y, ce), expected)
    outputs = tvm.GoogLeNetOutputs(main, aux2, aux1)
    assert torch.allclose(training_loss(outputs, y, ce), expected)
    inception = tvm.InceptionOutputs(main, None)  # torchvision's output with aux disabled
    assert torch.equal(training_loss(inception, y, ce), ce(main, y))
    assert main_logits(outputs) is main and main_logits(main) is main


# ---------------------------------------------------------------- heads and channels


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_head_replacement_leaves_no_1000_class_layer(name: str) -> None:
    """After loading 1000-class weights every head (aux included) is rebuilt for N classes."""
    model = _api._meta_model(_api._entry(name), 1000)
    heads = _api._present_heads(model, name)
    assert heads, name
    _api._replace_heads(model, name, 7)
    outs = [
        m.out_features if isinstance(m, nn.Linear) else m.out_channels
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    assert 1000 not in outs
    for path in heads:
        head = model.get_submodule(path)
        assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 7


def test_known_heads_are_found() -> None:
    assert _api._head_paths("resnet50") == ("fc",)
    assert _api._head_paths("alexnet") == ("classifier.6",)
    assert _api._head_paths("squeezenet1_1") == ("classifier.1",)
    assert set(_api._head_paths("googlenet")) == {"fc", "aux1.fc2", "aux2.fc2"}
    assert set(_api._head_paths("inception_v3")) == {"fc", "AuxLogits.fc"}
    assert _api._head_paths("vit_b_16") == ("heads.head",)
    assert _api._head_paths("swin_t") == ("head",)
    assert _api._head_paths("convnext_tiny") == ("classifier.2",)


@pytest.mark.parametrize("name", ["resnet18", "vit_b_32", "squeezenet1_1", "lenet5", "vgg11_cifar"])
def test_in_channels_builds_a_model_for_grayscale(name: str) -> None:
    size = model_info(name).min_input_size if name != "squeezenet1_1" else 32
    model = get_model(name, num_classes=3, in_channels=1, input_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 3)


def test_vit_is_built_for_the_requested_input_size() -> None:
    model = get_model("vit_b_32", num_classes=5, input_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        get_model("vit_b_32", num_classes=5, input_size=48)


# ---------------------------------------------------------------- pretrained weights


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make downloads fail for real even where the internet is reachable: a closed proxy port."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urllib's global opener captures the proxy settings at its first use: give this test its
    # own and drop it afterwards, so the dead proxy does not outlive the test.
    monkeypatch.setattr(urllib.request, "_opener", None)


def test_weights_name_offline_says_where_to_put_the_file(offline: None) -> None:
    weights = tvm.get_model_weights("squeezenet1_1").DEFAULT
    expected = weights_cache_path(weights)
    assert expected.name == "squeezenet1_1-b8a52dc0.pth"
    assert expected.parent == Path(torch.hub.get_dir()) / "checkpoints"
    with pytest.raises(FileNotFoundError) as err:
        get_model("squeezenet1_1", num_classes=3, pretrained="DEFAULT")
    assert str(expected) in str(err.value) and "pretrained=PATH" in str(err.value)


# (name, weights name, head prefix that is re-initialized, input size for the check forward)
CACHED_WEIGHTS = [
    ("squeezenet1_1", "DEFAULT", "classifier.1.", 32),  # head is a 1x1 convolution
    ("mobilenet_v3_small", "IMAGENET1K_V1", "classifier.3.", 32),  # classifier[-1]
    ("shufflenet_v2_x0_5", "DEFAULT", "fc.", 32),  # fc
    ("googlenet", "DEFAULT", "fc.", 32),  # aux heads dropped as torchvision does
]


@pytest.mark.parametrize(("name", "weights_name", "head", "size"), CACHED_WEIGHTS)
def test_weights_name_loads_the_hub_cache_file_then_replaces_the_head(
    name: str, weights_name: str, head: str, size: int, offline: None
) -> None:
    torch.manual_seed(1)
    weights = tvm.get_model_weights(name)[weights_name]
    kw = {"init_weights": True} if name == "googlenet" else {}
    reference = tvm.get_model(name, weights=None, **kw)  # 1000-class stand-in for the release file
    state = reference.state_dict()
    path = weights_cache_path(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)  # torchvision checks the hash only on download, not on a cached file

    model = get_model(name, num_classes=3, pretrained=weights_name, freeze_backbone=True)
    _assert_backbone_equal(model, state, head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head}weight", f"{head}bias"}
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_state_dict_path_loads_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = tvm.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = get_model("resnet18", num_classes=5, pretrained=str(path), freeze_backbone=True)
    _assert_backbone_equal(model, reference.state_dict(), "fc.")
    assert model.fc.out_features == 5
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    # A Path object and a file saved from a DDP-wrapped model work too.
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    model = get_model("resnet18", num_classes=5, pretrained=path)
    _assert_backbone_equal(model, reference.state_dict(), "fc.")


def test_inception_v3_state_dict_path_keeps_its_aux_head(tmp_path: Path) -> None:
    reference = tvm.inception_v3(init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(reference.state_dict(), path)
    model = get_model("inception_v3", num_classes=4, pretrained=path)
    _assert_backbone_equal(model, reference.state_dict(), ("fc.", "AuxLogits.fc."))
    assert model.transform_input  # as torchvision builds it for its own weights
    assert model.AuxLogits.fc.out_features == 4 and model.fc.out_features == 4


def test_cifar_model_loads_its_own_state_dict_for_new_classes(tmp_path: Path) -> None:
    trained = get_model("lenet5", num_classes=10)
    path = tmp_path / "lenet.pt"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)  # a checkpoint-style dict
    model = get_model("lenet5", num_classes=2, pretrained=path, freeze_backbone=True)
    _assert_backbone_equal(model, trained.state_dict(), "classifier.4.")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.4.weight", "classifier.4.bias"}


@pytest.mark.parametrize("name", ["googlenet", "inception_v3", "resnet18"])
def test_pretrained_layout_rebuilds_a_fine_tuned_model(name: str, tmp_path: Path) -> None:
    """A checkpoint of a fine-tuned model loads strictly into a pretrained_layout build."""
    reference = tvm.get_model(
        name, weights=None, **({} if name == "resnet18" else {"init_weights": False})
    )
    path = tmp_path / "ref.pth"
    torch.save(reference.state_dict(), path)
    fine_tuned = get_model(name, num_classes=3, pretrained=path)
    rebuilt = get_model(name, num_classes=3, pretrained_layout=True)
    rebuilt.load_state_dict(fine_tuned.state_dict())  # strict: same keys and shapes
    assert getattr(rebuilt, "transform_input", False) == getattr(
        fine_tuned, "transform_input", False
    )
    x = torch.randn(2, 3, 299, 299) if name == "inception_v3" else torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), fine_tuned.eval()(x))


@pytest.mark.data
def test_real_mobilenet_v2_imagenet_weights_load(shared_data: Path) -> None:
    path = shared_data / "mobilenet_v2-imagenet-dequantized.pth"
    state = torch.load(path, weights_only=True)
    model = get_model("mobilenet_v2", num_classes=2, pretrained=path, freeze_backbone=True)
    _assert_backbone_equal(model, state, "classifier.1.")
    assert model.classifier[1].out_features == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.1.weight", "classifier.1.bias"}
    # Kept at 1000 classes it reproduces the file exactly, head included.
    full = get_model("mobilenet_v2", num_classes=1000, pretrained=path)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, True])
def test_num_classes_below_two_raises(num_classes: object) -> None:
    with pytest.raises(ValueError, match=f"num_classes must be an int >= 2, got {num_classes!r}"):
        get_model("lenet5", num_classes=num_classes)  # type: ignore[arg-type]


def test_in_channels_a_pretrained_first_layer_cannot_take_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in_channels=1 cannot be loaded"):
        get_model("resnet18", num_classes=3, in_channels=1, pretrained="DEFAULT")
    with pytest.raises(ValueError, match="in_channels must be an int >= 1, got 0"):
        get_model("resnet18", num_classes=3, in_channels=0)
    # A CIFAR model's own checkpoint for 3 channels does not fit a 1-channel model.
    path = tmp_path / "lenet.pt"
    torch.save(get_model("lenet5", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"wrong shapes: features\.0\.weight"):
        get_model("lenet5", num_classes=10, in_channels=1, pretrained=path)


@pytest.mark.parametrize(("name", "minimum"), [("alexnet", 63), ("inception_v3", 299)])
def test_input_size_below_the_minimum_raises_at_build_time(name: str, minimum: int) -> None:
    with pytest.raises(ValueError, match=f"input size 32 is below the minimum {minimum} of"):
        get_model(name, num_classes=10, input_size=32)
    with pytest.raises(ValueError, match=f"below the minimum {minimum}"):
        check_input_size(name, 32)
    check_input_size(name, minimum)


def test_fixed_size_models_reject_other_sizes() -> None:
    with pytest.raises(ValueError, match="only takes 32x32"):
        check_input_size("lenet5", 64)
    with pytest.raises(ValueError, match="multiple of 224"):
        check_input_size("maxvit_t", 300)


@pytest.mark.parametrize(("name", "minimum"), [("alexnet", 63), ("squeezenet1_1", 17)])
def test_minimum_input_size_is_tight(name: str, minimum: int) -> None:
    """The measured minimum works and one pixel less fails (shapes only, on the meta device)."""
    model = _api._meta_model(_api._entry(name), 10).to("meta")
    model(torch.empty(2, 3, minimum, minimum, device="meta"))
    with pytest.raises(RuntimeError):
        model(torch.empty(2, 3, minimum - 1, minimum - 1, device="meta"))


def test_state_dict_for_another_architecture_names_missing_and_unexpected_keys(
    tmp_path: Path,
) -> None:
    path = tmp_path / "squeezenet.pth"
    torch.save(tvm.squeezenet1_1().state_dict(), path)
    with pytest.raises(ValueError) as err:
        get_model("shufflenet_v2_x0_5", num_classes=3, pretrained=path)
    message = str(err.value)
    assert str(path) in message and "'shufflenet_v2_x0_5'" in message
    assert "missing keys: conv1.0.weight" in message
    assert "unexpected keys: classifier.1.bias" in message and "features.0.bias" in message


def test_pretrained_path_that_does_not_exist_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        get_model("resnet18", num_classes=3, pretrained=missing)
    with pytest.raises(FileNotFoundError, match="weights.pth"):
        get_model("lenet5", num_classes=3, pretrained="weights.pth")


def test_unknown_weights_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="weights names: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        get_model("resnet50", num_classes=3, pretrained="IMAGENET22K")
    with pytest.raises(ValueError, match="none \\(it is trained from scratch\\)"):
        get_model("lenet5", num_classes=3, pretrained="DEFAULT")


def test_freeze_backbone_without_pretrained_weights_raises() -> None:
    with pytest.raises(ValueError, match="freeze_backbone=True for 'resnet18' needs pretrained"):
        get_model("resnet18", num_classes=3, freeze_backbone=True)


def test_lenet5_pooling_before_relu_is_the_chapters_network() -> None:
    """`lenet5` pools before its ReLUs (fewer elementwise passes); max and ReLU commute, so it is
    the chapter's conv-ReLU-pool network: equal outputs and gradients, the same state_dict keys
    (old checkpoints load), including inputs whose pooled windows are all negative."""
    torch.manual_seed(0)
    ours = get_model("lenet5", num_classes=10)
    _, pool1, relu1, *_ = ours.features
    assert isinstance(pool1, nn.MaxPool2d) and isinstance(relu1, nn.ReLU)
    chapter = chapter_order(get_model("lenet5", num_classes=10))  # conv, ReLU, pool
    assert [type(m) for m in chapter.features[:3]] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    chapter.load_state_dict(ours.state_dict())
    assert list(chapter.state_dict()) == list(ours.state_dict())
    x = torch.randn(8, 3, 32, 32)
    x[0] = -5.0  # every window negative: ReLU zeroes it either way
    out_ours, out_chapter = ours(x), chapter(x)
    assert torch.equal(out_ours, out_chapter)
    out_ours.square().sum().backward()
    out_chapter.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), chapter.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
