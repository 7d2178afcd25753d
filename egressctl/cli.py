"""Entry point of `egressctl`.

Each command group lives in its own module exposing ``register(subparsers)``; this module only
wires them together so that a slow import (the Kubernetes client) is paid by the commands that
need it, not by ``egressctl render``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from egressctl.optional import MissingDependency

COMMAND_MODULES: tuple[str, ...] = (
    "egressctl.render_cmds",
    "egressctl.ops_cmds",
    "egressctl.migrate_cmds",
    "egressctl.access_cmds",
    "egressctl.devstack",
    "egressctl.run_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egressctl",
        description="Egress gateways for Kubernetes, reconciled serverlessly.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MissingDependency as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0
