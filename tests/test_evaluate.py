"""evaluate(): counts match a direct computation, with uneven batches and an empty class.
(Exactness across ranks is checked with real torchrun jobs in tests/test_torchrun.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn.evaluate import evaluate


class Fixed(nn.Module):
    """Returns precomputed logits for each input row (the row index is the input)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.long()]


@pytest.mark.parametrize("num_classes", [3, 12])
def test_metrics_match_direct_computation(num_classes: int) -> None:
    g = torch.Generator().manual_seed(0)
    n = 53
    logits = torch.randn(n, num_classes, generator=g) * 3
    labels = torch.randint(0, num_classes - 1, (n,), generator=g)  # last class never appears
    # Uneven batches (7, 7, ..., 4), like a rank's contiguous shard.
    loader = [(torch.arange(i, min(i + 7, n)), labels[i : i + 7]) for i in range(0, n, 7)]
    res = evaluate(Fixed(logits), loader, num_classes, device=torch.device("cpu"))

    pred = logits.argmax(1)
    assert res.num_samples == n
    assert res.accuracy == pytest.approx((pred == labels).float().mean().item())
    assert res.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for t, p in zip(labels, pred, strict=True):
        cm[t, p] += 1
    assert res.confusion_matrix == cm.tolist()
    for k in range(num_classes - 1):
        mask = labels == k
        expected = (pred[mask] == k).float().mean().item() if mask.any() else None
        assert res.per_class_accuracy[k] == pytest.approx(expected)
    assert res.per_class_accuracy[-1] is None  # no samples: no accuracy, not 0
    if num_classes >= 10:
        top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
        assert res.top5 == pytest.approx(top5)
    else:
        assert res.top5 is None
    names = [f"c{k}" for k in range(num_classes)]
    d = res.to_dict(names)
    assert list(d["per_class_accuracy"]) == names
    assert "c0" in res.format_table(names)


def test_empty_loader_gives_nan_not_crash() -> None:
    res = evaluate(Fixed(torch.zeros(1, 2)), [], 2, device=torch.device("cpu"))
    assert res.num_samples == 0 and math.isnan(res.accuracy)
