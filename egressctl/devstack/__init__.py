"""`egressctl dev up|down|status|build`: the real local control plane for development and tests.

Why: kind needs a container engine we do not have; this runs the real servers (etcd,
kube-apiserver, kube-controller-manager, CoreDNS, the Pub/Sub emulator) as loopback
processes instead. Heavy imports stay inside the handlers so `egressctl render` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _up(args: argparse.Namespace) -> int:
    from egressctl.devstack.procs import DevStackError
    from egressctl.devstack.stack import Layout, find_repo, up

    try:
        layout = Layout(find_repo())
        up(layout)
    except DevStackError as exc:
        print(f"dev up failed: {exc}", file=sys.stderr)
        return 1
    print(layout.env_file)
    return 0


def _down(args: argparse.Namespace) -> int:
    from egressctl.devstack.procs import DevStackError
    from egressctl.devstack.stack import Layout, down, find_repo

    try:
        down(Layout(find_repo()))
    except DevStackError as exc:
        print(f"dev down failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    from egressctl.devstack.procs import DevStackError
    from egressctl.devstack.stack import Layout, check_all, find_repo, load_state

    try:
        layout = Layout(find_repo())
    except DevStackError as exc:
        print(exc, file=sys.stderr)
        return 1
    state = load_state(layout)
    if state is None or not state.procs:
        print("dev stack: not running (no processes recorded)")
        return 3
    checks = check_all(layout, state)
    width = max(len(c.part) for c in checks)
    for c in checks:
        print(f"{c.part:<{width}}  {'ok  ' if c.ok else 'FAIL'}  {c.detail}")
    all_ok = state.complete and all(c.ok for c in checks)
    print(f"env: {layout.env_file}" if all_ok else "dev stack: NOT healthy")
    return 0 if all_ok else 1


def _build(args: argparse.Namespace) -> int:
    from egressctl.devstack.procs import DevStackError
    from egressctl.devstack.stack import Layout, ensure_binaries, find_repo

    try:
        print(ensure_binaries(Layout(find_repo())))
    except DevStackError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def register(subparsers: Any) -> None:
    """Add the `dev` command group."""
    dev = subparsers.add_parser(
        "dev",
        help="run a real local control plane (etcd, kube-apiserver, controllers, DNS, Pub/Sub)",
        description=__doc__,
    )
    sub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    sub.add_parser(
        "up", help="build if needed, start and wait until healthy (idempotent)"
    ).set_defaults(func=_up)
    sub.add_parser("down", help="stop exactly the processes `dev up` started").set_defaults(
        func=_down
    )
    sub.add_parser("status", help="show each part and its health").set_defaults(func=_status)
    sub.add_parser(
        "build", help="build or reuse the pinned control-plane binaries; print their directory"
    ).set_defaults(func=_build)
