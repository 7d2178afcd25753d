"""A dev stack of the benchmarks' own (EGRESS_DEV_DIR=.cache/dev-bench), so that figures are not
disturbed by, and do not disturb, a `make run` or test stack. Started if needed, stopped after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def bench_stack() -> Iterator[dict[str, str]]:
    os.environ.setdefault("EGRESS_DEV_DIR", str(REPO / ".cache" / "dev-bench"))
    from egressctl.devstack.stack import (
        Layout,
        env_values,
        healthy,
        load_state,
        refresh_node_manifests,
    )

    layout = Layout(REPO)
    state = load_state(layout)
    started = False
    if state is None or not healthy(layout, state):
        print(f"[bench] starting a dev stack in {layout.dev}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "egressctl", "dev", "up"],
            cwd=REPO,
            check=True,
            stdout=sys.stderr,
        )
        started = True
        state = load_state(layout)
        assert state is not None
    else:
        refresh_node_manifests(layout, state)  # a reused stack gets the working tree's CoreDNS
    env = env_values(layout, state)
    os.environ.update(env)  # kubectl and the test helpers read KUBECONFIG, ENVOY_IMAGE
    try:
        yield env
    finally:
        if started and os.environ.get("EGRESS_DEV_KEEP") != "1":
            subprocess.run(
                [sys.executable, "-m", "egressctl", "dev", "down"],
                cwd=REPO,
                check=False,
                stdout=sys.stderr,
            )
