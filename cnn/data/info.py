"""What preparing a dataset produced (`PreparedInfo`), importable without torchvision.

The Prefect prepare task returns it and Prefect's cache stores it; a cache hit unpickles it in
the pipeline's own process, which must not pay for importing torchvision (about 1.6 s) before
the training job is launched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FORMAT_VERSION", "PreparedInfo"]

# The tensor cache's format (its meta.json "format"); part of the cache key and of Prefect's
# cache key for the prepare task (tasks/prepare.py). Bumped when decoding changes what a cache
# holds, so that older caches (and shard stores, whose key includes it) are rebuilt, not mixed:
# 2: EXIF orientation applied (photos stored sideways are upright); 16-bit images keep their
# high bits (caches from before that fix held white images).
FORMAT_VERSION = 2


@dataclass
class PreparedInfo:
    """What ``prepare_dataset`` returns; JSON-friendly via ``to_dict()``."""

    path: Path
    dataset: str
    classes: list[str]
    num_classes: int
    in_channels: int
    resolution: int
    splits: dict[str, int]
    test_is_val: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source_hash: str
    cache_hit: bool
    seconds: float
    skipped_bad_images: int = 0
    decoded_images: int = 0  # images decoded by this call (0 on a cache hit)
    params: dict = field(default_factory=dict)
    # "memory": uint8 tensors of square `resolution` images; "shards": the streaming store of
    # JPEGs whose shorter side is at most `resolution` (aspect ratio kept), see shards.py.
    storage: str = "memory"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreparedInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        from .shards import is_remote

        d["path"] = d["path"] if is_remote(d["path"]) else Path(d["path"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def summary(self) -> str:
        """A few human-readable lines for the CLI."""
        how = "cache hit" if self.cache_hit else f"prepared in {self.seconds:.1f} s"
        stored = (
            f"stored as JPEG shards, shorter side <= {self.resolution}"
            if self.storage == "shards"
            else f"stored as uint8 {self.resolution}x{self.resolution}"
        )
        lines = [
            f"dataset {self.dataset}: {self.num_classes} classes, {self.in_channels} channel(s), "
            + stored,
            f"  cache: {self.path} ({how})",
            "  splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()),
        ]
        if self.test_is_val:
            lines.append(
                "  note: the source has no separate test split; test is the val split "
                "(test_is_val=True)"
            )
        if self.skipped_bad_images:
            lines.append(f"  skipped {self.skipped_bad_images} unreadable image(s)")
        fmt = ", ".join
        lines.append(
            f"  mean ({fmt(f'{m:.4f}' for m in self.mean)})  "
            f"std ({fmt(f'{s:.4f}' for s in self.std)})  (train split, 0..1 scale)"
        )
        shown = self.classes[:10]
        more = f" ... (+{len(self.classes) - 10})" if len(self.classes) > 10 else ""
        lines.append(f"  classes: {' '.join(shown)}{more}")
        lines.append(f"  source hash: {self.source_hash[:16]}")
        return "\n".join(lines)
