"""The `cnnpipe` command line: one entry point for people (torchrun uses `python -m cnn.train`).

Each sub-command imports what it needs lazily: `cnnpipe models`, `--help` and the plan step's
bad-input errors import no torch, Prefect or MLflow (model metadata comes from
`tasks/models_table.json`). Commands that run flows check everything checkable first (see
`tasks/plan.py`), so bad input fails in seconds with exit code 2 and one line naming the problem,
before Prefect's server serves (`flows/prefect_api.py`) and before anything is written.
`predict` and `evaluate` run as plain functions unless a Prefect server is configured
(PREFECT_API_URL) or `--flow` is given.

Signals: Ctrl-C (SIGINT to the process group) and SIGTERM stop every training job of this
process, start no further job, mark the MLflow run KILLED and exit 130/143 with one line. The
embedded Prefect server runs in its own session (Ctrl-C does not reach it) and stops when this
process dies, even by SIGKILL; a run left RUNNING by a killed cnnpipe is marked KILLED by the
next `cnnpipe train`/`compare`. Exit is bounded: if Prefect's background services hang at
interpreter exit, the process still ends within EXIT_GRACE_S.

With `--json`, stdout carries exactly one JSON document; everything else (Prefect logs, the
training job's output, MLflow messages, even output of child processes) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from flows import prefect_api
from flows.deploy import register_deploy_command
from tasks.request import CompareRequest, TrainRequest, add_options

_T0 = time.time()  # process start (near enough): the "startup" stage is measured from here
EXIT_GRACE_S = 8.0  # the longest the interpreter may take to exit after the command is done
SIGNAL_GRACE_S = 4.0  # SIGTERM -> SIGKILL grace for training jobs when a signal arrives
_EXITING = False  # set once the command returned: a signal then ends the process at once


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


# -------------------------------------------------------------------- processes and signals


_WATCHDOG: list[threading.Timer] = []


def _arm_exit_watchdog(code: int, seconds: float = EXIT_GRACE_S) -> None:
    """End the process with `code` after `seconds`, whatever is still running: Prefect's
    services drain logs and events at exit and can wait forever for a server that is gone."""
    if _WATCHDOG:
        return

    def force() -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(code)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
    _WATCHDOG.append(timer)


def _shutdown_prefect(timeout: float) -> None:
    """Deliver Prefect's queued logs and events while its API still runs, then stop the
    embedded server, all within `timeout` seconds (each step in a daemon thread)."""

    def drain() -> None:
        if "prefect" not in sys.modules:
            return
        from prefect._internal.concurrency.services import _QueueServiceBase

        classes, stack = [], list(_QueueServiceBase.__subclasses__())
        while stack:
            cls = stack.pop()
            classes.append(cls)
            stack.extend(cls.__subclasses__())
        for cls in classes:
            with contextlib.suppress(Exception):
                if getattr(cls, "_instances", None):
                    cls.drain_all(timeout=timeout)  # type: ignore[attr-defined]

    def stop_server() -> None:
        prefect_api.stop()
        # A server Prefect started itself (in-process callers that bring none of their own).
        server_module = sys.modules.get("prefect.server.api.server")
        instances = server_module.SubprocessASGIServer._instances if server_module else {}
        for server in list(instances.values()):
            with contextlib.suppress(Exception):
                server.stop()

    deadline = time.monotonic() + timeout
    for step in (drain, stop_server):
        thread = threading.Thread(target=step, daemon=True)
        thread.start()
        thread.join(max(deadline - time.monotonic(), 0.5))


# Ctrl-C; `kill`, a scheduler or a process worker cancelling the run; the terminal closing.
_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def _install_signal_handlers() -> None:
    """`_STOP_SIGNALS` stop every training job of this process and forbid new ones before the
    exception unwinds the flow (which marks the MLflow run KILLED); the exit is bounded by a
    watchdog."""
    from tasks.launch import kill_all_jobs

    def on_signal(signum: int, frame: Any) -> None:
        if _EXITING:  # the command is done; only interpreter exit is left: end now
            os._exit(128 + signum)
        _arm_exit_watchdog(128 + signum, EXIT_GRACE_S + SIGNAL_GRACE_S)
        kill_all_jobs(SIGNAL_GRACE_S, stop=True)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    with contextlib.suppress(ValueError):  # not in the main thread (tests): leave them
        for signum in _STOP_SIGNALS:
            signal.signal(signum, on_signal)


def _mark_orphaned_runs(uri: str) -> int:
    """Runs left RUNNING by a cnnpipe process of this host that no longer exists (SIGKILL,
    OOM) are marked KILLED with the reason as a tag. Returns how many."""
    from tasks import mlflow_utils
    from tasks.launch import owner_alive, process_tags

    host = process_tags()["cnnpipe.host"]
    c = mlflow_utils.client(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    if not exps:
        return 0
    runs = c.search_runs(
        exps,
        filter_string=f"attributes.status = 'RUNNING' and tags.`cnnpipe.host` = '{host}'",
        max_results=500,
    )
    marked = 0
    for r in runs:
        if owner_alive(r.data.tags):
            continue
        pid = r.data.tags.get("cnnpipe.pid")
        reason = f"orphaned: cnnpipe process {pid} on {host} ended without closing the run"
        with contextlib.suppress(Exception):
            c.set_tag(r.info.run_id, "failure_reason", reason)
            c.set_terminated(r.info.run_id, "KILLED")
            marked += 1
            print(f"cnnpipe: run {r.info.run_id} marked KILLED ({reason})", file=sys.stderr)
    return marked


def _want_flow(args: argparse.Namespace) -> bool:
    """predict/evaluate run as Prefect flows only when a server is configured or asked for."""
    return bool(getattr(args, "flow", False) or os.environ.get("PREFECT_API_URL"))


def _before_flow() -> Callable[[], None]:
    """Everything between a valid plan and the flow: MLflow reachable and usable (an
    unreachable server fails now, not after training), orphaned runs closed. Returns the wait
    for Prefect's embedded API (started earlier by `_start_prefect`)."""
    from tasks.mlflow_utils import check_reachable, check_tracking, store_exists

    prefect_api.check_configured()
    check_reachable()
    uri = check_tracking(defer_new=True)  # a new local store waits for the run (after prepare)
    if store_exists(uri):
        with contextlib.suppress(Exception):  # housekeeping must never block a run
            _mark_orphaned_runs(uri)
    return prefect_api.wait


def _start_prefect(args: argparse.Namespace, serve: bool = True) -> None:
    """Boot Prefect's embedded API in its own process (`flows.prefect_api`), so that the boot
    overlaps this process's imports: with `serve=False` it only imports (nothing is written),
    and it serves once called again with `serve=True` after the plan has passed, so a bad
    input never reaches a serving server. Only for the console script."""
    if not args.warm:
        return
    if serve:
        prefect_api.start()
    else:
        prefect_api.prepare()


# -------------------------------------------------------------------- commands


def _cmd_models(args: argparse.Namespace) -> int:
    from tasks.plan import format_models_table

    print(format_models_table(args.pattern))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from tasks.plan import check_cache_dir, check_dataset, check_download

    check_dataset(args.dataset, args.data_dir)
    check_cache_dir(args.cache_dir, args.data_dir)
    check_download(args.dataset, args.data_dir, args.cache_dir)
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
            **_prepare_settings(args.overrides),
        )
        if args.json:
            emit(info.to_dict())
        else:
            print(info.summary(), file=sys.stderr)
    return 0


def _prepare_settings(overrides: list[str] | None) -> dict[str, Any]:
    """``--set storage=shards image_cap=320 max_image_pixels=N`` for ``cnnpipe prepare``, checked
    by the same config fields (and messages) as ``cnnpipe train --set``."""
    from cnn.config import PLAIN_KEYS, TrainConfig, parse_overrides

    keys = {"data.storage": "storage", "data.image_cap": "image_cap",
            "source.max_image_pixels": "max_image_pixels"}  # fmt: skip
    values = parse_overrides(overrides or [])
    plain = {dotted: name for name, dotted in PLAIN_KEYS.items()}
    unknown = sorted(plain[k] for k in set(values) - set(keys))
    if unknown:
        raise ValueError(
            f"cnnpipe prepare --set accepts {', '.join(keys.values())}; got {', '.join(unknown)}"
        )
    cfg = TrainConfig().replace(**values)
    cfg.validate()
    flat = {f"{name}.{k}": v for name, section in cfg.to_dict().items() for k, v in section.items()}
    return {plain: flat[dotted] for dotted, plain in keys.items()}


def _cmd_train(args: argparse.Namespace) -> int:
    from tasks.plan import check_output_dir, check_tracking_destination, plan_training
    from tasks.request import TrainRequest

    request = TrainRequest.from_args(args)
    with _stdout_to_stderr(args.json) as emit:
        check_output_dir(request.output_dir)
        check_tracking_destination()
        # Bad input fails here, within seconds, with nothing written anywhere. The flow's own
        # plan of the same request is answered from the plan's memo. Prefect's server process
        # imports during the torch checks and serves once they pass.
        plan_training(request, after_quick_checks=lambda: _start_prefect(args, serve=False))
        _start_prefect(args)
        wait_for_prefect = _before_flow()
        from flows.pipeline import train_pipeline

        _no_traceback_for_bad_input()

        wait_for_prefect()
        result = train_pipeline(request)
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
    split = m["split"]
    lines = [
        f"run {r['run_id']}: {split} accuracy {m['test_accuracy']:.2%}, best val "
        f"{m['val_accuracy']:.2%}, {r['images_per_s']:.0f} images/s"
        + (" (no test split: the val split stands in for it)" if split == "val" else ""),
    ]
    if r.get("model_name"):
        crown = "champion" if r["champion"] else "not champion"
        lines.append(
            f"registered {r['model_name']} v{r['model_version']} ({crown}: {r['champion_reason']})"
        )
        # The URI to paste into `cnnpipe predict/evaluate --model-uri` (README's next step).
        ref = "@champion" if r["champion"] else f"/{r['model_version']}"
        lines.append(f"model URI: models:/{r['model_name']}{ref}")
    lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items()))
    print("\n".join(lines), flush=True)


def _cmd_compare(args: argparse.Namespace) -> int:
    from tasks.plan import check_output_dir, check_tracking_destination, plan_comparison
    from tasks.request import CompareRequest

    request = CompareRequest.from_args(args)
    with _stdout_to_stderr(args.json) as emit:
        check_output_dir(request.output_dir)
        check_tracking_destination()
        plan_comparison(request)  # every name, then every model (the flow's from the memo)
        _start_prefect(args)
        wait_for_prefect = _before_flow()
        from flows.pipeline import _markdown_table, compare_architectures

        _no_traceback_for_bad_input()

        wait_for_prefect()
        result = compare_architectures(request)
        if args.json:
            emit(result)
        else:
            split = result.get("split", "test")
            print(_markdown_table(result["rows"], result["dataset"], split), flush=True)
    return 0


def _run_or_flow(args: argparse.Namespace, name: str, request: Any, model: Any) -> Any:
    """`flows.predict`'s plain `name` with the already loaded model, or its Prefect flow when
    a server is configured or --flow is given."""
    from flows import predict

    if not _want_flow(args):
        return getattr(predict, name)(request, model=model)
    prefect_api.wait()
    _no_traceback_for_bad_input()
    return getattr(predict, predict.FLOWS[name])(request)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.predict import SPLITS, EvaluateRequest, check_model_uri, load_classifier
    from tasks.plan import check_dataset, split_available

    if args.split is not None and args.split not in SPLITS:
        raise ValueError(f"--split {args.split!r} is not valid; choose train, val or test")
    check_model_uri(args.model_uri)
    check_dataset(args.dataset, args.data_dir)
    note = None  # said once the model has loaded: a failing command ends with one line
    if args.split is None:  # the default: test, or val (said so) when there is no test split
        try:
            split_available(args.dataset, args.data_dir, "test")
            args.split = "test"
        except ValueError:
            args.split = "val"
            note = f"note: {args.data_dir} has no test split; evaluating on its val split"
    split_available(args.dataset, args.data_dir, args.split)
    if _want_flow(args):
        prefect_api.check_configured()
        _start_prefect(args)
    with _stdout_to_stderr(args.json) as emit:
        model = load_classifier(args.model_uri)  # a URI that names nothing fails here
        if note:
            print(note, file=sys.stderr, flush=True)
        request = EvaluateRequest(args.model_uri, args.dataset, args.data_dir, args.cache_dir,
                                  args.split)  # fmt: skip
        result = _run_or_flow(args, "evaluate", request, model)
        if args.json:
            emit(result)
        else:
            m = result["metrics"]
            print(f"{args.model_uri} on {args.dataset}/{result['split']}: "
                  f"accuracy {m['accuracy']:.2%}")  # fmt: skip
            for c, a in m["per_class_accuracy"].items():
                print(f"  {c:<20} {'-' if a is None else f'{a:.2%}'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from flows.predict import PredictRequest, check_model_uri, load_classifier, load_images

    if args.topk < 1:
        raise ValueError(f"--topk {args.topk} must be >= 1")
    check_model_uri(args.model_uri, args.pretrained)
    from cnn.export import expand_image_paths

    paths = expand_image_paths(args.images)
    load_images(paths, 3)  # a file that is not an image fails now, before any model loads
    if _want_flow(args):
        prefect_api.check_configured()
        _start_prefect(args)
    with _stdout_to_stderr(args.json) as emit:
        model = load_classifier(args.model_uri, args.pretrained)  # a URI that names nothing
        request = PredictRequest(args.model_uri, [str(p) for p in paths], args.topk,
                                 args.pretrained)  # fmt: skip
        result = _run_or_flow(args, "predict", request, model)
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
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="storage=auto|memory|shards, image_cap=PX (shard store), max_image_pixels=N",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    # `train` and `compare` options are the fields of their flows' request (tasks/request.py).
    p = sub.add_parser("train", help="prepare, train, evaluate and register one model")
    add_options(p, TrainRequest)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="train several architectures and compare them")
    add_options(p, CompareRequest)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("evaluate", help="metrics of a registered model on a dataset split")
    p.add_argument("--model-uri", required=True, help="e.g. models:/lenet5-cifar10@champion")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--split", default=None, help="train, val or test (default: test, or val when the "
        "data has no test split)"
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--flow", action="store_true", help="run as a Prefect flow (default: only "
                   "when PREFECT_API_URL is set)")  # fmt: skip
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="class names and probabilities for images")
    p.add_argument("--model-uri", required=True, help="models:/NAME@champion or torchvision:NAME")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--pretrained", default=None, help="weights file for torchvision:NAME")
    p.add_argument("--json", action="store_true")
    p.add_argument("--flow", action="store_true", help="run as a Prefect flow (default: only "
                   "when PREFECT_API_URL is set)")  # fmt: skip
    p.set_defaults(func=_cmd_predict)

    register_deploy_command(sub)  # `cnnpipe deploy` (flows/deploy.py)
    return parser


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its message's lines joined (the CLI prints no traceback)."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(line.strip() for line in str(msg).splitlines() if line.strip())


_FINAL: list[str] = []  # the one line a failed command ends with (printed last, see main)


def _say(line: str) -> None:
    _FINAL.append(line)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a command answers with one line and exit code 2 (bad input)."""
    from tasks.mlflow_utils import TrackingUnavailableError

    return (ValueError, FileNotFoundError, KeyError, TrackingUnavailableError,
            prefect_api.ApiUnavailableError)  # fmt: skip


class _BadInputWithoutTraceback(logging.Filter):
    """Prefect logs a failed flow's exception with its traceback. For bad input found inside
    the flow (unreadable images met by prepare, ...) the command's last line says everything,
    so the record keeps its one-line message and drops the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # A KeyError inside a flow is more likely a bug than a bad key: it keeps its traceback.
        if isinstance(exc, _bad_input_errors()) and not isinstance(exc, KeyError):
            record.exc_info, record.exc_text = None, None
        return True


def _no_traceback_for_bad_input() -> None:
    """Install `_BadInputWithoutTraceback` on Prefect's flow-run logger (after Prefect has set
    up its logging; once)."""
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, _BadInputWithoutTraceback) for f in logger.filters):
        logger.addFilter(_BadInputWithoutTraceback())


# What a stopped command did (a stop during prepare has no job and no MLflow run yet).
_STOPPED = "training jobs stopped, the MLflow run (if one was started) marked KILLED"


def _run(args: argparse.Namespace) -> int:
    from tasks.launch import JobCancelledError, TrainingJobError

    try:
        return args.func(args)
    except _bad_input_errors() as exc:
        # Bad input: one clear line, non-zero exit, no traceback.
        _say(f"cnnpipe {args.command}: error: {_one_line(exc)}")
        return 2
    except (TrainingJobError, prefect_api.EmbeddedServerError, OSError) as exc:
        # A failed job (its own exception, type and rank) or I/O (a download that cannot
        # start, a full disk): one line, no traceback; the message names the file or URL.
        _say(f"cnnpipe {args.command}: error: {_one_line(exc)}")
        return 1
    except (KeyboardInterrupt, JobCancelledError):
        _say(f"cnnpipe {args.command}: interrupted; {_STOPPED}")
        return 130
    except SystemExit as exc:
        if exc.code in tuple(128 + s for s in _STOP_SIGNALS):
            _say(f"cnnpipe {args.command}: terminated (signal {exc.code - 128}); {_STOPPED}")
            return int(exc.code)
        raise
    except BaseException as exc:
        # Prefect's TerminationSignal (SIGTERM during a flow) and the like.
        if type(exc).__name__ == "TerminationSignal":
            _say(f"cnnpipe {args.command}: terminated; {_STOPPED}")
            return 143
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Called with `argv` (tests, other Python code) it leaves the
    process's signal handlers and exit alone."""
    global _EXITING
    args = build_parser().parse_args(argv)
    console = argv is None
    if args.command in ("train", "compare", "evaluate", "predict", "deploy"):
        _prefect_env()
        if console:
            _install_signal_handlers()
    args.warm = console  # console script: start Prefect's embedded API early
    code = 1
    try:
        code = _run(args)
        return code
    except BaseException:
        if console:  # a bug, not bad input: the traceback helps (os._exit below would lose it)
            import traceback

            traceback.print_exc()
        raise
    finally:
        if console:
            _EXITING = True
            _arm_exit_watchdog(code)
            _shutdown_prefect(timeout=3.0)
        for line in _FINAL:  # after Prefect's last log lines: the error is the final line
            print(line, file=sys.stderr, flush=True)
        _FINAL.clear()
        if console:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            # Skip the interpreter's exit machinery: Prefect's services drain at exit into a
            # server its own atexit hook has already stopped, and wait for it (minutes). Jobs
            # are done, output is flushed, and the Prefect server is stopped above (or by its
            # parent watchdog once this process is gone).
            os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
