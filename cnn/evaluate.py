"""Exact evaluation under DDP: each rank counts its own shard, then the counts are summed.

Eval loaders shard contiguously without padding, so every sample is counted exactly once. We sum
the confusion matrix, loss sum and top-5 hits across ranks (never average per-rank accuracies,
which is wrong for unequal shards). Everything else is derived from the summed counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnn.dist import all_reduce_sum
from cnn.models import main_logits


@dataclass
class EvalResult:
    """Metrics of one evaluation. `top5` is None below 10 classes (it would be trivially high);
    per-class accuracy is None for a class with no samples."""

    accuracy: float
    loss: float
    top5: float | None
    per_class_accuracy: list[float | None]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    num_samples: int

    def to_dict(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-friendly dict; with `classes`, per-class accuracy is keyed by class name."""
        out = asdict(self)
        if classes is not None:
            out["per_class_accuracy"] = dict(zip(classes, self.per_class_accuracy, strict=True))
        return out

    def format_table(self, classes: Sequence[str]) -> str:
        """The chapter's per-class accuracy table, as text."""
        width = max(len(c) for c in classes)
        lines = [f"{'class':<{width}}  accuracy  n"]
        for k, (c, acc) in enumerate(zip(classes, self.per_class_accuracy, strict=True)):
            n = sum(self.confusion_matrix[k])
            lines.append(
                f"{c:<{width}}  " + ("   -    " if acc is None else f"{acc:8.2%}") + f"  {n}"
            )
        return "\n".join(lines)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    dist: Any = None,
    *,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> EvalResult:
    """Accuracy, top-5, loss, per-class accuracy and confusion matrix, summed over all ranks.

    Pass the model WITHOUT its DDP wrapper: ranks may hold different numbers of batches and
    DDP's forward would wait on collectives that the other ranks never join. `dist` (a DistInfo)
    is accepted for the device; reductions use the default process group when it exists."""
    if device is None:
        device = dist.device if dist is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    c = num_classes
    confusion = torch.zeros(c * c, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5_hits = torch.zeros((), dtype=torch.int64, device=device)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    )
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = main_logits(model(x))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(dim=1)
        confusion += torch.bincount(y * c + pred, minlength=c * c)
        if c >= 10:
            top5_hits += (logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
    # One reduction for everything; float64 holds integer counts exactly up to 2**53.
    packed = torch.cat([confusion.double(), loss_sum[None], top5_hits.double()[None]])
    all_reduce_sum(packed)
    packed = packed.cpu()
    matrix = packed[: c * c].round().long().view(c, c)
    n = int(matrix.sum())
    correct = int(matrix.diag().sum())
    per_class_n = matrix.sum(dim=1)
    per_class = [
        None if int(per_class_n[k]) == 0 else float(matrix[k, k]) / float(per_class_n[k])
        for k in range(c)
    ]
    model.train(was_training)
    return EvalResult(
        accuracy=correct / n if n else math.nan,
        loss=float(packed[c * c]) / n if n else math.nan,
        top5=(float(packed[c * c + 1]) / n if n else math.nan) if c >= 10 else None,
        per_class_accuracy=per_class,
        confusion_matrix=matrix.tolist(),
        num_samples=n,
    )
