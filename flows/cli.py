"""The `cnnpipe` command line: one entry point for people (torchrun uses `python -m cnn.train`).

Each sub-command imports what it needs lazily, so `cnnpipe models` stays fast and does not start
Prefect or MLflow. Commands that run flows check their input first (model, dataset, data dir,
`--set` overrides, model URIs, image files, MLflow reachability), so bad input fails in seconds
with one line naming the problem, before Prefect starts and before anything reaches MLflow.

With `--json`, stdout carries exactly one JSON document; everything else (Prefect logs, the
training job's output, MLflow messages, even output of child processes) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_T0 = time.time()  # process start (near enough): the "startup" stage is measured from here


# -------------------------------------------------------------------- output plumbing


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[Callable[[Any], None]]:
    """While enabled, fd 1 points at stderr (so prints, logging and child processes cannot
    pollute stdout) and the yielded `emit` writes the one JSON document to the real stdout."""
    if not enabled:
        yield lambda obj: print(json.dumps(obj, indent=2, default=str), flush=True)
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    docs: list[Any] = []
    try:
        yield docs.append
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout = real_stdout
        for doc in docs:
            print(json.dumps(doc, default=str), flush=True)


def _prefect_env() -> None:
    """Defaults for the embedded Prefect API: no telemetry calls (offline machines wait on
    DNS), and a start-up timeout that survives a busy machine. User settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _warm_prefect_api(enabled: bool = True) -> Callable[[], None]:
    """Start Prefect's embedded API server now, in the background, when no server is configured.

    Why: the ephemeral server is a separate process that takes seconds to boot; starting it
    while this process imports the flows and tasks overlaps the two. Prefect reuses the
    same (singleton) server for the flow run. Returns a function that waits for it. Only for
    the console script (`enabled`): in-process callers keep their own Prefect set-up."""
    import threading

    if not enabled or os.environ.get("PREFECT_API_URL"):
        return lambda: None
    # Imported here, in the main thread: importing Prefect's server ORM in a thread while
    # MLflow's SQLAlchemy store configures all mappers races (half-defined Prefect models).
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        # A failure here resurfaces when the flow starts: Prefect then starts the server itself.
        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()

    thread = threading.Thread(target=start, name="prefect-api-warmup", daemon=True)
    thread.start()
    return thread.join


def _install_sigterm() -> None:
    """SIGTERM (a process worker cancelling the run, `kill`, a scheduler) stops every training
    job of this process before exiting. Prefect's own handler runs first during a flow and hands
    the signal back to this one when it is done."""
    from tasks.launch import kill_all_jobs

    def on_term(signum: int, frame: Any) -> None:
        kill_all_jobs()
        raise SystemExit(128 + signum)

    with contextlib.suppress(ValueError):  # not in the main thread (tests): leave it
        signal.signal(signal.SIGTERM, on_term)


# -------------------------------------------------------------------- commands


def _cmd_models(args: argparse.Namespace) -> int:
    from cnn.models import format_models_table

    print(format_models_table(args.pattern))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cnn.data import prepare_dataset

    with _stdout_to_stderr(args.json) as emit:
        info = prepare_dataset(
            args.dataset,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            resolution=args.resolution,
            val_fraction=args.val_fraction,
            seed=args.seed,
            skip_bad_images=args.skip_bad_images,
        )
        if args.json:
            emit(info.to_dict())
        else:
            print(info.summary(), file=sys.stderr)
    return 0


def _train_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "cache_dir": args.cache_dir,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": args.device,
        "pretrained": args.pretrained,
        "freeze_backbone": True if args.freeze_backbone else None,
        "recipe": args.recipe,
        "config_file": args.config,
        "overrides": args.set or None,
        "nproc_per_node": args.nproc_per_node,
        "nnodes": args.nnodes,
        "node_rank": args.node_rank,
        "rdzv_endpoint": args.rdzv_endpoint,
        "max_restarts": args.max_restarts,
        "output_dir": args.output_dir,
        "register_as": args.register_as,
        "to_registry": not args.no_register,
        "experiment": args.experiment,
        "train_retries": args.retries,
    }


def _cmd_train(args: argparse.Namespace) -> int:
    from tasks.mlflow_utils import check_reachable, check_tracking
    from tasks.plan import plan_training

    if args.recipe and args.config:
        raise ValueError("give --recipe NAME or --config FILE, not both")
    from cnn.config import parse_overrides

    params = _train_params(args)
    shortcuts = ("epochs", "batch_size", "lr", "device", "pretrained", "freeze_backbone")
    overrides = {k: params[k] for k in shortcuts if params[k] is not None}
    with _stdout_to_stderr(args.json) as emit:
        plan_training(  # bad input fails here, within seconds, with nothing written anywhere
            **{k: params[k] for k in ("model", "dataset", "data_dir", "cache_dir", "recipe")},
            config_file=args.config,
            overrides={**parse_overrides(args.set), **overrides},
            nproc_per_node=args.nproc_per_node,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            rdzv_endpoint=args.rdzv_endpoint,
            max_restarts=args.max_restarts,
        )
        check_reachable()  # an unreachable MLflow server fails now, not after training
        check_tracking()
        # Only now (valid input, MLflow ready): a warm-up started earlier competes for the GIL
        # with the validation imports and slows bad-input errors down several-fold.
        wait_for_prefect = _warm_prefect_api(args.warm)
        from flows.pipeline import train_pipeline

        wait_for_prefect()
        result = train_pipeline(**params)
        result["timings"] = {
            "startup": round(result.pop("started_at") - _T0, 3),
            **result["timings"],
            "total": round(time.time() - _T0, 3),
        }
        if args.json:
            emit(result)
        else:
            _print_train_summary(result)
    return 0


def _print_train_summary(r: dict[str, Any]) -> None:
    m = r["metrics"]
    lines = [
        f"run {r['run_id']}: {m['split']} accuracy {m['test_accuracy']:.2%}, best val "
        f"{m['val_accuracy']:.2%}, {r['images_per_s']:.0f} images/s",
    ]
    if r.get("model_name"):
        crown = "champion" if r["champion"] else "not champion"
        lines.append(
            f"registered {r['model_name']} v{r['model_version']} ({crown}: {r['champion_reason']})"
        )
    lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items()))
    print("\n".join(lines), flush=True)


def _cmd_compare(args: argparse.Namespace) -> int:
    from cnn.config import parse_overrides
    from flows.pipeline import _markdown_table, _models_list, plan_comparison
    from tasks.mlflow_utils import check_reachable, check_tracking

    shortcuts = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "device": args.device}  # fmt: skip
    params = {
        "data_dir": args.data_dir,
        "cache_dir": args.cache_dir,
        "recipe": args.recipe,
        "overrides": {
            **parse_overrides(args.set),
            **{k: v for k, v in shortcuts.items() if v is not None},
        },
        "nproc_per_node": args.nproc_per_node,
    }
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ValueError(f"--max-concurrent {args.max_concurrent} must be >= 1")
    with _stdout_to_stderr(args.json) as emit:
        plan_comparison(_models_list(args.models), args.dataset, **params)
        check_reachable()
        check_tracking()
        wait_for_prefect = _warm_prefect_api(args.warm)
        from flows.pipeline import compare_architectures

        wait_for_prefect()
        result = compare_architectures(
            models=_models_list(args.models),
            dataset=args.dataset,
            max_concurrent=args.max_concurrent,
            to_registry=args.register,
            experiment=args.experiment,
            output_dir=args.output_dir,
            train_retries=args.retries,
            **params,
        )
        if args.json:
            emit(result)
        else:
            print(_markdown_table(result["rows"], result["dataset"]), flush=True)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.predict import load_classifier
    from tasks.plan import check_dataset

    if args.split not in ("train", "val", "test"):
        raise ValueError(f"--split {args.split!r} is not valid; choose train, val or test")
    check_dataset(args.dataset, args.data_dir)
    with _stdout_to_stderr(args.json) as emit:
        load_classifier(args.model_uri)  # a URI that names nothing fails before Prefect starts
        from flows.predict import evaluate_model

        result = evaluate_model(
            model_uri=args.model_uri,
            dataset=args.dataset,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            split=args.split,
        )
        if args.json:
            emit(result)
        else:
            m = result["metrics"]
            print(f"{args.model_uri} on {args.dataset}/{args.split}: accuracy {m['accuracy']:.2%}")
            for c, a in m["per_class_accuracy"].items():
                print(f"  {c:<20} {'-' if a is None else f'{a:.2%}'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cnn.export import expand_image_paths
    from flows.predict import load_classifier, load_images

    if args.topk < 1:
        raise ValueError(f"--topk {args.topk} must be >= 1")
    paths = expand_image_paths(args.images)
    load_images(paths, 3)  # a file that is not an image fails now, before any model loads
    with _stdout_to_stderr(args.json) as emit:
        load_classifier(args.model_uri, args.pretrained)  # so does a URI that names nothing
        from flows.predict import batch_predict

        result = batch_predict(
            model_uri=args.model_uri,
            inputs=[str(p) for p in paths],
            topk=args.topk,
            pretrained=args.pretrained,
        )
        if args.json:
            emit(result)
        else:
            for item in result:
                best = ", ".join(
                    f"{p['label']} {p['probability']:.1%}" for p in item["predictions"]
                )
                print(f"{item['path']}: {best}")
    return 0


# -------------------------------------------------------------------- parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `compare`."""
    p.add_argument("--dataset", required=True, help="cifar10, mnist, ..., or imagefolder")
    p.add_argument("--data-dir", default=None, help="default: the config's data_dir (data)")
    p.add_argument("--cache-dir", default=None, help="default: <data-dir>/cache")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node")
    p.add_argument("--recipe", default=None, help="a recipe in cnn/recipes/ (or a YAML path)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override any TrainConfig field (repeatable), e.g. --set weight_decay=1e-4",
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: cnnpipe)")
    p.add_argument("--retries", type=int, default=1, help="Prefect retries of a failed job")
    p.add_argument("--output-dir", default=None, help="default: runs/<model>-<dataset>-<run>")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list architectures")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'resnet*'")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("prepare", help="download and decode a dataset into the tensor cache")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--cache-dir", default=None, help="default: <data-dir>/cache")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="prepare, train, evaluate and register one model")
    p.add_argument("--model", required=True, help="see `cnnpipe models`")
    _add_run_options(p)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=None)
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts")
    p.add_argument("--config", default=None, help="a TrainConfig YAML file (not with --recipe)")
    p.add_argument(
        "--pretrained",
        nargs="?",
        const="DEFAULT",
        default=None,
        help="start from pretrained weights: a weights name (default DEFAULT) or a local file",
    )
    p.add_argument("--freeze-backbone", action="store_true", help="train only the new head")
    p.add_argument("--register-as", default=None, help="registered name (default model-dataset)")
    p.add_argument("--no-register", action="store_true", help="skip MLflow model registration")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="train several architectures and compare them")
    p.add_argument("--models", required=True, help="comma-separated, e.g. lenet5,resnet18_cifar")
    _add_run_options(p)
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="jobs at once (default: one per GPU, 1 on CPU)",
    )
    p.add_argument("--register", action="store_true", help="also register every model")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("evaluate", help="metrics of a registered model on a dataset split")
    p.add_argument("--model-uri", required=True, help="e.g. models:/lenet5-cifar10@champion")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="class names and probabilities for images")
    p.add_argument("--model-uri", required=True, help="models:/NAME@champion or torchvision:NAME")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--pretrained", default=None, help="weights file for torchvision:NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_predict)

    try:  # `cnnpipe deploy` lives in flows/deploy.py; the CLI works without it
        from flows.deploy import register_deploy_command
    except Exception:  # noqa: BLE001 - absent or broken: every other command still works
        register_deploy_command = None
    if register_deploy_command is not None:
        register_deploy_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Called with `argv` (tests, other Python code) it leaves the
    process's signal handlers alone."""
    args = build_parser().parse_args(argv)
    if args.command in ("train", "compare", "evaluate", "predict", "deploy"):
        _prefect_env()
        if argv is None:
            _install_sigterm()
    args.warm = argv is None  # console script: start Prefect's embedded API early
    from tasks.launch import TrainingJobError
    from tasks.mlflow_utils import TrackingUnavailableError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, TrackingUnavailableError) as exc:
        # Bad input: one clear line, non-zero exit, no traceback.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"cnnpipe {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except (TrainingJobError, OSError) as exc:
        # A failed job or I/O (a download that kept failing, a full disk): one line, no
        # traceback; the message names the file or URL.
        print(f"cnnpipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cnnpipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
