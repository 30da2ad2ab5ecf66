"""Where an image folder's splits are: torch-free, so the CLI's plan step (which must not import
torch) and the data layer use the same rule."""

from __future__ import annotations

import os
from pathlib import Path


def is_hidden(name: str) -> bool:
    """`.ipynb_checkpoints/` (Jupyter), `.DS_Store` and macOS's `._<name>` resource forks are
    neither classes nor images."""
    return name.startswith(".")


def visible_entries(folder: str | Path) -> list[os.DirEntry[str]]:
    """`folder`'s entries sorted by name, without hidden ones (`is_hidden`)."""
    entries = (e for e in os.scandir(folder) if not is_hidden(e.name))
    return sorted(entries, key=lambda e: e.name)


def find_folder_root(data_dir: str | Path) -> Path:
    """`data_dir` itself if it holds train/, or its single child that does."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(
            f"--data-dir {data_dir} is a file, not a directory; pass the folder that holds "
            "train/<class>/<image> (unpack an archive first: tar -xzf FILE -C DIR)"
        )
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"image folder {data_dir} does not exist; pass --data-dir pointing at a directory "
            "with train/<class>/<image> (and val/ or test/)"
        )
    if (data_dir / "train").is_dir():
        return data_dir
    candidates = [p for p in sorted(data_dir.iterdir()) if (p / "train").is_dir()]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in sorted(data_dir.iterdir())[:10]) or "nothing"
    raise FileNotFoundError(
        f"no train/ folder in {data_dir} (found: {found}); an image folder needs "
        "train/<class>/<image> plus optional val/ and test/"
        + (f"; several children have train/: {[p.name for p in candidates]}" if candidates else "")
    )
