"""The one training config: a stdlib dataclass, resolved once from recipe + file + overrides.

Why a plain dataclass: the engine must run on a GPU host with only torch/torchvision/numpy/PIL/yaml
(no pydantic), and Prefect accepts dataclasses as flow parameters as they are.

Resolution order (later wins): dataclass defaults < recipe YAML < config file < model/dataset
arguments < `key=value` overrides. The recipe is found in the package's `cnn/recipes/`: by explicit
name, else `<model>-<dataset>`, else the model family's `<family>.yaml`, else `default.yaml`.

The learning-rate schedule is defined in epochs and fractions of the run (never absolute steps), so
`epochs=5` on a 30-epoch recipe still warms up, peaks and anneals properly.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
AUGS = ("auto", "cifar", "flip", "finetune", "none")
LOADER_MODES = ("auto", "memory", "stream")
STORAGES = ("auto", "memory", "shards")
DECODERS = ("pil", "torchvision", "device")

# Fields that do not change the numbers a run produces: excluded from `config_hash`, so a job may
# resume with a different output dir, world size, logging or tracking target.
_HASH_EXCLUDED = frozenset(
    {
        "recipe",
        "data_dir",
        "cache_dir",
        "download",
        "mirror",
        "output_dir",
        "ckpt_interval_steps",
        "max_restarts",
        "device",
        "nproc_per_node",
        "nnodes",
        "rdzv_endpoint",
        "num_threads",
        "loader_mode",
        "num_workers",
        "max_image_pixels",
        "eval_batch_size",
        "mlflow_run_id",
        "mlflow_tracking_uri",
        "log_interval",
        "progress_seconds",
        "target_accuracy",
    }
)


# The config's sections: MLflow params are named `section.key` (the UI groups them), and
# `--set section.key=value` is accepted beside the plain key. Every field is in exactly one
# section (a test checks it).
SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("model", "pretrained", "freeze_backbone", "num_classes"),
    "data": (
        "dataset", "data_dir", "cache_dir", "download", "mirror", "skip_bad_images",
        "val_fraction", "resolution", "input_size", "aug", "loader_mode", "num_workers",
        "storage", "image_cap", "decoder", "max_image_pixels",
    ),
    "optim": (
        "epochs", "batch_size", "eval_batch_size", "lr", "optimizer", "momentum", "nesterov",
        "weight_decay", "label_smoothing", "grad_clip", "grad_accum", "ema", "ema_decay",
        "target_accuracy",
    ),
    "schedule": (
        "schedule", "warmup_epochs", "pct_start", "div_factor", "final_div_factor",
        "min_lr_frac", "step_size", "gamma",
    ),
    "perf": ("precision", "channels_last", "compile", "sync_bn", "num_threads", "device"),
    "repro": ("seed", "deterministic"),
    "run": (
        "recipe", "output_dir", "ckpt_interval_steps", "max_restarts", "nproc_per_node",
        "nnodes", "rdzv_endpoint",
    ),
    "tracking": ("mlflow_run_id", "mlflow_tracking_uri", "log_interval", "progress_seconds"),
}  # fmt: skip
_SECTION_OF = {key: section for section, keys in SECTIONS.items() for key in keys}


@dataclass
class TrainConfig:
    """Everything a training run needs. `batch_size` is GLOBAL (summed over ranks and
    accumulation micro-steps); epochs-based schedule fields adapt to `epochs`."""

    # --- model
    model: str = "lenet5"
    pretrained: str | None = None  # weights name ("DEFAULT", "IMAGENET1K_V1") or a local file
    freeze_backbone: bool = False
    num_classes: int | None = None  # None = from the data
    # --- data
    dataset: str = "cifar10"
    data_dir: str = "data"
    cache_dir: str | None = None  # None = <data_dir>/cache
    download: bool = True
    mirror: str | None = None
    skip_bad_images: bool = False
    val_fraction: float = 0.1
    resolution: int | None = None  # stored cache resolution; None = the dataset's native size
    input_size: int | None = None  # None = the model's default input size
    aug: str = "auto"  # cifar | finetune | none (no train augmentation) | auto (by model source)
    loader_mode: str = "auto"  # memory | stream | auto
    num_workers: int = 2
    # Image folders: "memory" (uint8 tensors), "shards" (the streaming JPEG store, for folders
    # that outgrow memory), "auto" (shards when the decoded images exceed the memory budget).
    storage: str = "auto"
    image_cap: int | None = None  # shards: shorter-side cap of stored JPEGs; None = 288
    decoder: str = "torchvision"  # shards: torchvision (decode_jpeg) | pil | device (nvJPEG)
    max_image_pixels: int = 89_478_485  # refuse larger images (from the header); Pillow's limit
    # --- optimisation
    epochs: int = 10
    batch_size: int = 128  # global batch per optimizer step
    eval_batch_size: int | None = None  # global; None = 2 * batch_size
    lr: float = 0.05  # peak learning rate
    optimizer: str = "sgd"
    momentum: float = 0.9  # SGD momentum, or beta1 for Adam/AdamW
    nesterov: bool = False
    weight_decay: float = 5e-4  # never applied to norm and bias parameters
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0  # linear warmup for cosine/step/constant
    pct_start: float = 0.25  # onecycle: fraction of the run spent rising to `lr`
    div_factor: float = 25.0  # onecycle: start lr = lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final lr = start lr / final_div_factor
    min_lr_frac: float = 0.0  # cosine: final lr = lr * min_lr_frac
    step_size: float = 30.0  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max grad norm; 0 = off
    grad_accum: int = 1
    ema: bool = False  # evaluate/keep an exponential moving average of the weights
    ema_decay: float = 0.999
    target_accuracy: float | None = None  # stop early once val accuracy reaches it (benchmarks)
    # --- performance
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    num_threads: int | None = None  # torch threads per rank; None = cores // local ranks
    # --- reproducibility
    seed: int = 0
    deterministic: bool = False
    # --- run / checkpoints / launch
    recipe: str | None = None  # name of the recipe that was applied (informational)
    output_dir: str = "runs/run"
    ckpt_interval_steps: int = 0  # also checkpoint every N optimizer steps; 0 = epoch ends only
    max_restarts: int = 0  # torchrun --max-restarts
    device: str = "auto"
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # HOST:PORT for multi-node c10d rendezvous
    # --- tracking
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    log_interval: int = 0  # print a line every N steps; 0 = per-epoch lines only
    progress_seconds: float = 30.0  # also a progress line (images, img/s, ETA) every N s; 0 = off

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping, coercing values by field type; unknown keys raise."""
        return cls(**coerce_values(data, source=source))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Load a config file written by `to_yaml` (or by hand); unknown keys raise."""
        return cls.from_dict(_read_yaml(Path(path)), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of primitives (safe for YAML, JSON, MLflow params and weights_only)."""
        return dataclasses.asdict(self)

    def sectioned(self) -> dict[str, dict[str, Any]]:
        """`{section: {key: value}}` without unset (None) values: the MLflow params."""
        flat = self.to_dict()
        return {
            section: {k: flat[k] for k in keys if flat[k] is not None}
            for section, keys in SECTIONS.items()
        }

    def to_yaml(self, path: str | Path) -> Path:
        """Write the full resolved config (every field), so a run is reproducible from it."""
        text = "# Resolved TrainConfig (cnn/config.py); config_hash=" + self.config_hash() + "\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        return atomic_write(path, text)

    def data_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `cnn.data.prepare_dataset` for this run. The Prefect prepare
        task and the training job both use them, so the job always gets a cache hit."""
        return {
            "data_dir": self.data_dir,
            "cache_dir": self.cache_dir,
            "resolution": self.resolution,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "skip_bad_images": self.skip_bad_images,
            "download": self.download,
            "mirror": self.mirror,
            "storage": self.storage,
            "image_cap": self.image_cap,
            "max_image_pixels": self.max_image_pixels,
        }

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (values coerced like overrides)."""
        return dataclasses.replace(self, **coerce_values(changes, source="replace"))

    def config_hash(self) -> str:
        """Hash of the fields that change the result; a checkpoint only resumes a run with the
        same hash. Excludes paths, world size, logging and tracking fields."""
        data = {k: v for k, v in self.to_dict().items() if k not in _HASH_EXCLUDED}
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---------------------------------------------------------------- derived values

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def resolved_device(self) -> str:
        """'cuda' or 'cpu' for `device='auto'` on this host."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self, device_type: str) -> str:
        """auto = bf16 autocast on CUDA (no loss scaling needed), fp32 on CPU."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" else "fp32"

    # ---------------------------------------------------------------- validation

    def validate(self, nproc_per_node: int | None = None, nnodes: int | None = None) -> None:
        """Raise ValueError naming the bad value and its fix. Called by the launcher before
        torchrun starts (with the planned world size) and again inside every worker."""
        nproc = self.nproc_per_node if nproc_per_node is None else nproc_per_node
        nodes = self.nnodes if nnodes is None else nnodes
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("device", DEVICES),
            ("aug", AUGS),
            ("loader_mode", LOADER_MODES),
            ("storage", STORAGES),
            ("decoder", DECODERS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"{name}={value!r} is not valid; choose one of {', '.join(allowed)}"
                    + _suggest(str(value), allowed)
                )
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "grad_accum": self.grad_accum,
            "nproc_per_node": nproc,
            "nnodes": nodes,
            "step_size": self.step_size,
            "gamma": self.gamma,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name}={value} must be > 0")
        non_negative = {
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "warmup_epochs": self.warmup_epochs,
            "ckpt_interval_steps": self.ckpt_interval_steps,
            "max_restarts": self.max_restarts,
            "num_workers": self.num_workers,
            "log_interval": self.log_interval,
            "min_lr_frac": self.min_lr_frac,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        for name, value in (
            ("num_classes", self.num_classes),
            ("eval_batch_size", self.eval_batch_size),
            ("input_size", self.input_size),
            ("resolution", self.resolution),
            ("max_image_pixels", self.max_image_pixels),
            ("num_threads", self.num_threads),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 (or null for the default)")
        if self.image_cap is not None and self.image_cap < 8:
            raise ValueError(
                f"image_cap must be an integer >= 8 (pixels), got {self.image_cap}; it caps the "
                "shorter side of images in the shard store (default 288)"
            )
        for name, value, lo, hi in (
            ("val_fraction", self.val_fraction, 0.0, 1.0),
            ("label_smoothing", self.label_smoothing, 0.0, 1.0),
            ("momentum", self.momentum, 0.0, 1.0),
            ("ema_decay", self.ema_decay, 0.0, 1.0),
            ("pct_start", self.pct_start, 0.0, 1.0),
        ):
            if not lo <= value < hi:
                raise ValueError(f"{name}={value} must be in [{lo}, {hi})")
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(
                f"target_accuracy={self.target_accuracy} must be in (0, 1] (a fraction, "
                "e.g. 0.67), or null"
            )
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}; "
                f"lower warmup_epochs or raise epochs"
            )
        world = nproc * nodes
        per_step = world * self.grad_accum
        if self.batch_size % per_step:
            lower = (self.batch_size // per_step) * per_step
            upper = lower + per_step
            near = " or ".join(str(b) for b in (lower, upper) if b > 0)
            raise ValueError(
                f"global batch_size={self.batch_size} is not divisible by world size {world} "
                f"(nproc_per_node={nproc} x nnodes={nodes}) x grad_accum={self.grad_accum} "
                f"= {per_step}; use batch_size={near}, or change the number of processes"
            )
        self._validate_device(nproc)
        self._validate_model()

    def _validate_device(self, nproc: int) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device='cuda' was requested but no CUDA GPU is available on this host; "
                "use device=cpu (or auto), or run on a GPU machine"
            )
        device = self.resolved_device()
        if device == "cuda":
            gpus = torch.cuda.device_count()
            if nproc > gpus:
                raise ValueError(
                    f"nproc_per_node={nproc} exceeds the {gpus} GPU(s) on this host; "
                    f"use nproc_per_node<={gpus} (one process per GPU) or device=cpu"
                )
        precision = self.resolved_precision(device)
        if precision == "fp16" and device != "cuda":
            raise ValueError(
                "precision='fp16' needs CUDA (loss-scaled half precision); use precision=fp32 "
                "or bf16 on CPU"
            )
        if self.sync_bn and device != "cuda" and nproc * self.nnodes > 1:
            raise ValueError(
                "sync_bn=true needs CUDA (torch SyncBatchNorm has no CPU kernel); set "
                "sync_bn=false for CPU runs"
            )

    def _validate_model(self) -> None:
        try:
            from cnn.models import check_input_size, model_info
        except ImportError:  # models package not installed in this checkout: skip the check
            return
        info = model_info(self.model)  # raises ValueError naming close model names
        if self.input_size is not None:
            check_input_size(self.model, self.input_size)
        if self.freeze_backbone and not self.pretrained:
            raise ValueError(
                "freeze_backbone=true without pretrained weights trains only a random head; "
                f"set pretrained (e.g. DEFAULT or a weights file) for {info.name}, or "
                "freeze_backbone=false"
            )


# -------------------------------------------------------------------- coercion


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML/CLI value to the field's declared type; raise naming the field."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~", ""):
        if optional:
            return None
        if tp is str:  # e.g. aug=none is a value, not a missing one
            return value
        raise ValueError(f"{name} cannot be null; give a {tp.__name__} value")
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null; give a {tp.__name__} value")
    if name == "pretrained" and isinstance(value, bool):
        return "DEFAULT" if value else None  # `pretrained: true` = the default weights
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on", "y"):
                return True
            if text in ("0", "false", "no", "off", "n"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            text = str(value).strip()
            return int(float(text)) if "e" in text.lower() else int(text)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}={value!r} is not a valid {tp.__name__}; give e.g. {name}="
            + {"bool": "true", "int": "8", "float": "0.1"}.get(tp.__name__, "text")
        ) from None
    return value


def coerce_values(data: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Check keys against TrainConfig and coerce values; unknown keys raise with a suggestion."""
    types_ = _field_types()
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        section, dot, rest = norm.partition(".")
        if dot and section in SECTIONS:  # `optim.lr` = `lr`, checked against its section
            if rest not in SECTIONS[section]:
                where = f"; {rest!r} is in section {_SECTION_OF[rest]!r}" if rest in types_ else ""
                raise ValueError(
                    f"unknown config key {key!r} in {source}: section {section!r} has no "
                    f"{rest!r}{where}" + ("" if where else _suggest(rest, SECTIONS[section]))
                )
            norm = rest
        if norm not in types_:
            raise ValueError(
                f"unknown config key {key!r} in {source}"
                + _suggest(norm, types_)
                + "; see TrainConfig in cnn/config.py for the valid keys"
            )
        out[norm] = _coerce(norm, value, types_[norm])
    return out


def parse_overrides(overrides: typing.Iterable[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["epochs=5", "lr=0.1"]` (or a dict) -> coerced dict. Values are parsed as YAML scalars
    and then coerced to the field type, so `pretrained=null` and `lr=1e-3` work."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return coerce_values(overrides, source="overrides")
    raw: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value; write e.g. epochs=5")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        raw[key.strip()] = value if isinstance(parsed, (dict, list)) else parsed
    return coerce_values(raw, source="overrides")


# -------------------------------------------------------------------- recipes


def list_recipes() -> list[str]:
    """Names of the recipes shipped in cnn/recipes/."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # one line with file:line:column, not a parser traceback
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: invalid YAML ({problem}); fix the file there") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _recipe_candidates(model: str, dataset: str) -> list[str]:
    """Recipe names to try, most specific first.

    A family recipe (resnet.yaml, vgg.yaml, ...) is written for that family's from-scratch
    32x32 models; torchvision's ImageNet architectures of the same family would be wrecked by
    its learning rate, so they get `<family>-finetune` or the generic `finetune` recipe."""
    candidates = [f"{model}-{dataset}"]
    try:
        from cnn.models import list_models, model_info

        info = model_info(model)
    except (ImportError, ValueError, KeyError):
        return [*candidates, "default"]
    if info.source == "torchvision":
        mixed = any(
            model_info(m).family == info.family and model_info(m).source != "torchvision"
            for m in list_models()
        )
        candidates.append(f"{info.family}-finetune")
        if not mixed:
            candidates.append(info.family)
        candidates.append("finetune")
    else:
        candidates.append(info.family)
    return [*candidates, "default"]


def find_recipe(model: str, dataset: str, recipe: str | None = None) -> Path:
    """The recipe file for a run: explicit `recipe` (a name in cnn/recipes/ or a path), else
    `<model>-<dataset>`, else the model family's default (the fine-tuning default for
    torchvision's ImageNet models), else `default.yaml`."""
    if recipe:
        path = Path(recipe)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return path
        path = RECIPES_DIR / f"{recipe}.yaml"
        if path.is_file():
            return path
        raise ValueError(
            f"unknown recipe {recipe!r}"
            + _suggest(recipe, list_recipes())
            + f"; available: {', '.join(list_recipes()) or '(none)'}"
        )
    candidates = _recipe_candidates(model, dataset)
    for name in candidates:
        path = RECIPES_DIR / f"{name}.yaml"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no recipe found for model={model!r} dataset={dataset!r} in {RECIPES_DIR} "
        f"(tried {', '.join(candidates)}); pass config_file or overrides"
    )


def resolve_config(
    *,
    model: str | None = None,
    dataset: str | None = None,
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: typing.Iterable[str] | dict[str, Any] | None = None,
    validate: bool = True,
) -> TrainConfig:
    """Resolve the one config: defaults < recipe < config file < model/dataset < overrides.

    `model`/`dataset` may be omitted when the config file or the overrides name them."""
    file_data = (
        coerce_values(_read_yaml(Path(config_file)), source=str(config_file))
        if (config_file)
        else {}
    )
    over = parse_overrides(overrides)
    model = over.get("model") or model or file_data.get("model") or TrainConfig.model
    dataset = over.get("dataset") or dataset or file_data.get("dataset") or TrainConfig.dataset
    recipe_name = recipe or over.get("recipe") or file_data.get("recipe")
    merged: dict[str, Any] = {}
    try:
        recipe_path: Path | None = find_recipe(model, dataset, recipe_name)
    except FileNotFoundError:
        if recipe_name:
            raise
        recipe_path = None  # no recipes shipped at all: dataclass defaults
    if recipe_path is not None:
        merged.update(coerce_values(_read_yaml(recipe_path), source=str(recipe_path)))
    merged.update(file_data)
    merged.update(over)
    merged["model"], merged["dataset"] = model, dataset
    merged["recipe"] = recipe_path.stem if recipe_path is not None else None
    if "output_dir" not in merged:
        merged["output_dir"] = str(Path("runs") / f"{model}-{dataset}")
    cfg = TrainConfig(**merged)
    if validate:
        cfg.validate()
    return cfg
