"""The `cnnpipe` command line: one entry point for people (torchrun uses `python -m cnn.train`).

Each sub-command imports what it needs lazily, so `cnnpipe models` stays fast and does not start
Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_models(args: argparse.Namespace) -> int:
    from cnn.models import format_models_table

    print(format_models_table(args.pattern))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cnn.data import prepare_dataset

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
        print(json.dumps(info.to_dict()))
    else:
        print(info.summary(), file=sys.stderr)
    return 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Bad input: one clear line, non-zero exit, no traceback.
        print(f"cnnpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
