"""Reference trainers: small, readable training loops that run through sslkernels' ops.

    python -m sslkernels.train METHOD [--data digits|synthetic|PATH] [--impl fused|reference|both] [--epochs N]
                                      [--batch-size B] [--device D] [--out DIR] [--resume CKPT] ...

METHOD: simclr, moco (v2), mocov3, byol, simsiam, dino, clip, supcon. One file per method over a small shared
core (core.py: options, loop, evaluation, checkpoints, reports; data.py: data sets and augmentations). A method
module provides ``HELP``, ``add_arguments(parser)`` and ``train(args) -> report dict``; list it in ``METHODS``
to get a subcommand.
"""
from __future__ import annotations

import argparse
import importlib

# subcommand -> module; imported lazily so `--help` and one method do not import every trainer.
METHODS = {name: name for name in ("simclr", "moco", "mocov3", "byol", "simsiam", "dino", "clip", "supcon")}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the method docstrings' line breaks (they hold example commands)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sslkernels.train",
                                     description="Train a tiny self-supervised encoder through sslkernels' ops.")
    sub = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, module_name in METHODS.items():
        module = importlib.import_module(f".{module_name}", __name__)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.train)
    return parser


def main(argv=None) -> dict:
    """Parse ``argv`` (default sys.argv[1:]), train, and return the report (also written to <out>/report.json).

    A bad setting (e.g. a batch larger than the data) exits with an error message, like argparse does.
    """
    from .core import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog} {args.method}: error: {e}\n")


__all__ = ["main", "build_parser", "METHODS"]
