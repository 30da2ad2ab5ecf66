"""The registered image classifier as MLflow "model from code": this file is copied into every
logged model and executed when the model loads, so it imports only mlflow, torch, torchvision,
numpy and pandas (which mlflow brings) -- never anything of this project. That is what lets
`mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve` work in a bare
environment.

Artifacts of the logged model:
- `network`: the trained network as a `torch.export` program (`.pt2`) with a dynamic batch
  dimension, traced at the network's input size;
- `preprocessing`: JSON with class names, input size, eval resize, mean/std and channels.

`predict` takes uint8 (0..255) images of any size, NCHW or NHWC (one image: CHW/HWC), does what
the training evaluation did (resize the shorter side, center-crop, scale, normalise), runs the
network and returns one row per image: the top `label`, its `probability`, and `probabilities`
(class name -> probability). The same steps as `cnn.export.ImageClassifier.preprocess`;
tests/test_serving.py checks that both give the same numbers.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from torchvision.transforms.v2 import functional as TF


def preprocess(images: Any, cfg: dict[str, Any]) -> torch.Tensor:
    """uint8/float images of any size -> normalised float NCHW at the network's input size."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected images shaped (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)  # NHWC (numpy/PIL layout) -> NCHW
    if x.shape[1] == 4:
        x = x[:, :3]  # drop alpha
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 image channels, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {x.dtype}")
    size = int(cfg["input_size"])
    x = TF.resize(x, [int(cfg["resize_size"])], antialias=True)
    x = TF.center_crop(x, [size, size])
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    channels = int(cfg["in_channels"])
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = TF.rgb_to_grayscale(x)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


class ImageClassifierModel(PythonModel):
    """Images in; class names and probabilities out."""

    def load_context(self, context: Any) -> None:
        with open(context.artifacts["preprocessing"]) as f:
            self.config: dict[str, Any] = json.load(f)
        self.classes: list[str] = list(self.config["classes"])
        self.network = torch.export.load(context.artifacts["network"]).module()

    @torch.inference_mode()
    def probabilities(self, images: Any) -> torch.Tensor:
        """(N, classes) softmax scores."""
        return self.network(preprocess(images, self.config)).float().softmax(dim=1)

    # No type hints here on purpose: MLflow would try to derive a schema from them; the logged
    # signature (uint8 image tensor in) is the contract.
    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):  # a one-column frame of image arrays
            model_input = np.stack([np.asarray(v) for v in model_input.iloc[:, 0]])
        probs = self.probabilities(model_input).cpu().numpy()
        top = probs.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": [self.classes[int(i)] for i in top],
                "probability": [float(p[i]) for p, i in zip(probs, top, strict=True)],
                "probabilities": [
                    {c: float(v) for c, v in zip(self.classes, p, strict=True)} for p in probs
                ],
            }
        )


mlflow.models.set_model(ImageClassifierModel())
