"""Scheduled Prefect deployments: nightly training and a weekly architecture comparison.

`cnnpipe deploy` creates (or updates) two deployments on a `process` work pool of a Prefect
server, creating the pool when it is missing:

- `<train flow>/nightly-train`: `train_pipeline` on a cron (default 02:00 every day),
- `<compare flow>/weekly-compare`: `compare_architectures` on a cron (default 04:00 on Sundays).

This module is the one source of truth for their schedules and parameters (there is no
prefect.yaml). The flows are loaded with `Flow.from_source`, so a deployment records where its code
lives: a local directory (the default, this checkout; the worker runs from it) or a git URL. A
worker started with `infra/prefect-worker.sh` (or `prefect worker start --pool POOL`) in the
project environment runs them.

Every argument is checked before anything is created on the server: cron strings, time zone,
model and dataset names, the data directory, and the parameters against the flows' signatures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import zoneinfo
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.flows import Flow

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_WORK_POOL = "cnnpipe-process"
DEFAULT_NIGHTLY_CRON = "0 2 * * *"  # every day at 02:00
DEFAULT_WEEKLY_CRON = "0 4 * * 0"  # Sundays at 04:00, after that night's training
DEFAULT_TIMEZONE = "UTC"

NIGHTLY_NAME = "nightly-train"
WEEKLY_NAME = "weekly-compare"
TRAIN_ENTRYPOINT = "flows/pipeline.py:train_pipeline"
COMPARE_ENTRYPOINT = "flows/pipeline.py:compare_architectures"
TAGS = ("cnnpipe",)


@dataclass(frozen=True)
class DeploymentSpec:
    """What one scheduled deployment runs, when, and with which parameters."""

    name: str
    entrypoint: str  # "path/to/file.py:flow_function", relative to the code source
    cron: str
    timezone: str
    parameters: dict[str, Any]
    description: str
    tags: tuple[str, ...] = TAGS
    # Runs of this deployment at once; a run due while one is still going waits (ENQUEUE).
    concurrency_limit: int | None = 1


@dataclass
class DeployResult:
    """What `create_deployments` did (the `--json` output)."""

    api_url: str
    work_pool: str
    work_pool_created: bool
    source: str
    deployments: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Validation: everything that can be checked without the server, checked first
# --------------------------------------------------------------------------------------------


def check_cron(cron: str, option: str) -> str:
    """Prefect's own cron validation (the public `prefect.schedules.Cron`, the schedule the
    deployment will hold), with an error that names the option and a valid example."""
    from prefect.schedules import Cron

    try:
        Cron(cron.strip())
        return cron.strip()
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{option} {cron!r} is not a valid cron string ({exc}); use five fields "
            f"'minute hour day-of-month month day-of-week', e.g. {DEFAULT_NIGHTLY_CRON!r}"
        ) from None


def check_timezone(tz: str) -> str:
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"--timezone {tz!r} is not an IANA time zone; use e.g. 'UTC' or 'Europe/Berlin'"
        ) from None
    return tz


def plan_deployments(
    *,
    model: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    register_as: str | None = None,
    models: str | list[str] | tuple[str, ...] | None = None,
    nightly_cron: str = DEFAULT_NIGHTLY_CRON,
    weekly_cron: str = DEFAULT_WEEKLY_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    train_timeout: float | None = None,
) -> list[DeploymentSpec]:
    """The two deployment specs, with every value checked. Raises ValueError (or
    FileNotFoundError for a missing image folder) on bad input.

    Each deployment stores its flow's one parameter, the request (`tasks.request`): `model`,
    `dataset` and `models` default to the request's own defaults and are stored explicitly
    (visible in the UI); other fields are stored only when set, so the flow's defaults apply
    at run time (timm style).
    """
    if train_timeout is not None and not train_timeout > 0:
        raise ValueError(
            f"--train-timeout {train_timeout!r} must be a positive number of seconds per "
            "training job, e.g. 21600 for 6 hours"
        )
    nightly_cron = check_cron(nightly_cron, "--nightly-cron")
    weekly_cron = check_cron(weekly_cron, "--weekly-cron")
    timezone = check_timezone(timezone)
    from tasks.plan import plan_comparison, plan_training
    from tasks.request import CompareRequest, TrainRequest

    if data_dir is not None:
        # The worker runs in the code source's directory, not where `deploy` ran: pin the path.
        data_dir = str(Path(data_dir).expanduser().resolve())
    elif (dataset or TrainRequest.dataset) == "imagefolder":
        # The flow would look for ./data in the worker's directory, not where deploy runs.
        raise ValueError("--dataset imagefolder needs --data-dir DIR (train/<class>/<image>)")
    common = _drop_none(
        {"dataset": dataset, "data_dir": data_dir, "epochs": epochs, "batch_size": batch_size,
         "train_timeout_seconds": train_timeout}
    )  # fmt: skip
    train = TrainRequest(**common, **_drop_none({"model": model, "register_as": register_as}))
    compare = CompareRequest(**common, **_drop_none({"models": models}))
    # The flows' own up-front planning: model and dataset names, the image folder, config values.
    plan_training(train)
    plan_comparison(compare)

    nightly = DeploymentSpec(
        name=NIGHTLY_NAME,
        entrypoint=TRAIN_ENTRYPOINT,
        cron=nightly_cron,
        timezone=timezone,
        parameters={"request": train.parameters("model", "dataset")},
        description=(
            f"Nightly training of {train.model} on {train.dataset}; moves `champion` if it "
            "improves."
        ),
        tags=(*TAGS, f"model:{train.model}", f"dataset:{train.dataset}"),
    )
    weekly = DeploymentSpec(
        name=WEEKLY_NAME,
        entrypoint=COMPARE_ENTRYPOINT,
        cron=weekly_cron,
        timezone=timezone,
        parameters={"request": compare.parameters("models", "dataset")},
        description=f"Weekly comparison of {', '.join(compare.models)} on {compare.dataset}.",
        tags=(*TAGS, "compare", f"dataset:{compare.dataset}"),
    )
    return [nightly, weekly]


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def check_parameters(flow: Flow[..., Any], spec: DeploymentSpec) -> None:
    """Validate a spec's parameters against the flow's signature with Prefect's own validator,
    so a bad name or type fails here instead of at 2 a.m. in the worker."""
    from prefect.exceptions import ParameterTypeError

    try:
        flow.validate_parameters(spec.parameters)
    except (ParameterTypeError, TypeError) as exc:
        raise ValueError(
            f"deployment {spec.name!r}: parameters {spec.parameters} do not fit "
            f"{flow.name}(): {exc}"
        ) from None


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


def resolve_api_url(api_url: str | None) -> str:
    """The Prefect server to deploy to: --api-url, else PREFECT_API_URL. Deployments on the
    ephemeral in-process API would be invisible to any worker, so that is an error."""
    if api_url:
        return api_url.rstrip("/")
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ValueError(
            "no Prefect server configured: set PREFECT_API_URL (e.g. "
            "http://127.0.0.1:4200/api) or pass --api-url; start a server with "
            "infra/prefect-server.sh"
        )
    return str(url).rstrip("/")


def check_api_reachable(api_url: str, timeout: float = 5.0) -> None:
    """One fast health request, so a wrong URL fails in seconds instead of after client retries."""
    from tasks.common import health_problem

    problem = health_problem(f"{api_url}/health", timeout)
    if problem is not None:
        raise ValueError(
            f"Prefect server at {api_url!r} is unreachable ({problem}); start it with "
            "infra/prefect-server.sh or fix --api-url / PREFECT_API_URL"
        )


def ensure_work_pool(name: str) -> bool:
    """Create the `process` work pool when it is missing. Returns True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pass
        else:
            if pool.type != ProcessWorker.type:
                raise ValueError(
                    f"work pool {name!r} exists with type {pool.type!r}; these deployments need "
                    f"a 'process' pool: pass --work-pool with another name"
                )
            return False
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        except ObjectAlreadyExists:  # created concurrently by a worker or another deploy
            return False
        return True


def load_flow(source: str, entrypoint: str) -> Flow[..., Any]:
    """Load a flow from its code source (local dir or git URL) the way the worker will."""
    from prefect.flows import Flow

    try:
        return Flow.from_source(source=source, entrypoint=entrypoint)
    except (FileNotFoundError, ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot load flow {entrypoint!r} from source {source!r}: {exc}; --source must be "
            "the project root (a local directory or git URL)"
        ) from None


def create_deployments(
    specs: list[DeploymentSpec],
    *,
    work_pool: str = DEFAULT_WORK_POOL,
    source: str | Path = REPO_ROOT,
    api_url: str | None = None,
    env: dict[str, str] | None = None,
    gpu_limit: int | None = None,
) -> DeployResult:
    """Create or update `specs` on the Prefect server, creating the work pool if missing.

    Nothing is written to the server until every spec has been validated against its flow.
    Re-running updates the deployments in place (the schedules have fixed slugs), so a changed
    cron replaces the old one instead of adding a second schedule.
    """
    from prefect.client.schemas.objects import (
        ConcurrencyLimitConfig,
        ConcurrencyLimitStrategy,
    )
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not work_pool.strip():
        raise ValueError("--work-pool must not be empty")
    source = str(source)
    if "://" not in source and not source.endswith(".git"):
        if not Path(source, "flows").is_dir():
            raise ValueError(
                f"--source {source!r} is not the project root (no flows/ folder in it)"
            )
        source = str(Path(source).resolve())
    url = resolve_api_url(api_url)

    check_api_reachable(url)
    flows = {spec.name: load_flow(source, spec.entrypoint) for spec in specs}
    for spec in specs:
        check_parameters(flows[spec.name], spec)

    job_variables: dict[str, Any] = {"env": dict(env)} if env else {}
    # Prefect prints progress with rich on stdout; keep stdout for the one `--json` object.
    with temporary_settings({PREFECT_API_URL: url}), contextlib.redirect_stdout(sys.stderr):
        created = ensure_work_pool(work_pool)
        if gpu_limit is not None:  # this host's GPU slots, shared by all its flow runs
            from tasks import gpu_limit as host_limit

            host_limit.ensure_limit(gpu_limit, update=True)
        result = DeployResult(
            api_url=url, work_pool=work_pool, work_pool_created=created, source=source
        )
        for spec in specs:
            flow = flows[spec.name]
            deployment = flow.to_deployment(
                name=spec.name,
                schedules=[Cron(spec.cron, timezone=spec.timezone, slug=spec.name)],
                parameters=spec.parameters,
                description=spec.description,
                tags=list(spec.tags),
                job_variables=job_variables,
                concurrency_limit=(
                    None
                    if spec.concurrency_limit is None
                    else ConcurrencyLimitConfig(
                        limit=spec.concurrency_limit,
                        collision_strategy=ConcurrencyLimitStrategy.ENQUEUE,
                    )
                ),
            )
            deployment_id = deployment.apply(work_pool_name=work_pool)
            result.deployments.append(
                {
                    "name": f"{flow.name}/{spec.name}",
                    "id": str(deployment_id),
                    "flow": flow.name,
                    "entrypoint": spec.entrypoint,
                    "cron": spec.cron,
                    "timezone": spec.timezone,
                    "parameters": spec.parameters,
                    "work_pool": work_pool,
                    "concurrency_limit": spec.concurrency_limit,
                    "tags": list(spec.tags),
                }
            )
    return result


# --------------------------------------------------------------------------------------------
# `cnnpipe deploy`
# --------------------------------------------------------------------------------------------


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--env {pair!r} must look like KEY=VALUE")
        env[key.strip()] = value
    return env


def _cmd_deploy(args: argparse.Namespace) -> int:
    env = _parse_env(args.env)
    if args.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    specs = plan_deployments(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        register_as=args.register_as,
        models=args.models,
        nightly_cron=args.nightly_cron,
        weekly_cron=args.weekly_cron,
        timezone=args.timezone,
        train_timeout=args.train_timeout,
    )
    print(f"deploy: loading flows from {args.source}", file=sys.stderr)
    if args.gpu_limit is not None and args.gpu_limit < 1:
        raise ValueError(f"--gpu-limit {args.gpu_limit} must be >= 1 (GPUs of this host)")
    result = create_deployments(
        specs,
        work_pool=args.work_pool,
        source=args.source,
        api_url=args.api_url,
        env=env,
        gpu_limit=args.gpu_limit,
    )
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    pool_state = "created" if result.work_pool_created else "exists"
    print(f"work pool {result.work_pool!r} ({pool_state}) on {result.api_url}", file=sys.stderr)
    for d in result.deployments:
        print(
            f"  {d['name']}: cron {d['cron']!r} ({d['timezone']}), parameters {d['parameters']}",
            file=sys.stderr,
        )
    print(
        f"start a worker: infra/prefect-worker.sh (or prefect worker start --pool "
        f"{result.work_pool!r}); run now: prefect deployment run '{result.deployments[0]['name']}'",
        file=sys.stderr,
    )
    return 0


def register_deploy_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `cnnpipe deploy` to the CLI (flows/cli.py calls this)."""
    p = subparsers.add_parser(
        "deploy",
        help="create the scheduled Prefect deployments (nightly train, weekly compare)",
        description=(
            "Create or update the scheduled Prefect deployments <train flow>/nightly-train "
            "(train_pipeline) and <compare flow>/weekly-compare (compare_architectures) on a "
            "process work pool, creating the pool if missing. Needs a Prefect server "
            "(PREFECT_API_URL or --api-url); see infra/README.md. Every value is checked "
            "before anything is created."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--work-pool", default=DEFAULT_WORK_POOL, help="process work pool, created if missing"
    )
    p.add_argument("--nightly-cron", default=DEFAULT_NIGHTLY_CRON, help="cron of the training run")
    p.add_argument("--weekly-cron", default=DEFAULT_WEEKLY_CRON, help="cron of the comparison run")
    p.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="IANA time zone of both crons")
    p.add_argument(
        "--model", default=None, help="model of the nightly training; None: the flow's default"
    )
    p.add_argument(
        "--dataset", default=None, help="dataset of both deployments; None: the flow's default"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="data folder, stored as an absolute path; None: the flow's default",
    )
    p.add_argument("--epochs", type=int, default=None, help="None: the recipe's")
    p.add_argument(
        "--batch-size", type=int, default=None, help="global batch size; None: the recipe's"
    )
    p.add_argument(
        "--register-as",
        default=None,
        help="registered model name of the nightly run; None: <model>-<dataset>",
    )
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated models of the weekly comparison; None: the flow's default",
    )
    p.add_argument(
        "--source",
        default=str(REPO_ROOT),
        help="where workers get the code: a local project root or a git URL",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLFLOW_TRACKING_URI stored for the runs; None: the worker's environment",
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra run environment"
    )
    p.add_argument(
        "--train-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="timeout of each training job (Prefect task timeout); None: no limit",
    )
    p.add_argument(
        "--gpu-limit",
        type=int,
        default=None,
        help="GPU slots of this host shared by all its flow runs (Prefect global concurrency "
        "limit gpus-<host>); None: created on first use with one slot per visible GPU",
    )
    p.add_argument("--api-url", default=None, help="Prefect API URL; None: PREFECT_API_URL")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_cmd_deploy)
