"""The self-contained inference model: raw images in, class scores out.

`ImageClassifier` wraps a trained network with everything `predict` needs, so a model logged to
MLflow is usable on its own: it accepts uint8 (0..255) or float (0..1) image tensors of any size
(NCHW, CHW, or NHWC as numpy-style callers send), resizes the shorter side and center-crops to the
network's input size, normalizes with the training mean/std, and knows its class names.
The preprocessing follows torchvision's `ImageClassification` preset (resize, crop, scale,
normalize), so a torchvision ImageNet model wrapped here behaves exactly as its weights expect.

Pure torch/torchvision plus this package's model outputs (`main_logits`) and image decoder
(`cnn.data.images`): no prefect or mlflow here (the flows log this module with MLflow).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from cnn.atomic import atomic_write
from cnn.data.images import decode_file
from cnn.data.sources import IMAGE_EXTENSIONS
from cnn.folders import is_hidden
from cnn.models import main_logits, with_tta

OUTPUTS = ("probabilities", "logits")
EXPORT_BATCH = 2  # trace with 2 images: torch.export specialises a batch of 1 to a constant


class ExportedNetwork(nn.Module):
    """A `torch.export` graph as a submodule. Exported graphs are frozen in eval mode and raise
    on `.train()`/`.eval()`, which every parent module calls on its children; this wrapper
    absorbs those calls so an `ImageClassifier` can hold one."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedNetwork:
        self.training = mode  # the graph itself stays as exported (eval)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def _per_channel(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)


class ImageClassifier(nn.Module):
    """A classifier that carries its own preprocessing, class names and input size.

    `output="probabilities"` (the default for logged models) returns softmax scores, so a
    consumer of the MLflow model gets class probabilities without knowing about logits."""

    def __init__(
        self,
        model: nn.Module,
        *,
        classes: Sequence[str],
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize_size: int | None = None,
        in_channels: int = 3,
        output: str = "probabilities",
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is not valid; choose one of {', '.join(OUTPUTS)}")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"mean/std have {len(mean)}/{len(std)} values but in_channels={in_channels}; "
                "give one value per channel"
            )
        self.model = model.eval()
        self.classes = [str(c) for c in classes]
        self.input_size = int(input_size)
        self.resize_size = int(resize_size or input_size)
        self.in_channels = int(in_channels)
        self.output = output
        self.info = dict(info or {})  # provenance: model name, dataset, weights (strings)
        self.register_buffer("mean", _per_channel(mean))
        self.register_buffer("std", _per_channel(std))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Any-size uint8/float images -> normalized float NCHW at `input_size` on our device."""
        x = torch.as_tensor(images)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(
                f"expected images shaped (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)  # NHWC (numpy/PIL layout) -> NCHW
        if x.shape[1] == 4:
            x = x[:, :3]  # drop alpha
        if x.shape[1] not in (1, 3):
            raise ValueError(f"expected 1 or 3 image channels, got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {x.dtype}")
        x = x.to(self.mean.device)
        # torchvision's ImageClassification order: resize (uint8 is fine), crop, then scale.
        x = TF.resize(x, [self.resize_size], antialias=True)
        x = TF.center_crop(x, [self.input_size, self.input_size])
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.in_channels == 1:
            x = TF.rgb_to_grayscale(x)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = main_logits(self.model(self.preprocess(images))).float()
        return logits.softmax(dim=1) if self.output == "probabilities" else logits

    @torch.inference_mode()
    def topk(self, images: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """[(label, probability), ...] best first, per image."""
        scores = self(images)
        probs = scores if self.output == "probabilities" else scores.softmax(dim=1)
        values, indices = probs.topk(min(k, self.num_classes), dim=1)
        return [
            [(self.classes[int(i)], float(v)) for v, i in zip(vs, ix, strict=True)]
            for vs, ix in zip(values.cpu(), indices.cpu(), strict=True)
        ]


def preprocessing_config(clf: ImageClassifier) -> dict[str, Any]:
    """Everything a consumer needs besides the network (JSON-friendly): what the served model
    (tasks/served_model.py) and `from_exported` read back."""
    return {
        "classes": list(clf.classes),
        "input_size": clf.input_size,
        "resize_size": clf.resize_size,
        "in_channels": clf.in_channels,
        "mean": [float(v) for v in clf.mean.flatten()],
        "std": [float(v) for v in clf.std.flatten()],
        "info": {k: v for k, v in clf.info.items() if isinstance(v, (str, int, float, bool))},
    }


def export_network(clf: ImageClassifier, path: str | Path) -> Path:
    """Save the bare network as a `torch.export` program (`.pt2`) with a dynamic batch
    dimension at the network's input size; loading it needs torch only (no model code). The
    exported graph is checked against the eager network before it is written.

    Every registered family exports (tested: LeNet, AlexNet, VGG, GoogLeNet with its auxiliary
    heads, Inception v3, ResNet/ResNeXt/Wide ResNet, DenseNet, SqueezeNet, ShuffleNet,
    MobileNet v2/v3, MnasNet, EfficientNet, RegNet, ConvNeXt, Swin, ViT): in eval mode each is
    a static graph whose only dynamic size is the batch."""
    net = clf.model.cpu().eval()
    size, ch = clf.input_size, clf.in_channels
    example = torch.rand(EXPORT_BATCH, ch, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},), strict=False)
        want = main_logits(net(example))
        got = program.module()(example)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise RuntimeError(
            f"torch.export of {clf.info.get('model', type(net).__name__)} changed its outputs "
            f"(max difference {float((got - want).abs().max()):.2e}); not logging it"
        )
    return atomic_write(path, lambda f: torch.export.save(program, f))


def from_exported(network: str | Path | nn.Module, config: dict[str, Any]) -> ImageClassifier:
    """An `ImageClassifier` around an exported network (a `.pt2` path or a loaded graph) and
    its `preprocessing_config`: how `cnnpipe predict/evaluate` use a registered model."""
    if isinstance(network, (str, Path)):
        network = torch.export.load(str(network)).module()
    return ImageClassifier(
        ExportedNetwork(network),
        classes=config["classes"],
        input_size=int(config["input_size"]),
        resize_size=int(config["resize_size"]),
        mean=config["mean"],
        std=config["std"],
        in_channels=int(config["in_channels"]),
        info=dict(config.get("info") or {}),
    )


def from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", output: str = "probabilities"
) -> ImageClassifier:
    """Wrap the network of a training checkpoint (best.pt) with the preprocessing it was
    trained with (the engine stores classes, sizes and mean/std in the checkpoint's meta)."""
    from cnn.checkpoint import load_model_from_checkpoint

    model, cfg, meta = load_model_from_checkpoint(path, device=device)
    model = with_tta(model, cfg.data.tta)  # exported with it: serving predicts as validated
    missing = [k for k in ("classes", "input_size", "mean", "std") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)} in its meta; retrain it")
    return ImageClassifier(
        model,
        classes=meta["classes"],
        input_size=int(meta["input_size"]),
        resize_size=int(meta.get("resize_size") or meta["input_size"]),
        mean=meta["mean"],
        std=meta["std"],
        in_channels=int(meta.get("in_channels", 3)),
        output=output,
        # The data settings that define the splits, so `cnnpipe evaluate` can rebuild them.
        info={
            "model": cfg.model.name,
            "dataset": str(meta.get("dataset", cfg.data.dataset)),
            "val_fraction": cfg.data.val_fraction,
            "seed": cfg.repro.seed,
            "resolution": cfg.data.resolution,
            "storage": cfg.data.storage,
            "image_cap": cfg.data.image_cap,
            "tta": cfg.data.tta,
        },
    ).to(device)


def from_torchvision(
    name: str, weights_path: str | Path | None = None, output: str = "probabilities"
) -> ImageClassifier:
    """A pretrained torchvision ImageNet classifier with its own preset and category names.

    `weights_path` is a local state-dict file (offline machines); without it the default weights
    come from the torch hub cache (downloaded when online). Sizes, mean/std and the 1000 labels
    come from torchvision's weights metadata, which ships with the package (no download)."""
    import torchvision.models as tvm

    try:
        weights = tvm.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        close = [m for m in tvm.list_models() if name.split("_")[0] in m][:5]
        raise ValueError(
            f"unknown torchvision model {name!r}"
            + (f" (close: {', '.join(close)})" if close else "")
            + "; see torchvision.models.list_models()"
        ) from None
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist; check --pretrained")
        model = tvm.get_model(name, weights=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        except Exception as exc:  # not a state dict, or one for another architecture
            raise ValueError(f"{path} is not a state dict for torchvision {name}: {exc}") from exc
        source = str(path)
    else:
        try:
            model = tvm.get_model(name, weights=weights)
        except Exception as exc:  # offline without a cached file
            raise FileNotFoundError(
                f"could not load {weights} for {name} ({exc}); pass a local weights file with "
                "--pretrained PATH (offline machines have no download)"
            ) from exc
        source = str(weights)
    preset = weights.transforms()
    return ImageClassifier(
        model,
        classes=weights.meta["categories"],
        input_size=int(preset.crop_size[0]),
        resize_size=int(preset.resize_size[0]),
        mean=preset.mean,
        std=preset.std,
        output=output,
        info={"model": name, "dataset": "imagenet", "weights": source},
    )


FULL_SIZE = 1 << 16  # decode at full resolution: the model does its own resize


def load_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """Decode one image file to a uint8 CHW tensor with the data layer's decoder (the pixel
    limit included); a clear ValueError if it is not an image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; check the path")
    try:
        rgb = decode_file(path, FULL_SIZE)
    except ValueError:
        raise  # above the pixel limit: the message names the file and the fix
    except Exception as exc:
        raise ValueError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from exc
    if channels != 1:
        return rgb
    # Rounded (not truncated) luma, so a gray image keeps its exact values.
    return TF.rgb_to_grayscale(rgb.float()).round_().to(torch.uint8)


def expand_image_paths(items: Sequence[str | Path]) -> list[Path]:
    """Files as given plus the image files inside given directories (sorted, recursive; hidden
    ones left out)."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                q
                for q in p.rglob("*")
                if q.suffix.lower() in IMAGE_EXTENSIONS
                and not any(is_hidden(part) for part in q.relative_to(p).parts)
            )
            if not found:
                raise FileNotFoundError(
                    f"directory {p} holds no image files ({' '.join(IMAGE_EXTENSIONS)})"
                )
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            raise FileNotFoundError(f"image {p} does not exist; check the path")
    return paths
