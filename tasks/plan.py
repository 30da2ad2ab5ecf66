"""Turn pipeline arguments into a validated TrainConfig and LaunchSpec, before anything starts.

No prefect or mlflow here: the CLI calls this first, so bad input fails within seconds, before
Prefect's API starts and before anything is written anywhere. Two stages:

1. Torch-free checks (names, values, folders, class counts, batch size against the training
   split, output dir, MLflow SQLite folder). Model names and their metadata come from
   `tasks/models_table.json`, a table kept in step with the registry by a test, so a typo
   fails before `import torch` (which alone takes seconds).
   A dataset download's host must resolve (else the offline route is shown, in seconds).
2. Checks that need torch: the device, a pretrained file (exists, loads with
   `weights_only=True`, fits the architecture), a pretrained weights name (in the torch hub
   cache, or its host resolves).

Input is the flow's one request (`tasks.request`). The flow plans its request again
(deployments skip the CLI); within one process the CLI's plan of the same request is answered
from a memo, so validation is done once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import fnmatch
import functools
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cnn.config import RECIPES_DIR, TrainConfig, find_recipe, how_to_set, resolve_config
from cnn.folders import find_folder_root, visible_entries
from tasks.launch import LaunchSpec
from tasks.request import CompareRequest, TrainRequest

MODELS_TABLE = Path(__file__).with_name("models_table.json")
# Training-split sizes of the downloadable datasets (before the validation hold-out).
_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "mnist": 60_000, "fashion-mnist": 60_000}
OFFLINE_ROUTE = (
    "offline, train on a local folder instead: --dataset imagefolder --data-dir DIR (DIR holds "
    "train/<class>/<image> and val/ or test/; see README 'Offline')"
)


class DownloadUnavailableError(ConnectionError):
    """A download the run needs cannot start (the host does not resolve): fail now, no retry."""


# -------------------------------------------------------------------- the models table


@functools.cache
def models_table() -> dict[str, Any]:
    """`tasks/models_table.json`: models (name -> metadata), datasets, image extensions."""
    return json.loads(MODELS_TABLE.read_text())


def build_models_table() -> dict[str, Any]:
    """The table from the live registry (imports torch); `python -m tasks.plan` rewrites it."""
    import torchvision.models as tvm

    from cnn.data.sources import DATASETS, IMAGE_EXTENSIONS, SOURCES
    from cnn.models import list_models, model_info

    models: dict[str, Any] = {}
    for name in list_models():
        i = model_info(name)
        row: dict[str, Any] = {
            "family": i.family,
            "params": i.params,
            "input_size": i.input_size,
            "resize_size": i.resize_size,
            "min_input_size": i.min_input_size,
            "source": i.source,
            "weights": list(i.weights),
        }
        if i.weights:
            enum = tvm.get_model_weights(name)
            row["default_weights"] = enum.DEFAULT.name
            row["weights_urls"] = {w: enum[w].url for w in i.weights}
        models[name] = row
    datasets = {
        name: {
            "files": [
                {"filename": f.filename, "md5": f.md5, "urls": list(f.urls)} for f in spec.files
            ]
        }  # fmt: skip
        for name, spec in SOURCES.items()
    }
    return {
        "models": models,
        "datasets": list(DATASETS),
        "sources": datasets,
        "image_extensions": list(IMAGE_EXTENSIONS),
    }


def list_model_names(pattern: str | None = None) -> list[str]:
    names = sorted(models_table()["models"])
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def format_models_table(pattern: str | None = None) -> str:
    """The text behind `cnnpipe models [PATTERN]`, from the table (no torch import)."""
    names = list_model_names(pattern)
    if not names:
        return f"no model matches {pattern!r}; try `cnnpipe models` to list all"
    table = models_table()["models"]
    header = ("name", "family", "params", "input", "min", "pretrained", "source")
    rows = [header]
    for n in names:
        i = table[n]
        pretrained = "yes" if i["weights"] else "no"
        rows.append(
            (n, i["family"], f"{i['params']:,}", str(i["input_size"]), str(i["min_input_size"]),
             pretrained, i["source"])
        )  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    right = {2, 3, 4}
    lines = [
        "  ".join(
            cell.rjust(w) if c in right else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(names)} models")
    return "\n".join(lines)


def check_model_name(name: str) -> dict[str, Any]:
    """The table row of `name`, or the registry's own ValueError wording (closest names)."""
    table = models_table()["models"]
    if name in table:
        return table[name]
    names = sorted(table)
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
    hint = f"closest names: {', '.join(close)}" if close else "no close names"
    raise ValueError(
        f"unknown model {name!r}; {hint}. Run `cnnpipe models` (or list_models()) to see all "
        f"{len(names)} names."
    )


def _dataset_key(name: str) -> str:
    key = name.lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist"}.get(key, key)


def check_dataset_name(name: str) -> str:
    """The canonical dataset name, or a ValueError listing the valid ones."""
    names = models_table()["datasets"]
    key = _dataset_key(name)
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown dataset {name!r}{hint}; valid names: {', '.join(names)} "
            "(use 'imagefolder' for a directory of train/<class>/<image> files)"
        )
    return key


def recipe_for(model: str, dataset: str) -> str | None:
    """The recipe `cnn.config.find_recipe` picks, decided from the table (no torch import).
    A test checks that both agree for every model."""
    info = models_table()["models"][model]
    candidates = [f"{model}-{dataset}"]
    if info["source"] == "torchvision":
        mixed = any(
            r["family"] == info["family"] and r["source"] != "torchvision"
            for r in models_table()["models"].values()
        )
        candidates.append(f"{info['family']}-finetune")
        if not mixed:
            candidates.append(info["family"])
        candidates.append("finetune")
    else:
        candidates.append(info["family"])
    for name in [*candidates, "default"]:
        if (RECIPES_DIR / f"{name}.yaml").is_file():
            return name
    return None


# -------------------------------------------------------------------- image folders


@dataclasses.dataclass
class FolderCounts:
    """Images per class per split of an image folder (counted by file extension)."""

    root: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images

    def val_size(self, val_fraction: float) -> int:
        """Validation images: val/'s, or the seeded per-class hold-out of train/ (as
        `cnn.data.prepare` does it: a class of 1 image keeps it for training)."""
        if "val" in self.counts:
            return sum(self.counts["val"].values())
        total = 0
        for n in self.counts["train"].values():
            n_val = round(n * val_fraction)
            total += max(1, min(n_val, n - 1)) if n >= 2 else n_val
        return total

    def train_size(self, val_fraction: float) -> int:
        """Training images after the seeded per-class hold-out (as cnn.data does it)."""
        train = sum(self.counts["train"].values())
        return train if "val" in self.counts else train - self.val_size(val_fraction)


def count_imagefolder(data_dir: str | Path) -> FolderCounts:
    """Check an image folder's shape: at least 2 classes, each with at least one image in every
    split, the same classes in every split. Names the folder and the fix."""
    root = find_folder_root(data_dir)
    exts = tuple(models_table()["image_extensions"])
    counts: dict[str, dict[str, int]] = {}
    classes: list[str] = []
    for split in ("train", "val", "test"):
        sdir = root / split
        if not sdir.is_dir():
            continue
        per_class = {}
        for entry in visible_entries(sdir):
            if entry.is_dir():
                per_class[entry.name] = sum(
                    1 for f in visible_entries(entry.path) if f.name.lower().endswith(exts)
                )
        if split == "train":
            classes = sorted(per_class)
            if len(classes) < 2:
                have = f"only {classes[0]!r}" if classes else "none"
                raise ValueError(
                    f"{sdir} has {len(classes)} class folder(s) ({have}); a classifier needs at "
                    "least 2: train/<class>/<image> with one folder per class"
                )
        elif sorted(per_class) != classes:
            missing = sorted(set(classes) - set(per_class))
            extra = sorted(set(per_class) - set(classes))
            raise ValueError(
                f"{sdir} has other class folders than train/ (missing: {missing or 'none'}, "
                f"extra: {extra or 'none'}); every split needs the same class folders"
            )
        empty = [c for c, n in per_class.items() if n == 0]
        if empty:
            raise ValueError(
                f"class folder {sdir / empty[0]} has no images ({', '.join(exts)})"
                + (f", nor do {len(empty) - 1} more" if len(empty) > 1 else "")
                + "; add images to it or remove the folder from every split"
            )
        counts[split] = per_class
    return FolderCounts(root, classes, counts)


# -------------------------------------------------------------------- destinations


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(target: Path, what: str, fix: str) -> None:
    """`target` is a folder, or can be created as one, that this process can write in: a file
    in the way, a missing permission or a file system that refuses (read-only, /proc) is named
    now. Nothing is left behind (the probe folder is removed)."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} is a file, not a directory; {fix}")
    base = _nearest_existing(target)
    if not base.is_dir():
        raise ValueError(f"{what} cannot be created: {base} is a file; {fix}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{what} is not writable ({base} does not allow writing for this "
                         f"user); {fix}")  # fmt: skip
    try:  # os.access says yes to root everywhere, /proc included: ask the file system itself
        os.rmdir(tempfile.mkdtemp(prefix=".cnnpipe-probe-", dir=base))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{what} cannot be created in {base} ({reason}); {fix}") from None


def check_output_dir(output_dir: str | Path | None) -> None:
    """The output dir is a directory (or can be created) and is writable; nothing created."""
    target = Path(output_dir) if output_dir else Path("runs")
    what = f"--output-dir {target}" if output_dir else f"the default output folder {target}"
    check_writable_dir(target, what, "pass --output-dir in a folder you can write to")


def check_cache_dir(cache_dir: str | Path | None, data_dir: str | Path) -> None:
    """A tensor cache that does not exist yet can be created (an existing one may be a
    read-only shared cache: prepare then only reads it). An s3:// store is not a folder."""
    if str(cache_dir).startswith("s3://"):  # cnn.data.shards.is_remote, without torch
        return
    target = Path(cache_dir) if cache_dir is not None else Path(data_dir) / "cache"
    if not target.is_dir():
        what = f"--cache-dir {target}" if cache_dir is not None else f"the cache folder {target}"
        check_writable_dir(target, what, "pass --cache-dir in a folder you can write to")


def check_tracking_destination(uri: str | None = None) -> str:
    """A local SQLite MLflow store's folder exists: never create a folder that was not asked
    for (a mistyped sqlite:////nonexistent/dir/mlflow.db would otherwise create /nonexistent)."""
    from cnn.tracking import sqlite_database, tracking_uri

    uri = tracking_uri(uri)
    raw = sqlite_database(uri)
    if raw is None:
        return uri
    if raw in ("", ":memory:"):
        raise ValueError(
            f"MLflow store {uri} is an in-memory database, private to each process: the "
            "training job could not log into the flow's run; use a file, e.g. "
            "sqlite:///mlflow.db (MLFLOW_TRACKING_URI)"
        )
    path = Path(raw)
    if path.is_dir():
        raise ValueError(f"MLflow store {uri}: {path} is a directory, not a database file")
    if not path.parent.is_dir():
        raise ValueError(
            f"MLflow store {uri}: folder {path.parent} does not exist; fix the URI "
            f"(MLFLOW_TRACKING_URI) or create the folder first (mkdir -p {path.parent})"
        )
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"MLflow store {uri}: folder {path.parent} is not writable")
    return uri


# -------------------------------------------------------------------- network


def host_resolves(host: str, timeout: float = 4.0) -> bool:
    """Whether `host` resolves within `timeout` s (getaddrinfo has no timeout of its own)."""
    result: list[bool] = []

    def look() -> None:
        try:
            socket.getaddrinfo(host, None)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def check_download(
    dataset: str,
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    *,
    download: bool = True,
    mirror: str | None = None,
) -> None:
    """A dataset that must be downloaded can be: its files or a tensor cache of it are here,
    or a download host resolves. Offline, fail now (not after minutes of retries) with the
    route that works offline. No torch: file names and URLs come from the table."""
    key = _dataset_key(dataset)
    if key == "imagefolder":
        return
    source = models_table()["sources"][key]
    data_dir = Path(data_dir)
    cache = Path(cache_dir) if cache_dir is not None else data_dir / "cache"
    if cache.is_dir() and any(cache.glob(f"{key}-*/meta.json")):
        return  # prepared before: prepare checks its own key, the job gets a cache hit
    raw = data_dir / "raw" / key
    missing = [f for f in source["files"] if not (raw / f["filename"]).is_file()]
    if not missing:
        return
    if not download:
        raise FileNotFoundError(
            f"{raw / missing[0]['filename']} is missing and download is off; put the file "
            f"there, allow the download, or {OFFLINE_ROUTE}"
        )
    mirror = mirror or os.environ.get("CNNPIPE_DATA_MIRROR") or None
    urls = [mirror] if mirror else [u for f in missing for u in f["urls"]]
    hosts = sorted({urlparse(u).hostname or "" for u in urls} - {""})
    if any(host_resolves(h) for h in hosts):
        return
    raise DownloadUnavailableError(
        f"cannot download {key}: {', '.join(hosts)} does not resolve (no network?). Put "
        f"{missing[0]['filename']} in {raw}, set $CNNPIPE_DATA_MIRROR to a reachable mirror, "
        f"or {OFFLINE_ROUTE}"
    )


# -------------------------------------------------------------------- pretrained weights


def _clean(exc: BaseException) -> str:
    """The first line of an exception, without PyTorch's advice to retry with
    weights_only=False (wrong advice for an untrusted file)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(" Re-running `torch.load`")[0].split(" In PyTorch 2.6")[0].rstrip(" .,")


def _pretrained_kind(cfg: TrainConfig) -> str:
    """'name' (a weights name of the model) or 'file' (an existing file); raises for anything
    else: a missing file, a directory, a name the model does not have. No torch."""
    info = models_table()["models"][cfg.model.name]
    text = str(cfg.model.pretrained)
    weights = info.get("weights") or []
    if text in weights or (text == "DEFAULT" and weights):
        return "name"
    path = Path(text)
    suffixes = (".pt", ".pth", ".bin", ".ckpt")
    looks_like_path = os.sep in text or "/" in text or path.suffix in suffixes or path.exists()
    if not looks_like_path:
        names = ", ".join(("DEFAULT", *weights)) if weights else "none (trained from scratch)"
        raise ValueError(
            f"--pretrained {text!r} is neither a weights name of {cfg.model.name!r} ({names}) "
            "nor an existing file; pass a weights name or the path of a local state-dict file"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {text!r} does not exist"
            + (" (it is a directory)" if path.is_dir() else "")
            + "; pass the path of a state-dict file saved with torch.save(model.state_dict(), "
            "path)"
        )
    return "file"


def check_pretrained(cfg: TrainConfig) -> None:
    """`pretrained` is a weights name that is available (hub cache, or its host resolves) or a
    state-dict file that loads with weights_only=True and fits the architecture."""
    if not cfg.model.pretrained:
        return
    info = models_table()["models"][cfg.model.name]
    text = str(cfg.model.pretrained)
    if _pretrained_kind(cfg) == "name":
        name = info["default_weights"] if text == "DEFAULT" else text
        url = info["weights_urls"][name]
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if cached.is_file() or host_resolves(urlparse(url).hostname or ""):
            return
        raise FileNotFoundError(
            f"the {name} weights of {cfg.model.name!r} are not in the torch hub cache and "
            f"{urlparse(url).hostname} does not resolve (no network?); copy {url} to {cached}, "
            "or pass --pretrained PATH to a local state-dict file"
        )
    path = Path(text)
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a loadable state dict
        raise ValueError(
            f"pretrained weights file {text!r} cannot be loaded safely (torch.load with "
            f"weights_only=True: {_clean(exc)}); it is corrupt or not a PyTorch state dict, "
            "and an untrusted file must not be loaded with weights_only=False"
        ) from None
    from cnn.models import get_model

    try:
        get_model(cfg.model.name, num_classes=max(cfg.model.num_classes or 2, 2), pretrained=text,
                  input_size=cfg.data.input_size)  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(_clean(exc)) from None


# -------------------------------------------------------------------- the plan


def check_dataset(dataset: str, data_dir: str | Path, download: bool = True) -> None:
    """Unknown dataset names and missing or malformed image folders are errors that name the
    fix (no torch import)."""
    key = check_dataset_name(dataset)
    if key == "imagefolder":
        count_imagefolder(data_dir)
        return
    if not download and not Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"data dir {data_dir} does not exist and download is off; point --data-dir at the "
            f"folder holding {dataset}, or allow the download"
        )


def _check_batch(cfg: TrainConfig, train_size: int, where: str, world: int) -> None:
    if cfg.optim.batch_size <= train_size:
        return
    step = world * cfg.optim.grad_accum
    fit = (train_size // step) * step
    fix = f"use --batch-size {fit} or smaller" if fit else "add training images"
    raise ValueError(
        f"global batch_size={cfg.optim.batch_size} is larger than the training split ({train_size} "
        f"images in {where}), so not one training step would run; {fix}"
    )


@contextlib.contextmanager
def _fix_at_the_flag(request: TrainRequest) -> Iterator[None]:
    """A bad value set by a shortcut flag (`--epochs 0`) is fixed at that flag: the config's
    generic "--set KEY=VALUE" advice would not work, as the flag overrides `--set`."""
    try:
        yield
    except ValueError as exc:
        msg = str(exc)
        for key, where in request.shortcut_flags().items():
            if msg.startswith(f"{key}=") and how_to_set(key) in msg:
                raise ValueError(msg.replace(how_to_set(key), f"change {where}")) from None
        raise


def _validate_values(cfg: TrainConfig, nproc_per_node: int, nnodes: int) -> None:
    """`TrainConfig.validate` without its device and model parts, which import torch: plain
    value errors (epochs=0, a bad optimizer name) are reported before seconds of imports and
    before the data checks. The full `validate` runs afterwards."""
    light = copy.copy(cfg)
    light._validate_device = lambda nproc, world: None  # type: ignore[method-assign]
    light._validate_model = lambda: None  # type: ignore[method-assign]
    light.validate(nproc_per_node=nproc_per_node, nnodes=nnodes)


_MEMO: dict[str, tuple[TrainConfig, LaunchSpec]] = {}


def plan_training(
    request: TrainRequest, *, after_quick_checks: Callable[[], None] | None = None
) -> tuple[TrainConfig, LaunchSpec]:
    """Resolve and validate the run's config and its torchrun launch (raises ValueError /
    FileNotFoundError naming the bad value and the fix; nothing is written). The torch-free
    checks come first, so a typo fails before torch is imported; `after_quick_checks` runs
    between the two (the CLI spawns Prefect's server there to import while torch does)."""
    memo_key = json.dumps([dataclasses.asdict(request), os.getcwd()], sort_keys=True, default=str)
    if memo_key in _MEMO:
        cfg, launch = _MEMO[memo_key]
        return copy.deepcopy(cfg), launch
    request.check()
    over = request.config_overrides()
    launch = LaunchSpec(
        nproc_per_node=request.nproc_per_node,
        nnodes=request.nnodes,
        node_rank=request.node_rank,
        rdzv_endpoint=request.rdzv_endpoint,
        max_restarts=request.max_restarts,
    )
    launch.validate()
    extra: dict[str, Any] = {}
    if request.data_dir is not None:
        extra["source.data_dir"] = request.data_dir
    if request.cache_dir is not None:
        extra["source.cache_dir"] = request.cache_dir
    # Stage 1, no torch: names from the table, the recipe decided from the table.
    model, dataset, recipe = request.model, request.dataset, request.recipe
    name = str(over.get("model.name") or model)
    check_model_name(name)
    check_dataset_name(str(over.get("data.dataset") or dataset))
    if recipe:
        find_recipe(name, dataset, recipe)  # an explicit unknown recipe: named now
    elif not request.config_file and "run.recipe" not in over:
        recipe = recipe_for(name, _dataset_key(str(over.get("data.dataset") or dataset)))
    cfg = resolve_config(
        model=model,
        dataset=dataset,
        recipe=recipe,
        config_file=request.config_file,
        overrides={**extra, **over},
        validate=False,
    )
    check_model_name(cfg.model.name)
    key = check_dataset_name(cfg.data.dataset)
    with _fix_at_the_flag(request):
        _validate_values(cfg, launch.nproc_per_node, launch.nnodes)
    world = launch.nproc_per_node * launch.nnodes
    if key == "imagefolder":
        folder = count_imagefolder(cfg.source.data_dir)
        where = f"{folder.root / 'train'}" + (
            ""
            if "val" in folder.counts
            else f" after holding out {cfg.data.val_fraction:g} for val"
        )
        _check_batch(cfg, folder.train_size(cfg.data.val_fraction), where, world)
        if not folder.val_size(cfg.data.val_fraction):
            raise ValueError(
                f"{folder.root} has no val/ folder and every class in train/ has a single image, "
                "so no image is left to validate on; add a val/ folder (val/<class>/<image>) "
                "or more images per class"
            )
    else:
        check_dataset(cfg.data.dataset, cfg.source.data_dir, cfg.source.download)
        n = _TRAIN_SIZES.get(key)
        if n:
            _check_batch(cfg, int(n * (1 - cfg.data.val_fraction)), f"{key} train", world)
        src = cfg.source
        check_download(cfg.data.dataset, src.data_dir, src.cache_dir, download=src.download,
                       mirror=src.mirror)  # fmt: skip
    check_cache_dir(cfg.source.cache_dir, cfg.source.data_dir)
    if cfg.model.pretrained:
        _pretrained_kind(cfg)  # a missing file or an unknown name: named before torch loads
    if after_quick_checks is not None:
        after_quick_checks()
    # Stage 2: checks that need torch (validate's device/model part, weights).
    with _fix_at_the_flag(request):
        cfg.validate(nproc_per_node=launch.nproc_per_node, nnodes=launch.nnodes)
    check_pretrained(cfg)
    _MEMO[memo_key] = (copy.deepcopy(cfg), launch)
    return cfg, launch


def plan_comparison(request: CompareRequest) -> list[tuple[TrainConfig, LaunchSpec]]:
    """Every model's plan up front, so a typo in the 3rd model fails before the 1st trains:
    the request and all names first, then each model's config and data."""
    request.check()
    for name in request.models:
        check_model_name(name)
    return [plan_training(request.for_model(name)) for name in request.models]


def split_available(dataset: str, data_dir: str | Path, split: str) -> None:
    """`evaluate --split test` on a folder without test/ is an error that says so: its 'test'
    split would be the validation split under another name."""
    if _dataset_key(dataset) != "imagefolder" or split != "test":
        return
    root = find_folder_root(data_dir)
    if not (root / "test").is_dir():
        raise ValueError(
            f"{root} has no test/ split (only "
            + "/".join(s for s in ("train", "val") if (root / s).is_dir())
            + "); use --split val (with no test/, training reports its val split as the test)"
        )


if __name__ == "__main__":  # regenerate the table: uv run python -m tasks.plan
    from cnn.atomic import atomic_write

    atomic_write(MODELS_TABLE, json.dumps(build_models_table(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {MODELS_TABLE}")
