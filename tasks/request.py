"""One typed request per training flow: what a run needs, from the command line to a deployment.

`TrainRequest` (`train_pipeline`) and `CompareRequest` (`compare_architectures`) are frozen
stdlib dataclasses, each the flow's one parameter. The CLI builds its `train`/`compare` options
from their fields (`add_options`, `from_args`), Prefect renders them as a form in the deployment
UI (pydantic builds the schema; each field's help becomes its description, unknown keys are
refused), `flows/deploy.py` stores them as the deployments' parameters, and `tasks.plan`
validates them once. So adding an option is one field here: its CLI flag, its form entry and
(with `config=`) the TrainConfig key it overrides come with it.

Stdlib only, no pydantic import: `cnnpipe --help` builds its options from these classes and must
stay fast.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, Self


def option(default: Any, doc: str, *flags: str, config: str | None = None, **cli: Any) -> Any:
    """A request field. `doc` is the form's description and the CLI help (`help=` in `cli`
    overrides the latter, for inverted flags such as --no-register); `flags` make it a CLI
    option, with `cli` as argparse keywords; `config` names the TrainConfig key that a value
    other than None overrides (a "shortcut" over `overrides`)."""
    return field(
        default=default, metadata={"doc": doc, "flags": flags, "config": config, "cli": cli}
    )


def _describe(schema: dict[str, Any], cls: type) -> None:
    """pydantic's `json_schema_extra` hook: each field's `doc` as its description in the form."""
    props = schema.get("properties", {})
    for f in fields(cls):
        if f.name in props and f.metadata.get("doc"):
            props[f.name]["description"] = f.metadata["doc"]


def _models_list(models: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """`"a, b"` or `["a", "b"]` as a tuple of stripped, non-empty names."""
    items = models.split(",") if isinstance(models, str) else models
    return tuple(m.strip() for m in items if m and m.strip())


@dataclass(frozen=True)
class RunRequest:
    """What every training run takes: data, config shortcuts, launch, tracking, retries."""

    # Read by pydantic (Prefect's parameter schema and validation); a plain dict keeps
    # pydantic out of this module's imports.
    __pydantic_config__: ClassVar[dict[str, Any]] = {
        "extra": "forbid",
        "json_schema_extra": _describe,
    }

    dataset: str = option("cifar10", "cifar10, mnist, ..., or imagefolder", "--dataset",
                          required=True)  # fmt: skip
    data_dir: str | None = option(None, "default: the config's data_dir (data)", "--data-dir")
    cache_dir: str | None = option(None, "default: <data-dir>/cache", "--cache-dir")
    epochs: int | None = option(None, "training epochs; default: the recipe's", "--epochs",
                                type=int, config="optim.epochs")  # fmt: skip
    batch_size: int | None = option(None, "global batch size", "--batch-size", type=int,
                                    config="optim.batch_size")  # fmt: skip
    lr: float | None = option(None, "peak learning rate", "--lr", type=float, config="optim.lr")
    device: Literal["auto", "cpu", "cuda"] | None = option(
        None, "auto, cpu or cuda; default: the config's (auto)", "--device",
        choices=("auto", "cpu", "cuda"), config="runtime.device",
    )  # fmt: skip
    nproc_per_node: int = option(1, "processes (GPUs) per node", "--nproc-per-node", type=int)
    recipe: str | None = option(None, "a recipe in cnn/recipes/ (or a YAML path)", "--recipe")
    overrides: list[str] | dict[str, Any] | None = option(
        None, "override any TrainConfig key (repeatable), e.g. --set optim.weight_decay=1e-4",
        "--set", action="append", metavar="KEY=VALUE",
    )  # fmt: skip
    experiment: str | None = option(None, "MLflow experiment (default: cnnpipe)", "--experiment")
    train_retries: int = option(1, "Prefect retries of a failed job", "--retries", type=int)
    train_timeout_seconds: float | None = option(
        None, "timeout of each training job in seconds (Prefect task timeout); default: none"
    )
    output_dir: str | None = option(None, "default: runs/<model>-<dataset>-<run>", "--output-dir")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI; default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )

    def config_overrides(self) -> dict[str, Any]:
        """`overrides` with the shortcut fields (epochs, lr, ...) that are set on top: the one
        place the two meet."""
        from cnn.config import parse_overrides

        merged = parse_overrides(self.overrides)
        for f in fields(self):
            key, value = f.metadata.get("config"), getattr(self, f.name)
            if key and value is not None:
                merged[key] = value
        return merged

    def shortcut_flags(self) -> dict[str, str]:
        """{TrainConfig key: "field (--flag)"} for each shortcut this request sets: a bad value
        given that way is fixed there, since it overrides `--set` for the same key."""
        return {
            f.metadata["config"]: f"{f.name} ({f.metadata['flags'][0]})"
            for f in fields(self)
            if f.metadata.get("config") and getattr(self, f.name) is not None
        }

    def check(self) -> None:
        """The request's own values (the config's are `tasks.plan`'s)."""
        if self.train_retries < 0:
            raise ValueError(f"--retries {self.train_retries} must be >= 0 (train_retries)")
        if self.train_timeout_seconds is not None and not self.train_timeout_seconds > 0:
            raise ValueError(
                f"train_timeout_seconds={self.train_timeout_seconds!r} must be a positive "
                "number of seconds per training job"
            )

    def parameters(self, *keep: str) -> dict[str, Any]:
        """The fields that differ from their defaults, plus `keep` (as JSON): what a deployment
        stores, so the rest follows the flow's defaults at run time."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        data = json.loads(json.dumps(asdict(self)))
        return {
            k: v
            for k, v in data.items()
            if k in keep or json.loads(json.dumps(defaults.get(k))) != v
        }

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The request behind parsed `add_options` arguments."""
        return cls(**{f.name: getattr(args, _dest(f)) for f in fields(cls) if _dest(f)})


@dataclass(frozen=True)
class TrainRequest(RunRequest):
    """`train_pipeline`: one model, prepared, trained, evaluated and registered."""

    model: str = option("lenet5", "see `cnnpipe models`", "--model", required=True)
    pretrained: str | None = option(
        None, "start from pretrained weights: a weights name (default DEFAULT) or a local file",
        "--pretrained", nargs="?", const="DEFAULT", config="model.pretrained",
    )  # fmt: skip
    freeze_backbone: bool | None = option(
        None, "train only the new head", "--freeze-backbone", action="store_const", const=True,
        config="model.freeze_backbone",
    )  # fmt: skip
    config_file: str | None = option(
        None, "a TrainConfig YAML file (not with --recipe)", "--config"
    )
    nnodes: int = option(1, "nodes of the torchrun job", "--nnodes", type=int)
    node_rank: int | None = option(None, "this node's rank (multi-node)", "--node-rank", type=int)
    rdzv_endpoint: str | None = option(None, "HOST:PORT of the c10d rendezvous", "--rdzv-endpoint")
    max_restarts: int = option(0, "torchrun --max-restarts", "--max-restarts", type=int)
    register_as: str | None = option(
        None, "registered name (default model-dataset)", "--register-as"
    )
    to_registry: bool = option(
        True, "register the model in MLflow (and maybe move `champion`)", "--no-register",
        action="store_false", dest="to_registry", help="skip MLflow model registration",
    )  # fmt: skip

    def check(self) -> None:
        super().check()
        if self.recipe and self.config_file:
            raise ValueError("give --recipe NAME or --config FILE, not both")


@dataclass(frozen=True)
class CompareRequest(RunRequest):
    """`compare_architectures`: several models on one dataset, one child run each."""

    models: tuple[str, ...] | str = option(
        ("lenet5", "resnet18_cifar", "densenet_cifar"),
        "comma-separated, e.g. lenet5,resnet18_cifar", "--models", required=True,
    )  # fmt: skip
    max_concurrent: int | None = option(
        None, "jobs at once (default: one per GPU, 1 on CPU)", "--max-concurrent", type=int
    )
    to_registry: bool = option(
        False, "also register every model", "--register", action="store_true", dest="to_registry"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", _models_list(self.models))

    def check(self) -> None:
        super().check()
        if not self.models:
            raise ValueError("models is empty; give e.g. lenet5,resnet18_cifar")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models lists a name twice: {list(self.models)}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent {self.max_concurrent} must be >= 1")

    def for_model(self, model: str) -> TrainRequest:
        """One model's training request: the shared fields of this one."""
        shared = {f.name: getattr(self, f.name) for f in fields(RunRequest)}
        return TrainRequest(model=model, **shared)


def _dest(f: Any) -> str:
    """Where argparse puts a field's option: argparse's own name for its flag (--set -> set,
    --retries -> retries), unless the field names one (inverted flags such as --no-register)."""
    flags = f.metadata.get("flags") or ()
    if not flags:
        return ""
    return f.metadata["cli"].get("dest") or flags[-1].lstrip("-").replace("-", "_")


def add_options(parser: argparse.ArgumentParser, cls: type[RunRequest]) -> None:
    """The CLI options of a request class, from its fields (required ones first)."""
    opts = [f for f in fields(cls) if f.metadata.get("flags")]
    for f in sorted(opts, key=lambda f: not f.metadata["cli"].get("required", False)):
        cli = {"help": f.metadata["doc"], **f.metadata["cli"], "dest": _dest(f)}
        if cli.get("action") not in ("store_true", "store_false"):
            cli.setdefault("default", f.default)
        parser.add_argument(*f.metadata["flags"], **cli)
