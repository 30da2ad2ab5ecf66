"""A benchmark of this working tree against a baseline commit, in one run.

    uv run python benchmarks/bench_data_compare.py [--bench data|train] [--baseline REV]
                                                  [--rounds 2] [the benchmark's own args]

Runs the benchmark script of a baseline commit from a temporary ``git worktree`` and of this
working tree, alternating ``--rounds`` times on the same machine and data, and prints one JSON
object: each side's best figures and the ratio current / baseline (1.0 = no change).

- ``--bench data`` (default): ``benchmarks/bench_data.py``, the in-memory data path; baseline
  the last commit before the shard store (9fa3be9). CIFAR-10 and the ants/bees set keep the
  in-memory path, so these ratios are the "no loss of speed" check of issue 11.
- ``--bench train``: ``benchmarks/bench_train.py --skip-time-to-target``, the engine's LeNet
  images/s (1 rank, 2 ranks) and the chapter loop; baseline the last commit before the engine
  and config redesign of issue 12 (a39a7b6).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


class Bench(NamedTuple):
    script: str
    args: list[str]  # its work-folder flag first (the scripts spell it differently)
    baseline: str  # default baseline commit
    figures: dict[str, tuple[str, str]]  # figure -> path in the script's JSON


BENCHES = {
    "data": Bench(
        "bench_data.py", ["--work-dir"], "9fa3be929a4063d63985ebc2d9371cf3113ed291",
        {
            "prepare_images_per_s": ("prepare", "images_per_s"),
            "loader_images_per_s": ("loader", "ours_images_per_s"),
            "lenet_train_images_per_s": ("lenet_train", "ours_images_per_s"),
        },
    ),
    "train": Bench(
        "bench_train.py", ["--workdir", "--skip-time-to-target"],
        "a39a7b6bde27fc58c9e70ac8a02f9044a8c50b9b",
        {
            "chapter_loop_images_per_s": ("throughput", "chapter_loop_images_per_s"),
            "engine_1rank_images_per_s": ("throughput", "1rank_x_1thread_images_per_s"),
            "engine_2ranks_images_per_s": ("throughput", "2ranks_x_1thread_images_per_s"),
        },
    ),
}  # fmt: skip


def run(bench: str, tree: Path, work: Path, extra: list[str]) -> dict:
    b = BENCHES[bench]
    workdir_flag, *args = b.args
    cmd = [sys.executable, str(tree / "benchmarks" / b.script), workdir_flag, str(work),
           "--data-dir", str(DATA), *args]  # fmt: skip
    out = subprocess.run([*cmd, *extra], cwd=tree, stdout=subprocess.PIPE, text=True, check=True)
    res = json.loads(out.stdout[out.stdout.index("{") :])
    return {k: res[x][y] for k, (x, y) in b.figures.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", choices=sorted(BENCHES), default="data")
    ap.add_argument("--baseline", default=None, help="default: the benchmark's baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=None)
    args, extra = ap.parse_known_args()
    global DATA
    DATA = args.data_dir or Path(os.environ.get("CNNPIPE_SHARED_DATA", DATA))
    baseline = args.baseline or BENCHES[args.bench].baseline
    with tempfile.TemporaryDirectory(prefix="bench-data-compare-") as tmp:
        base_tree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), baseline],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            best: dict[str, dict[str, float]] = {"baseline": {}, "current": {}}
            for r in range(args.rounds):
                for side, tree in (("baseline", base_tree), ("current", REPO)):
                    print(f"round {r + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
                    figs = run(args.bench, tree, Path(tmp) / f"work-{side}", extra)
                    print(f"  {figs}", file=sys.stderr, flush=True)
                    for k, v in figs.items():
                        best[side][k] = max(best[side].get(k, 0), v)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)],
                check=False,
            )
    ratio = {k: round(best["current"][k] / best["baseline"][k], 3) for k in best["current"]}
    load = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({"bench": args.bench, "baseline_rev": baseline, **best,
                      "current_over_baseline": ratio, "load_average_after": load}))  # fmt: skip


if __name__ == "__main__":
    main()
