"""The in-memory data path before and after the shard store (issue 11), in one run.

    uv run python benchmarks/bench_data_compare.py [--baseline REV] [--rounds 2] [bench_data args]

Runs ``benchmarks/bench_data.py`` of a baseline commit (default: the last commit before the
shard store, 9fa3be9) from a temporary ``git worktree`` and of this working tree, alternating
``--rounds`` times on the same machine and data, and prints one JSON object: each side's best
figures and the ratio current / baseline (1.0 = no change). CIFAR-10 and the ants/bees set keep
the in-memory path, so these ratios are the "no loss of speed" check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BASELINE = "9fa3be929a4063d63985ebc2d9371cf3113ed291"  # parent of the shard-store commits
FIGURES = {
    "prepare_images_per_s": ("prepare", "images_per_s"),
    "loader_images_per_s": ("loader", "ours_images_per_s"),
    "lenet_train_images_per_s": ("lenet_train", "ours_images_per_s"),
}


def run(tree: Path, work: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_data.py"), "--work-dir", str(work),
           "--data-dir", str(DATA)]  # fmt: skip
    out = subprocess.run([*cmd, *extra], cwd=tree, stdout=subprocess.PIPE, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: res[a][b] for k, (a, b) in FIGURES.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=None)
    args, extra = ap.parse_known_args()
    global DATA
    DATA = args.data_dir or Path(os.environ.get("CNNPIPE_SHARED_DATA", DATA))
    with tempfile.TemporaryDirectory(prefix="bench-data-compare-") as tmp:
        base_tree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.baseline],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            best: dict[str, dict[str, float]] = {"baseline": {}, "current": {}}
            for r in range(args.rounds):
                for side, tree in (("baseline", base_tree), ("current", REPO)):
                    print(f"round {r + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
                    figs = run(tree, Path(tmp) / f"work-{side}", extra)
                    print(f"  {figs}", file=sys.stderr, flush=True)
                    for k, v in figs.items():
                        best[side][k] = max(best[side].get(k, 0), v)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)],
                check=False,
            )
    ratio = {k: round(best["current"][k] / best["baseline"][k], 3) for k in FIGURES}
    print(json.dumps({"baseline_rev": args.baseline, **best, "current_over_baseline": ratio}))


if __name__ == "__main__":
    main()
