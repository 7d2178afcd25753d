"""`dev down` leaves nothing of the node behind, and a crashed stack is cleaned by the next
`dev up`.

Why: the node changes the machine (network namespaces, veths, routes, mounts, containers);
a stack that leaked them would break the next run or, worse, the machine. The test runs a
second, independent stack (its own EGRESS_DEV_DIR, so its own address slot) beside the one
the other tests use, crashes it with SIGKILL, brings it up again and takes it down.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressctl.devstack.node import AddressPlan, leftovers, pids_in_netns
from egressctl.devstack.stack import node_paths
from tests.conftest import DevStack

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def dev(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressctl", "dev", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.fixture
def other_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="egdev-test-"))
    yield path
    env = {**os.environ, "EGRESS_DEV_DIR": str(path)}
    if (path / "state.json").exists():
        dev(env, "down")
    shutil.rmtree(path, ignore_errors=True)


def test_crash_then_up_then_down_leaves_nothing(dev_stack: DevStack, other_dir: Path) -> None:
    other = other_dir
    env = {**os.environ, "EGRESS_DEV_DIR": str(other)}
    up = dev(env, "up")
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads((other / "state.json").read_text())
    plan = AddressPlan(state["slot"])
    paths = node_paths(other)
    assert (
        plan.slot
        != json.loads((Path(dev_stack.env["EGRESS_DEV_DIR"]) / "state.json").read_text())["slot"]
    ), "a second stack takes its own slot"
    assert pids_in_netns(plan.node_netns), "the node runs in its namespace"

    # Crash: every process of the stack dies at once, nothing is cleaned.
    for proc in state["procs"]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc["pid"], signal.SIGKILL)
    assert leftovers(plan, paths), "a crash leaves the node's pieces behind"

    again = dev(env, "up")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removed leftovers of the node" in again.stderr
    status = dev(env, "status")
    assert status.returncode == 0, status.stdout

    down = dev(env, "down")
    assert down.returncode == 0, down.stderr[-3000:]
    state = json.loads((other / "state.json").read_text())
    plan = AddressPlan(state["slot"])
    assert leftovers(plan, paths) == []
    assert not Path("/run/netns", plan.node_netns).exists()
    assert not Path("/run/netns", plan.inet_netns).exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(other) not in mounts
    shims = subprocess.run(["pgrep", "-f", str(other)], capture_output=True, text=True)
    assert shims.stdout.strip() == "", f"processes of the stopped stack: {shims.stdout}"


def test_a_stale_stack_folder_never_touches_another_stacks_node(
    dev_stack: DevStack, other_dir: Path
) -> None:
    """A folder whose state names the running stack's slot (a crashed stack whose slot was
    taken since) cleans only inside itself: the running node keeps running."""
    running = json.loads((Path(dev_stack.env["EGRESS_DEV_DIR"]) / "state.json").read_text())
    plan = AddressPlan(running["slot"])
    before = set(pids_in_netns(plan.node_netns))
    assert before
    (other_dir / "state.json").write_text(
        json.dumps({"version": 2, "slot": plan.slot, "procs": [], "complete": False})
    )
    env = {**os.environ, "EGRESS_DEV_DIR": str(other_dir)}
    down = dev(env, "down")
    assert down.returncode == 0, down.stderr[-2000:]
    assert before <= set(pids_in_netns(plan.node_netns)), "the running node lost processes"
    status = dev({**os.environ}, "status")
    assert status.returncode == 0, status.stdout
