"""The one training config: sections of stdlib dataclasses, resolved once from recipe + file +
overrides.

Why plain dataclasses (and a small coercion of our own, not pydantic/cattrs/dacite): the engine
must run on a GPU host with only torch/torchvision/numpy/PIL/yaml installed, and `cnnpipe
--help` and the plan step's errors must not pay for a heavy import. Prefect accepts dataclasses
as flow parameters as they are.

`TrainConfig` is a set of sections (`model`, `data`, `source`, `optim`, `schedule`, `perf`,
`repro`, `runtime`, `run`, `tracking`); a value is `cfg.optim.lr`, a key is `optim.lr` (in YAML,
`lr` under `optim:`). A section whose class says `HASHED = True` changes the numbers a run
produces, so `config_hash` is the hash of exactly those sections: a job may resume with another
data folder, device, world size, logging or tracking target, never with another learning rate.
Launch settings (processes per node, nodes, rendezvous, restarts) are not config: they live in
`tasks.launch.LaunchSpec`, and the engine reads the world it runs in from torchrun's environment.

Resolution order (later wins): dataclass defaults < recipe YAML < config file < model/dataset
arguments < `key=value` overrides. The recipe is found in the package's `cnn/recipes/`: by explicit
name, else `<model>-<dataset>`, else the model family's `<family>.yaml`, else `default.yaml`.
Overrides (`--set`) take `section.key=value`, or the plain key, which is unique across sections
(`lr=0.1` = `optim.lr=0.1`); YAML files are written in sections, and a flat key from before the
sections gets an error that names its new place.

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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .atomic import atomic_write

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["onecycle", "cosine", "step", "constant"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]
Aug = Literal["auto", "cifar", "flip", "finetune", "none"]
LoaderMode = Literal["auto", "memory", "stream"]
Storage = Literal["auto", "memory", "shards"]
Decoder = Literal["pil", "torchvision", "device"]
Tta = Literal["none", "flip"]


def how_to_set(name: str) -> str:
    """The fix half of a bad-value error: where the value goes (a launch setting is a flag)."""
    if name in ("nproc_per_node", "nnodes"):
        return f"pass --{name.replace('_', '-')} N (a positive integer)"
    return f"set {name} in the config file or with --set {name}=VALUE"


# -------------------------------------------------------------------- sections


@dataclass
class ModelSection:
    """Which network, from which weights."""

    HASHED: ClassVar[bool] = True
    name: str = "lenet5"
    pretrained: str | None = None  # weights name ("DEFAULT", "IMAGENET1K_V1") or a local file
    freeze_backbone: bool = False
    num_classes: int | None = None  # None = from the data


@dataclass
class DataSection:
    """What the model sees: the dataset, its split, size, augmentation and stored form."""

    HASHED: ClassVar[bool] = True
    dataset: str = "cifar10"
    val_fraction: float = 0.1
    skip_bad_images: bool = False
    resolution: int | None = None  # stored cache resolution; None = the dataset's native size
    input_size: int | None = None  # None = the model's default input size
    aug: Aug = "auto"  # cifar | flip | finetune | none | auto (by model source)
    # Test-time augmentation: "flip" scores each image as the mean of its logits and its
    # mirror's, in validation, test, export and serving alike (cnn.models.FlipAverage).
    tta: Tta = "none"
    # Image folders: "memory" (uint8 tensors), "shards" (the streaming JPEG store, for folders
    # that outgrow memory), "auto" (shards when the decoded images exceed the memory budget).
    storage: Storage = "auto"
    image_cap: int | None = None  # shards: shorter-side cap of stored JPEGs; None = 288
    decoder: Decoder = "torchvision"  # shards: torchvision (decode_jpeg) | pil | device (nvJPEG)


@dataclass
class SourceSection:
    """Where the data lives and how it is fetched: moving it does not change the numbers."""

    HASHED: ClassVar[bool] = False
    data_dir: str = "data"
    cache_dir: str | None = None  # None = <data_dir>/cache
    download: bool = True
    mirror: str | None = None
    max_image_pixels: int = 89_478_485  # refuse larger images (from the header); Pillow's limit


@dataclass
class OptimSection:
    """The optimiser and what it sees per step. `batch_size` is GLOBAL (summed over ranks and
    accumulation micro-steps)."""

    HASHED: ClassVar[bool] = True
    epochs: int = 10
    batch_size: int = 128  # global batch per optimizer step
    optimizer: Optimizer = "sgd"
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum, or beta1 for Adam/AdamW
    nesterov: bool = False
    weight_decay: float = 5e-4  # never applied to norm and bias parameters
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max grad norm; 0 = off
    grad_accum: int = 1
    ema: bool = False  # evaluate/keep an exponential moving average of the weights
    ema_decay: float = 0.999


@dataclass
class ScheduleSection:
    """The learning-rate schedule, in epochs and fractions of the run (adapts to `epochs`)."""

    HASHED: ClassVar[bool] = True
    name: Schedule = "onecycle"
    warmup_epochs: float = 0.0  # linear warmup for cosine/step/constant
    pct_start: float = 0.25  # onecycle: fraction of the run spent rising to `lr`
    div_factor: float = 25.0  # onecycle: start lr = lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final lr = start lr / final_div_factor
    min_lr_frac: float = 0.0  # cosine: final lr = lr * min_lr_frac
    step_size: float = 30.0  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor


@dataclass
class PerfSection:
    """Precision and kernels: faster, and they change the floating-point result."""

    HASHED: ClassVar[bool] = True
    precision: Precision = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False


@dataclass
class ReproSection:
    """Seeds and determinism."""

    HASHED: ClassVar[bool] = True
    seed: int = 0
    deterministic: bool = False


@dataclass
class RuntimeSection:
    """How this host executes the run: device, threads, loader. Never changes the numbers."""

    HASHED: ClassVar[bool] = False
    device: Device = "auto"
    num_threads: int | None = None  # torch threads per rank; None = cores // local ranks
    loader_mode: LoaderMode = "auto"  # memory | stream | auto
    num_workers: int = 2
    eval_batch_size: int | None = None  # global; None = 2 * batch_size
    # CPU DDP with every rank on this host: average gradients through shared memory instead of
    # gloo (cnn.dist.SharedMemoryAllReduce; much lower latency for small models). Off = gloo.
    # The same bits as gloo for 2 ranks; from 3 ranks on, the summation order (so the last bits
    # of the rounding) differs from gloo's ring.
    shm_allreduce: bool = True


@dataclass
class RunSection:
    """Checkpoints and stopping: where the run writes and when it may stop early."""

    HASHED: ClassVar[bool] = False
    recipe: str | None = None  # name of the recipe that was applied (informational)
    output_dir: str = "runs/run"
    ckpt_interval_steps: int = 0  # also checkpoint every N optimizer steps; 0 = epoch ends only
    target_accuracy: float | None = None  # stop early once val accuracy reaches it (benchmarks)


@dataclass
class TrackingSection:
    """MLflow and progress lines."""

    HASHED: ClassVar[bool] = False
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    log_interval: int = 0  # print a line every N steps; 0 = per-epoch lines only
    progress_seconds: float = 30.0  # also a progress line (images, img/s, ETA) every N s; 0 = off


Section = (
    ModelSection | DataSection | SourceSection | OptimSection | ScheduleSection | PerfSection
    | ReproSection | RuntimeSection | RunSection | TrackingSection
)  # fmt: skip

# Settings of the launch (tasks.launch.LaunchSpec), not of the config: named when a file or an
# override still carries them.
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "max_restarts")


@dataclass
class TrainConfig:
    """Everything a training run needs, one section per concern (see the module docstring).
    Build it with `resolve_config`, `from_yaml`/`from_dict`, or `TrainConfig().replace(lr=0.1)`."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    source: SourceSection = field(default_factory=SourceSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    perf: PerfSection = field(default_factory=PerfSection)
    repro: ReproSection = field(default_factory=ReproSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def __post_init__(self) -> None:
        # A section given as a mapping (e.g. a deserialised parameter) becomes its dataclass.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                setattr(self, f.name, SECTIONS[f.name](**value))

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> TrainConfig:
        """From already coerced `{"section.key": value}` (the output of `coerce_values`)."""
        grouped = _group(values)
        return cls(**{name: SECTIONS[name](**grouped.get(name, {})) for name in SECTIONS})

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping of sections (`to_dict`'s shape), coercing values by field type;
        unknown keys and flat keys from before the sections raise, naming the right key."""
        return cls.from_values(coerce_values(_section_items(data, source), source=source))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Load a config file written by `to_yaml` (or by hand)."""
        return cls.from_dict(_read_yaml(Path(path)), source=str(path))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """`{section: {key: value}}` of primitives (safe for YAML, JSON and weights_only)."""
        return dataclasses.asdict(self)

    def sectioned(self) -> dict[str, dict[str, Any]]:
        """`to_dict` without unset (None) values: the MLflow params (`section.key`)."""
        return {
            name: {k: v for k, v in values.items() if v is not None}
            for name, values in self.to_dict().items()
        }

    def to_yaml(self, path: str | Path) -> Path:
        """Write the full resolved config (every key), so a run is reproducible from it."""
        text = "# Resolved TrainConfig (cnn/config.py); config_hash=" + self.config_hash() + "\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        return atomic_write(path, text)

    def data_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `cnn.data.prepare_dataset` for this run. The Prefect prepare
        task and the training job both use them, so the job always gets a cache hit."""
        src, data = self.source, self.data
        return {
            "data_dir": src.data_dir,
            "cache_dir": src.cache_dir,
            "resolution": data.resolution,
            "val_fraction": data.val_fraction,
            "seed": self.repro.seed,
            "skip_bad_images": data.skip_bad_images,
            "download": src.download,
            "mirror": src.mirror,
            "storage": data.storage,
            "image_cap": data.image_cap,
            "max_image_pixels": src.max_image_pixels,
        }

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some keys changed: `replace(lr=0.1)` or `replace(**{"optim.lr": 0.1})`
        (values coerced like overrides)."""
        grouped = _group(coerce_values(changes, source="replace"))
        return dataclasses.replace(
            self,
            **{
                name: dataclasses.replace(getattr(self, name), **kv) for name, kv in grouped.items()
            },
        )

    def config_hash(self) -> str:
        """Hash of the sections that change the result (their class says `HASHED`); a
        checkpoint only resumes a run with the same hash."""
        data = {
            name: dataclasses.asdict(getattr(self, name))
            for name, cls in SECTIONS.items()
            if cls.HASHED
        }
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---------------------------------------------------------------- derived values

    def resolved_device(self) -> str:
        """'cuda' or 'cpu' for `device='auto'` on this host."""
        if self.runtime.device != "auto":
            return self.runtime.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self, device_type: str) -> str:
        """auto = bf16 autocast on CUDA (no loss scaling needed), fp32 on CPU."""
        if self.perf.precision != "auto":
            return self.perf.precision
        return "bf16" if device_type == "cuda" else "fp32"

    # ---------------------------------------------------------------- validation

    def validate(self, nproc_per_node: int = 1, nnodes: int = 1) -> None:
        """Raise ValueError naming the bad value and its fix. Called by the launcher before
        torchrun starts (with the planned world size) and again inside every worker."""
        for name, key_types in _KEY_TYPES.items():
            section = getattr(self, name)
            for key, tp in key_types.items():
                choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
                value = getattr(section, key)
                if choices and value not in choices:
                    raise ValueError(_not_a_choice(f"{name}.{key}", value, choices))
        o, s, d, rt = self.optim, self.schedule, self.data, self.runtime
        positive = {
            "optim.epochs": o.epochs,
            "optim.batch_size": o.batch_size,
            "optim.lr": o.lr,
            "optim.grad_accum": o.grad_accum,
            "nproc_per_node": nproc_per_node,
            "nnodes": nnodes,
            "schedule.step_size": s.step_size,
            "schedule.gamma": s.gamma,
            "schedule.div_factor": s.div_factor,
            "schedule.final_div_factor": s.final_div_factor,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name}={value} must be > 0; {how_to_set(name)}")
        non_negative = {
            "optim.weight_decay": o.weight_decay,
            "optim.grad_clip": o.grad_clip,
            "schedule.warmup_epochs": s.warmup_epochs,
            "schedule.min_lr_frac": s.min_lr_frac,
            "run.ckpt_interval_steps": self.run.ckpt_interval_steps,
            "runtime.num_workers": rt.num_workers,
            "tracking.log_interval": self.tracking.log_interval,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0; {how_to_set(name)}")
        for name, value in (
            ("model.num_classes", self.model.num_classes),
            ("runtime.eval_batch_size", rt.eval_batch_size),
            ("data.input_size", d.input_size),
            ("data.resolution", d.resolution),
            ("source.max_image_pixels", self.source.max_image_pixels),
            ("runtime.num_threads", rt.num_threads),
        ):
            if value is not None and value < 1:
                raise ValueError(
                    f"{name}={value} must be >= 1 (or null for the default); {how_to_set(name)}"
                )
        if d.image_cap is not None and d.image_cap < 8:
            raise ValueError(
                f"image_cap must be an integer >= 8 (pixels), got {d.image_cap}; it caps the "
                "shorter side of images in the shard store (data.image_cap, default 288)"
            )
        if not 0.0 < d.val_fraction < 1.0:  # as cnn.data.prepare_dataset requires
            raise ValueError(
                f"data.val_fraction={d.val_fraction} must be in (0, 1): the fraction of train/ "
                f"held out for validation when there is no val/ folder, e.g. 0.1; "
                f"{how_to_set('data.val_fraction')}"
            )
        for name, value, lo, hi in (
            ("optim.label_smoothing", o.label_smoothing, 0.0, 1.0),
            ("optim.momentum", o.momentum, 0.0, 1.0),
            ("optim.ema_decay", o.ema_decay, 0.0, 1.0),
            ("schedule.pct_start", s.pct_start, 0.0, 1.0),
        ):
            if not lo <= value < hi:
                raise ValueError(f"{name}={value} must be in [{lo}, {hi}); {how_to_set(name)}")
        target = self.run.target_accuracy
        if target is not None and not 0.0 < target <= 1.0:
            raise ValueError(
                f"run.target_accuracy={target} must be in (0, 1] (a fraction, e.g. 0.67), or null"
            )
        if s.warmup_epochs > o.epochs:
            raise ValueError(
                f"schedule.warmup_epochs={s.warmup_epochs} exceeds epochs={o.epochs}; "
                f"lower schedule.warmup_epochs or raise optim.epochs"
            )
        world = nproc_per_node * nnodes
        per_step = world * o.grad_accum
        if o.batch_size % per_step:
            lower = (o.batch_size // per_step) * per_step
            upper = lower + per_step
            near = " or ".join(str(b) for b in (lower, upper) if b > 0)
            raise ValueError(
                f"global batch_size={o.batch_size} is not divisible by world size {world} "
                f"(nproc_per_node={nproc_per_node} x nnodes={nnodes}) x grad_accum={o.grad_accum}"
                f" = {per_step}; use batch_size={near}, or change the number of processes"
            )
        self._validate_device(nproc_per_node, world)
        self._validate_model()

    def _validate_device(self, nproc: int, world: int) -> None:
        import torch

        if self.runtime.device == "cuda" and not torch.cuda.is_available():
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
        if self.perf.sync_bn and device != "cuda" and world > 1:
            raise ValueError(
                "sync_bn=true needs CUDA (torch SyncBatchNorm has no CPU kernel); set "
                "sync_bn=false for CPU runs"
            )

    def _validate_model(self) -> None:
        try:
            from cnn.models import check_input_size, model_info
        except ImportError:  # models package not installed in this checkout: skip the check
            return
        info = model_info(self.model.name)  # raises ValueError naming close model names
        if self.data.input_size is not None:
            check_input_size(self.model.name, self.data.input_size)
        if self.model.freeze_backbone and not self.model.pretrained:
            raise ValueError(
                "freeze_backbone=true without pretrained weights trains only a random head; "
                f"set pretrained (e.g. DEFAULT or a weights file) for {info.name}, or "
                "freeze_backbone=false"
            )


# -------------------------------------------------------------------- keys and coercion

SECTIONS: dict[str, Any] = {
    f.name: typing.get_type_hints(TrainConfig)[f.name] for f in fields(TrainConfig)
}
_KEY_TYPES: dict[str, dict[str, Any]] = {
    name: {f.name: typing.get_type_hints(cls)[f.name] for f in fields(cls)}
    for name, cls in SECTIONS.items()
}
# The plain name of each key (`lr` for `optim.lr`): unique across sections (a test checks it),
# so `--set lr=0.1` is unambiguous. A section's `name` key is called after its section
# (`model=resnet18` is `model.name`, `schedule=cosine` is `schedule.name`).
PLAIN_KEYS: dict[str, str] = {
    (name if key == "name" else key): f"{name}.{key}"
    for name, keys in _KEY_TYPES.items()
    for key in keys
}
_SECTION_OF = {key: name for name, keys in _KEY_TYPES.items() for key in keys if key != "name"}


def _group(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"optim.lr": 0.1}` -> `{"optim": {"lr": 0.1}}`."""
    grouped: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        name, _, key = dotted.partition(".")
        grouped.setdefault(name, {})[key] = value
    return grouped


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _not_a_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    return f"{name}={value!r} is not valid; choose one of {', '.join(choices)}" + _suggest(
        str(value), choices
    )


def locate_key(key: str, source: str = "config", *, plain_ok: bool = True) -> str:
    """The `section.key` a key names. `plain_ok` accepts the plain name (`lr`), as overrides
    do; YAML files are written in sections, so there a plain name is an old flat key."""
    norm = str(key).strip().replace("-", "_")
    name, dot, rest = norm.partition(".")
    if dot:
        if name not in SECTIONS:
            raise ValueError(
                f"unknown config key {key!r} in {source}: no section {name!r}"
                + _suggest(name, SECTIONS) + f"; the sections are {', '.join(SECTIONS)}"
            )  # fmt: skip
        if rest not in _KEY_TYPES[name]:
            where = f"; {rest!r} is in section {_SECTION_OF[rest]!r}" if rest in _SECTION_OF else ""
            raise ValueError(
                f"unknown config key {key!r} in {source}: section {name!r} has no {rest!r}"
                + (where or _suggest(rest, _KEY_TYPES[name]))
            )
        return norm
    if norm in LAUNCH_KEYS:
        flag = "--" + norm.replace("_", "-")
        raise ValueError(
            f"{norm} in {source} is a launch setting, not a config key; give it to the "
            f"launcher: cnnpipe train {flag} ... (or torchrun {flag} ...)"
        )
    if norm in PLAIN_KEYS:
        if plain_ok:
            return PLAIN_KEYS[norm]
        name, _, rest = PLAIN_KEYS[norm].partition(".")
        raise ValueError(
            f"config key {key!r} in {source} is a flat key from before the config had sections; "
            f"it is now {PLAIN_KEYS[norm]}: write '{rest}:' under '{name}:'"
        )
    close = difflib.get_close_matches(norm, list(PLAIN_KEYS), n=1, cutoff=0.6)
    hint = (f"{close[0]!r}" if plain_ok else f"{PLAIN_KEYS[close[0]]!r}") if close else ""
    raise ValueError(
        f"unknown config key {key!r} in {source}"
        + (f" (did you mean {hint}?)" if hint else "")
        + "; see the sections of TrainConfig in cnn/config.py for the valid keys"
    )


def _section_items(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A mapping written in sections (`optim: {lr: 0.1}`) -> `{"optim.lr": 0.1}`."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).strip().replace("-", "_")
        if name not in SECTIONS and isinstance(value, dict):
            raise ValueError(
                f"unknown config key {key!r} in {source}: no section {name!r}"
                + _suggest(name, SECTIONS) + f"; the sections are {', '.join(SECTIONS)}"
            )  # fmt: skip
        if name not in SECTIONS:
            out[locate_key(name, source, plain_ok=False)] = value
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            fix = (
                f"write {name}: {{name: {value}}} (the key {name}.name)"
                if "name" in _KEY_TYPES[name]
                else f"write its keys under {name}:"
            )
            raise ValueError(
                f"{name!r} in {source} is a config section, a mapping of keys, not {value!r}; "
                + fix
            )
        for sub, sub_value in value.items():
            out[locate_key(f"{name}.{sub}", source, plain_ok=False)] = sub_value
    return out


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML/CLI value to the key's declared type; raise naming the key."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~", ""):
        if optional:
            return None
        if tp is str or value in choices:  # e.g. aug=none is a value, not a missing one
            return value
        raise ValueError(f"{name} cannot be null; give a {_type_name(tp)} value")
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null; give a {_type_name(tp)} value")
    if choices:
        if str(value) not in choices:
            raise ValueError(_not_a_choice(name, value, choices))
        return str(value)
    if name == "model.pretrained" and isinstance(value, bool):
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


def _type_name(tp: Any) -> str:
    return "choice" if typing.get_origin(tp) is Literal else tp.__name__


def coerce_values(
    data: dict[str, Any], *, source: str = "config", plain_ok: bool = True
) -> dict[str, Any]:
    """`{key: value}` -> `{"section.key": coerced value}`; unknown keys raise with a suggestion.
    Keys are `section.key` or, with `plain_ok`, plain names (`lr`)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = locate_key(key, source, plain_ok=plain_ok)
        name, _, sub = dotted.partition(".")
        out[dotted] = _coerce(dotted, value, _KEY_TYPES[name][sub])
    return out


def parse_overrides(overrides: typing.Iterable[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["epochs=5", "optim.lr=0.1"]` (or a dict) -> `{"optim.epochs": 5, "optim.lr": 0.1}`.
    Values are parsed as YAML scalars and then coerced to the key's type, so `pretrained=null`
    and `lr=1e-3` work."""
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
    nproc_per_node: int = 1,
    nnodes: int = 1,
) -> TrainConfig:
    """Resolve the one config: defaults < recipe < config file < model/dataset < overrides.

    `model`/`dataset` may be omitted when the config file or the overrides name them; the
    launch's `nproc_per_node`/`nnodes` are only used to validate the batch size and devices."""
    file_data = values_of_file(config_file) if config_file else {}
    over = parse_overrides(overrides)
    model = over.get("model.name") or model or file_data.get("model.name") or ModelSection.name
    dataset = (
        over.get("data.dataset") or dataset or file_data.get("data.dataset") or DataSection.dataset
    )
    recipe_name = recipe or over.get("run.recipe") or file_data.get("run.recipe")
    merged: dict[str, Any] = {}
    try:
        recipe_path: Path | None = find_recipe(model, dataset, recipe_name)
    except FileNotFoundError:
        if recipe_name:
            raise
        recipe_path = None  # no recipes shipped at all: dataclass defaults
    if recipe_path is not None:
        merged.update(values_of_file(recipe_path))
    merged.update(file_data)
    merged.update(over)
    merged["model.name"], merged["data.dataset"] = model, dataset
    merged["run.recipe"] = recipe_path.stem if recipe_path is not None else None
    if "run.output_dir" not in merged:
        merged["run.output_dir"] = str(Path("runs") / f"{model}-{dataset}")
    cfg = TrainConfig.from_values(merged)
    if validate:
        cfg.validate(nproc_per_node=nproc_per_node, nnodes=nnodes)
    return cfg


def values_of_file(path: str | Path) -> dict[str, Any]:
    """A YAML file in sections as coerced `{"section.key": value}` (only the keys it sets)."""
    return coerce_values(_section_items(_read_yaml(Path(path)), str(path)), source=str(path))
