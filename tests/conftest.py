"""Shared fixtures: the real local control plane for tests marked ``cluster``.

Why: every capability is tested against real servers (kube-apiserver, etcd, the
controllers, CoreDNS, the Pub/Sub emulator), never mocks. The stack comes up once per
session: a healthy one from `egressctl dev up` is reused (and left running); otherwise the
session starts one (building the binaries on first use) and stops it at the end. If a part
cannot start, the tests fail with the part and the reason; they are never skipped.

Every test gets a unique suffix and cleans up what it creates, so tests can share the
stack, run against a long-lived `dev up`, and be re-run without leftovers interfering.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DevStack:
    """What a test needs to reach the stack."""

    env: dict[str, str]
    started_here: bool

    @property
    def kubeconfig(self) -> str:
        return self.env["KUBECONFIG"]

    @property
    def coredns_addr(self) -> str:
        return self.env["COREDNS_ADDR"]

    @property
    def pubsub_host(self) -> str:
        return self.env["PUBSUB_EMULATOR_HOST"]

    @property
    def pubsub_project(self) -> str:
        return self.env["PUBSUB_PROJECT_ID"]

    def identity_kubeconfig(self, identity: str) -> str:
        from egressctl.devstack.stack import identity_env_key

        return self.env[identity_env_key(identity)]

    def api_client(self, kubeconfig: str | None = None) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=kubeconfig or self.kubeconfig)


def _egressctl(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "egressctl", "dev", *args]
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, check=False)


def _dev_up_teed() -> tuple[int, str]:
    """Run `egressctl dev up`, echoing its progress (a cold build takes minutes) live and
    keeping the last lines for the failure message."""
    cmd = [sys.executable, "-m", "egressctl", "dev", "up"]
    last: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        cmd, cwd=REPO, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            last.append(line.rstrip("\n"))
    return proc.returncode, "\n".join(last)


@pytest.fixture(scope="session")
def dev_stack(request: pytest.FixtureRequest) -> Iterator[DevStack]:
    """The running stack (reused if healthy, else started for this session)."""
    from egressctl.devstack.procs import DevStackError
    from egressctl.devstack.stack import (
        Layout,
        apply_infra,
        ensure_identities,
        env_values,
        healthy,
        load_state,
        refresh_node_manifests,
    )

    layout = Layout(REPO)
    state = load_state(layout)
    started_here = False
    if state is not None and healthy(layout, state):
        # A reused stack gets the working tree's CRD and RBAC (they may have changed since it
        # started), so RBAC tests check the manifests as they are now.
        # Identities added since it started get their kubeconfigs from its CA, and its cluster
        # DNS the working tree's wiring (infra/dev/node, infra/coredns).
        try:
            ensure_identities(layout, state)
            apply_infra(layout)
            refresh_node_manifests(layout, state)
        except DevStackError as exc:
            pytest.fail(f"applying infra/ to the running dev stack failed: {exc}", pytrace=False)
    else:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print("\n[tests] no healthy dev stack: running `egressctl dev up`", file=sys.stderr)
            code, output = _dev_up_teed()
        if code != 0:
            pytest.fail(
                f"the local control plane did not come up (exit {code}); the failing part "
                f"and why, from `egressctl dev up` (logs in .cache/dev/logs/):\n{output}",
                pytrace=False,
            )
        started_here = True
        state = load_state(layout)
        if state is None or not healthy(layout, state):
            status = _egressctl("status")
            pytest.fail(
                f"dev stack unhealthy right after `dev up`:\n{status.stdout}", pytrace=False
            )
    env = env_values(layout, state)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield DevStack(env=env, started_here=started_here)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started_here and os.environ.get("EGRESS_DEV_KEEP") != "1":
            _egressctl("down")


@pytest.fixture(scope="session")
def k8s(dev_stack: DevStack) -> Any:
    """An admin ApiClient."""
    return dev_stack.api_client()


@pytest.fixture
def unique() -> str:
    """A short suffix that makes this test's names its own."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def namespace(k8s: Any, unique: str) -> Iterator[str]:
    """A fresh namespace, deleted (with everything in it) after the test."""
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    name = f"t-{unique}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture
def cleanup() -> Iterator[Callable[[Callable[[], object]], None]]:
    """Register undo actions; they run in reverse order even if the test fails."""
    actions: list[Callable[[], object]] = []
    yield actions.append
    errors: list[BaseException] = []
    for action in reversed(actions):
        try:
            action()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
