"""Pipeline overhead and CLI latency benchmark (issues 5, 9); one JSON object on stdout.

    uv run python benchmarks/bench_pipeline.py [--runs 2] [--data-dir DIR] [--workdir DIR]
                                              [--cli-only | --skip-cli] [--baseline REV]
                                              [--pycache-prefix DIR]

The figure: the wall time of `cnnpipe train` minus the wall time of its training job (the
torchrun process tree), on the embedded default (Prefect's ephemeral API, `sqlite:///mlflow.db`
in the working dir), for a one-epoch LeNet-5 run on the CIFAR-10 training JPEGs (an
`imagefolder` dataset, 10% held out). Target: under 10 s. `--baseline REV` measures commit REV
as well (from a temporary git worktree, with the same interpreter and data), its runs alternating
with this tree's, and reports it next to the figure (`baseline`, `overhead_vs_baseline`).

CLI latency (`cli`): wall times of `cnnpipe models`, `--help`, a bad input, a one-image
`predict` (a `torchvision:` model with a local weights file, and the `models:/` model the
pipeline registered) and `evaluate`, each as a multiple of `python -c "import torch"` timed in
the same run (median of `--repeat` runs), so the figures hold on any machine. Targets: models,
--help, bad input <= 1.0x; predict torchvision: <= 2x, models:/ <= 2.5x. Python byte-compiles
every import when no bytecode cache can be written (PYTHONDONTWRITEBYTECODE, a read-only venv),
which weighs on the figures (MLflow and torchvision are large), so the output says whether
bytecode was cached (`bytecode_cache`); `--pycache-prefix DIR` measures with a cache in DIR
(PYTHONPYCACHEPREFIX, filled by one unmeasured run of each command).

A first, unmeasured run creates the stores (MLflow schema, Prefect database) and the tensor
cache; the measured runs then see "prepare" as a cache hit, as a nightly deployment does.
Each run's stage timings come from `cnnpipe train --json`:

- `startup`: process start to the flow's first line (imports, MLflow check, Prefect API boot
  and flow-run creation); `interpreter_and_exit`: Python start-up before that plus shutdown
  after the JSON (stopping the embedded Prefect server);
- `prepare` (Prefect cache hit), `tracking_check` + `mlflow_run` (MLflow connectivity and run
  creation), `train_task_overhead` (the train task minus its job: run.yaml, Prefect task state),
  `evaluate` (figures, table, sample grid, Prefect artifacts), `register` (model logging,
  registration, alias decision).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import extract, log  # noqa: E402

SHARED_DATA = Path(os.environ.get("CNNPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_pipeline(work: Path, data: Path, cache: Path, env: dict[str, str]) -> dict[str, Any]:
    """One `cnnpipe train --json` run, timed from outside."""
    cmd = [sys.executable, "-m", "flows.cli", "train", "--model", "lenet5", "--dataset",
           "imagefolder", "--data-dir", str(data), "--cache-dir", str(cache), "--epochs", "1",
           "--register-as", "lenet5-cifar10-jpeg", "--json"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"cnnpipe train failed with exit code {proc.returncode}")
    return {"wall_s": wall, "result": json.loads(proc.stdout)}


def breakdown(run: dict[str, Any]) -> dict[str, float]:
    """Overhead stages of one run (seconds)."""
    t, wall = run["result"]["timings"], run["wall_s"]
    stages = {
        "startup": t["startup"],
        "prepare_cache_hit": t["prepare"],
        "mlflow_check_and_run": t["tracking_check"] + t["mlflow_run"],
        "validate": t["validate"],
        "train_task_overhead": t["train"] - t["train_job"],
        "evaluate": t["evaluate"],
        "register": t.get("register", 0.0),
    }
    # The rest of the flow (task/flow state reporting, run end) and what lies outside `total`;
    # the stages then add up to the overhead: wall - train_job.
    body = ("validate", "tracking_check", "prepare", "mlflow_run", "train", "evaluate", "register")
    flow_body = sum(t.get(k, 0.0) for k in body)
    stages["flow_other"] = max(t["total"] - t["startup"] - flow_body, 0.0)
    stages["interpreter_and_exit"] = max(wall - t["total"], 0.0)
    return {k: round(v, 3) for k, v in stages.items()}


def _wall(cmd: list[str], cwd: Path, env: dict[str, str], repeat: int, warm: bool) -> float:
    """Median wall time of `cmd` (its exit code is not checked: a bad input exits 2); `warm`:
    one unmeasured run first (it writes the bytecode cache)."""
    if warm:
        subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=600)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=600)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cli_latency(
    pipe: Path, data: Path, env: dict[str, str], repeat: int, registered: str | None
) -> dict[str, Any]:
    """CLI wall times as multiples of `python -c "import torch"` measured in the same run."""
    cli = [sys.executable, "-m", "flows.cli"]
    image = next((data / "train").rglob("*.jpg"))
    weights = SHARED_DATA / "mobilenet_v2-imagenet-dequantized.pth"
    cases: dict[str, list[str]] = {
        "import_torch": [sys.executable, "-c", "import torch"],
        "models": [*cli, "models"],
        "help": [*cli, "--help"],
        "bad_input": [*cli, "train", "--model", "lenet6", "--dataset", "imagefolder",
                      "--data-dir", str(data)],
    }  # fmt: skip
    if weights.is_file():
        cases["predict_torchvision"] = [*cli, "predict", "--model-uri", "torchvision:mobilenet_v2",
                                        "--pretrained", str(weights), str(image)]  # fmt: skip
    if registered:
        uri = f"models:/{registered}@champion"
        cases["predict_models_uri"] = [*cli, "predict", "--model-uri", uri, str(image)]
        cases["evaluate"] = [*cli, "evaluate", "--model-uri", uri, "--dataset", "imagefolder",
                             "--data-dir", str(data)]  # fmt: skip
    walls = {}
    cached = not env.get("PYTHONDONTWRITEBYTECODE")
    for name, cmd in cases.items():
        walls[name] = round(_wall(cmd, pipe, env, repeat, warm=cached), 3)
        log(f"cli {name}: {walls[name]:.2f} s")
    torch_s = walls["import_torch"]
    return {
        "bytecode_cache": cached,
        "wall_s": walls,
        "x_import_torch": {k: round(v / torch_s, 2) for k, v in walls.items()},
        "targets_x": {
            "models": 1.0,
            "help": 1.0,
            "bad_input": 1.0,
            "predict_torchvision": 2.0,
            "predict_models_uri": 2.5,
        },  # fmt: skip
    }


def _side_env(env: dict[str, str], tree: Path) -> dict[str, str]:
    """`env` with `tree` first on PYTHONPATH: `python -m flows.cli` runs that checkout."""
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    return {**env, "PYTHONPATH": os.pathsep.join([str(tree), *rest])}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best run's overhead and stages, the median, and every run."""
    best = min(runs, key=lambda r: r["overhead_s"])
    return {
        "overhead_s": round(best["overhead_s"], 3),
        "overhead_median_s": round(statistics.median(r["overhead_s"] for r in runs), 3),
        "wall_s": round(best["wall_s"], 3),
        "train_job_s": best["result"]["timings"]["train_job"],
        "stages": best["stages"],
        "runs": [
            {
                "wall_s": round(r["wall_s"], 3),
                "overhead_s": round(r["overhead_s"], 3),
                "stages": r["stages"],
                "timings": r["result"]["timings"],
            }
            for r in runs
        ],
    }


def measure(
    sides: dict[str, Path], work: Path, data: Path, cache: Path, env: dict[str, str], n: int
) -> dict[str, list[dict[str, Any]]]:
    """A warm-up run per side (its stores, the tensor cache), then `n` measured runs of each,
    alternating sides so that the machine's drift hits both alike."""
    pipes = {}
    for side, tree in sides.items():
        pipes[side] = work / ("pipeline" if side == "current" else f"pipeline-{side}")
        pipes[side].mkdir(exist_ok=True)
        log(f"{side}: warm-up run (stores, tensor cache) ...")
        warm = run_pipeline(pipes[side], data, cache, _side_env(env, tree))
        log(f"{side}: warm-up {warm['wall_s']:.1f} s")
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for i in range(n):
        for side, tree in sides.items():
            run = run_pipeline(pipes[side], data, cache, _side_env(env, tree))
            run["stages"] = breakdown(run)
            run["overhead_s"] = run["wall_s"] - run["result"]["timings"]["train_job"]
            log(f"{side} run {i + 1}: wall {run['wall_s']:.1f} s, overhead "
                f"{run['overhead_s']:.1f} s")  # fmt: skip
            runs[side].append(run)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cnnpipe-bench"
    )
    parser.add_argument("--runs", type=int, default=2, help="measured runs (after a warm-up)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per CLI latency figure")
    parser.add_argument("--cli-only", action="store_true", help="CLI latency only (no training)")
    parser.add_argument("--skip-cli", action="store_true", help="pipeline overhead only")
    parser.add_argument(
        "--baseline", metavar="REV", help="also measure commit REV (a git worktree), alternating"
    )
    parser.add_argument(
        "--pycache-prefix", type=Path, help="cache bytecode in DIR (PYTHONPYCACHEPREFIX)"
    )
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = extract(args.data_dir, work, None)
    cache = work / "cache"  # shared with bench_data.py / bench_train.py: decoded once
    pipe = work / "pipeline"  # the cwd: its mlflow.db is the embedded default store
    pipe.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env = _side_env(env, REPO)
    env.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    if args.pycache_prefix is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(args.pycache_prefix.resolve())

    if args.cli_only:
        # The model an earlier full run registered, if there was one.
        registered = "lenet5-cifar10-jpeg" if (pipe / "mlflow.db").exists() else None
        print(json.dumps({"cli": cli_latency(pipe, data, env, args.repeat, registered)}, indent=2))
        return 0
    with contextlib.ExitStack() as stack:
        sides = {"current": REPO}
        if args.baseline:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipeline-")))
            tree = tmp / "baseline"
            git = ["git", "-C", str(REPO), "worktree"]
            subprocess.run([*git, "add", "--detach", str(tree), args.baseline], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            stack.callback(subprocess.run, [*git, "remove", "--force", str(tree)], check=False)
            sides = {"baseline": tree, "current": REPO}
        runs = measure(sides, work, data, cache, env, args.runs)
    current = _summary(runs["current"])
    best = min(runs["current"], key=lambda r: r["overhead_s"])
    out: dict[str, Any] = {
        "figure": "cnnpipe train wall time minus training-job wall time (s)",
        **current,
        "target_s": 10.0,
        "test_accuracy": best["result"]["metrics"]["test_accuracy"],
        "images_per_s": best["result"]["images_per_s"],
    }
    if args.baseline:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.baseline], check=True,
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
        out["baseline"] = {"rev": rev, **_summary(runs["baseline"])}
        ratio = current["overhead_s"] / out["baseline"]["overhead_s"]
        out["overhead_vs_baseline"] = round(ratio, 3)
    if not args.skip_cli:
        out["cli"] = cli_latency(pipe, data, env, args.repeat, best["result"].get("model_name"))
    out["load_average"] = os.getloadavg()
    out["cpu_count"] = os.cpu_count()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
