"""The self-contained inference model (cnn/export.py): raw images in, class scores out."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from cnn.checkpoint import save_checkpoint
from cnn.config import TrainConfig
from cnn.export import (
    ImageClassifier,
    expand_image_paths,
    export_network,
    from_checkpoint,
    from_torchvision,
    load_image,
)
from cnn.models import FlipAverage, get_model, with_tta


def _classifier(output: str = "probabilities", in_channels: int = 3) -> ImageClassifier:
    torch.manual_seed(0)
    model = get_model("lenet5", num_classes=3, in_channels=in_channels)
    return ImageClassifier(
        model,
        classes=["cat", "dog", "eel"],
        input_size=32,
        mean=[0.5] * in_channels,
        std=[0.25] * in_channels,
        in_channels=in_channels,
        output=output,
    )


def test_uint8_and_float_inputs_agree_and_give_probabilities() -> None:
    clf = _classifier()
    x8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    p8 = clf(x8)
    pf = clf(x8.float() / 255.0)
    assert p8.shape == (4, 3)
    torch.testing.assert_close(p8, pf, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p8.sum(dim=1), torch.ones(4))


def test_any_size_and_layout_is_resized_inside() -> None:
    clf = _classifier(output="logits")
    big = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8)
    assert clf.preprocess(big).shape == (2, 3, 32, 32)
    # NHWC (numpy/PIL layout) and a single CHW image are accepted as well.
    torch.testing.assert_close(clf(big.permute(0, 2, 3, 1)), clf(big))
    assert clf(big[0]).shape == (1, 3)
    # Preprocessing is resize-shorter-side then center-crop, then (x - mean) / std.
    flat = torch.full((1, 3, 64, 96), 255, dtype=torch.uint8)
    torch.testing.assert_close(clf.preprocess(flat), torch.full((1, 3, 32, 32), 2.0))


def test_gray_and_rgb_inputs_adapt_to_the_model_channels() -> None:
    rgb_model = _classifier()
    gray = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8)
    assert rgb_model(gray).shape == (1, 3)
    gray_model = _classifier(in_channels=1)
    assert gray_model(torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)).shape == (1, 3)


def test_bad_inputs_raise_clear_errors() -> None:
    clf = _classifier()
    with pytest.raises(ValueError, match="shape"):
        clf(torch.zeros(32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="int64"):
        clf(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="output='scores'"):
        _classifier(output="scores")


def test_topk_uses_class_names_and_survives_pickling() -> None:
    clf = _classifier()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    top = clf.topk(x, k=2)
    assert len(top) == 2 and all(len(t) == 2 for t in top)
    assert {label for t in top for label, _ in t} <= {"cat", "dog", "eel"}
    assert all(t[0][1] >= t[1][1] for t in top)
    again = pickle.loads(pickle.dumps(clf))  # MLflow's pytorch flavor pickles the module
    assert again.classes == clf.classes and again.input_size == 32
    torch.testing.assert_close(again(x), clf(x))


def test_from_checkpoint_restores_preprocessing_and_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_model("lenet5", num_classes=2)
    cfg = TrainConfig().replace(model="lenet5", dataset="imagefolder", val_fraction=0.2, seed=3)
    meta = {
        "classes": ["ants", "bees"],
        "num_classes": 2,
        "in_channels": 3,
        "input_size": 32,
        "resize_size": 32,
        "mean": [0.4, 0.45, 0.5],
        "std": [0.2, 0.21, 0.22],
        "dataset": "imagefolder",
    }
    state = {"model": model.state_dict(), "config": cfg.to_dict(),
             "config_hash": cfg.config_hash(), "meta": meta}  # fmt: skip
    path = save_checkpoint(state, tmp_path / "best.pt")
    clf = from_checkpoint(path)
    assert clf.classes == ["ants", "bees"]
    assert clf.info["val_fraction"] == 0.2 and clf.info["seed"] == 3
    torch.testing.assert_close(clf.mean.flatten(), torch.tensor(meta["mean"]))
    x = torch.rand(2, 3, 32, 32)
    expected = model.eval()((x - clf.mean) / clf.std).softmax(1)
    torch.testing.assert_close(clf(x), expected)


def test_flip_tta_averages_an_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    net = get_model("lenet5", num_classes=3).eval()
    tta = with_tta(net, "flip")
    assert isinstance(tta, FlipAverage) and with_tta(net, "none") is net
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(tta(x), (net(x) + net(x.flip(-1))) / 2)
    torch.testing.assert_close(tta(x.flip(-1)), tta(x))  # a mirror image scores the same
    assert not torch.allclose(net(x.flip(-1)), net(x))  # which the bare network does not
    with pytest.raises(ValueError, match="tta='sideways' is not valid; choose none or flip"):
        with_tta(net, "sideways")


def test_tta_run_exports_and_serves_with_its_tta(tmp_path: Path) -> None:
    """A checkpoint trained with data.tta=flip: `from_checkpoint` and the exported `.pt2`
    (what a registered model serves) both predict through the flip average."""
    torch.manual_seed(0)
    model = get_model("lenet5", num_classes=2)
    cfg = TrainConfig().replace(model="lenet5", dataset="imagefolder", tta="flip")
    meta = {"classes": ["a", "b"], "num_classes": 2, "in_channels": 3, "input_size": 32,
            "resize_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}  # fmt: skip
    state = {"model": model.state_dict(), "config": cfg.to_dict(),
             "config_hash": cfg.config_hash(), "meta": meta}  # fmt: skip
    clf = from_checkpoint(save_checkpoint(state, tmp_path / "best.pt"), output="logits")
    assert clf.info["tta"] == "flip"
    x = torch.rand(3, 3, 32, 32)
    norm = (x - clf.mean) / clf.std
    want = (model.eval()(norm) + model(norm.flip(-1))) / 2
    torch.testing.assert_close(clf(x), want)
    program = torch.export.load(str(export_network(clf, tmp_path / "network.pt2"))).module()
    torch.testing.assert_close(program(norm), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(program(norm.flip(-1)), want, rtol=1e-4, atol=1e-5)


def test_from_torchvision_uses_its_preset_and_imagenet_labels(tmp_path: Path) -> None:
    import torchvision

    weights = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), weights)
    clf = from_torchvision("squeezenet1_1", weights)
    assert len(clf.classes) == 1000 and clf.classes[0] == "tench"
    assert (clf.input_size, clf.resize_size) == (224, 256)
    assert clf(torch.randint(0, 256, (1, 3, 300, 200), dtype=torch.uint8)).shape == (1, 1000)
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet99'"):
        from_torchvision("resnet99")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        from_torchvision("squeezenet1_1", tmp_path / "nope.pth")


def test_load_image_and_paths(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.bmp")
    (tmp_path / "notes.jpg").write_text("not an image")
    img = load_image(tmp_path / "red.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 10, 20) and int(img[0, 0, 0]) == 255
    assert load_image(tmp_path / "gray.bmp", channels=1).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="notes.jpg is not a readable image"):
        load_image(tmp_path / "notes.jpg")
    assert [p.name for p in expand_image_paths([tmp_path])] == ["gray.bmp", "notes.jpg", "red.png"]
    # Hidden files and folders are not the user's images (macOS resource forks, Jupyter).
    (tmp_path / "._red.png").write_bytes(b"\0\5\x16\x07")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".ipynb_checkpoints" / "red-checkpoint.png")
    assert [p.name for p in expand_image_paths([tmp_path])] == ["gray.bmp", "notes.jpg", "red.png"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        expand_image_paths([tmp_path / "missing.png"])


@pytest.mark.data
def test_pretrained_mobilenet_names_ants_and_bees(shared_data: Path, tmp_path: Path) -> None:
    """The chapter's zero-shot check with real weights: an ImageNet model names an ant."""
    with tarfile.open(shared_data / "hymenoptera_data.tar.gz") as tar:
        members = [m for m in tar.getmembers() if "val/ants/" in m.name and m.isfile()][:3]
        tar.extractall(tmp_path, members=members, filter="data")
    clf = from_torchvision("mobilenet_v2", shared_data / "mobilenet_v2-imagenet-dequantized.pth")
    hits = 0
    for m in members:
        labels = [label for label, _ in clf.topk(load_image(tmp_path / m.name), k=5)[0]]
        hits += any("ant" in label.split() for label in labels)
    assert hits >= 2
