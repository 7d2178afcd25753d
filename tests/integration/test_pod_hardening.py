"""Gateway pods run hardened on the real dev node, and their namespace refuses anything less.

Why: a securityContext in the rendered Deployment proves nothing by itself. Envoy might need
root to bind a port below 1024, a writable directory, or shared memory; a runtime might ignore a
field. So a gateway with ports below and above 1024 (TCP and UDP) must pass Envoy's own
readiness probe on the node, and the kernel's view from inside the running pod is what is
checked: the credentials and capabilities of PID 1, the mounts, the listening sockets, the
sysctl. Pod Security admission in the gateway namespace is checked with the real API server:
the gateway's and the exporter's pods are admitted, a privileged pod or a root pod is refused.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import constants as c
from core.kube import DEPLOYMENT, Kube, Resource
from reconcile.app import build_reconciler
from tests.conftest import DevStack
from tests.integration.helpers import (
    GATEWAY_NS,
    create_es,
    dev_settings,
    external_service,
    gateway_pods,
    kubectl,
    purge,
    set_pods_ready,
)
from tests.integration.rbac_audit import kustomize

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXPORTER = REPO / "infra" / "exporter"
NAMESPACE = Resource("v1", "Namespace", "namespaces", namespaced=False)

# Pod Security admission's namespace labels (kubernetes.io/docs/concepts/security/pod-security-admission).
POD_SECURITY = "pod-security.kubernetes.io"
POD_SECURITY_MODES = ("enforce", "audit", "warn")
POD_SECURITY_LEVEL = "restricted"

# Below 1024 (TCP and UDP) and above: binding the first two needs the port sysctl.
LOW_TCP, LOW_UDP, HIGH_TCP = 443, 53, 8443
PORTS = [
    {"port": LOW_TCP, "protocol": "TCP"},
    {"port": HIGH_TCP, "protocol": "TCP"},
    {"port": LOW_UDP, "protocol": "UDP"},
]
TCP_LISTEN = "0A"  # socket state in /proc/net/tcp
SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _exec(pod: str, *command: str) -> tuple[int, str]:
    res = kubectl("exec", "-n", GATEWAY_NS, pod, "--", *command, timeout=30)
    return res.returncode, res.stdout + res.stderr


def _read(pod: str, path: str) -> str:
    """The file's bytes only: kubectl's own warnings (stderr) must not land in a parsed table."""
    res = kubectl("exec", "-n", GATEWAY_NS, pod, "--", "cat", path, timeout=30)
    assert res.returncode == 0, f"cat {path} in {pod}: {res.stdout}{res.stderr}"
    return res.stdout


def _status_fields(text: str) -> dict[str, str]:
    """/proc/<pid>/status as {field: value}."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def _listening_ports(pod: str, protocol: str) -> set[int]:
    """Local ports of the listening sockets in the pod's /proc/net/<protocol>{,6} tables (a
    header line, then hex "ADDR:PORT" columns). UDP sockets have no LISTEN state: every bound
    one counts."""
    ports = set()
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        for line in _read(pod, table).splitlines()[1:]:
            fields = line.split()
            if protocol == "udp" or fields[3] == TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def gateway(dev_stack: DevStack, admin: Kube, as_reconciler: Kube) -> Iterator[dict[str, Any]]:
    """A gateway on ports 443/TCP, 8443/TCP and 53/UDP with one Ready pod (as reconciled by
    the reconciler's own identity), removed afterwards."""
    name = f"hard-{uuid.uuid4().hex[:8]}"
    reconciler = build_reconciler(
        as_reconciler,
        dev_settings(delete_grace_s=0, coredns_import_path=dev_stack.env["COREDNS_IMPORT_PATH"]),
    )
    try:
        create_es(admin, external_service(name, ports=PORTS))
        result = reconciler.reconcile(name)
        assert result.outcome == "converged", result
        # Envoy's readiness probe passes: it started and bound every listener as uid 101.
        set_pods_ready(admin, name, True)
        pods = [
            p
            for p in gateway_pods(admin, name)
            if any(
                cond["type"] == "Ready" and cond["status"] == "True"
                for cond in (p.get("status") or {}).get("conditions") or []
            )
        ]
        assert pods, f"no Ready pod of {name}"
        yield pods[0]
    finally:
        purge(admin, name)


def test_the_namespace_enforces_restricted(admin: Kube) -> None:
    namespace = admin.get(NAMESPACE, GATEWAY_NS)
    assert namespace is not None
    labels = namespace["metadata"].get("labels") or {}
    for mode in POD_SECURITY_MODES:
        assert labels.get(f"{POD_SECURITY}/{mode}") == POD_SECURITY_LEVEL, (mode, labels)
        assert labels.get(f"{POD_SECURITY}/{mode}-version") == "latest", (mode, labels)


def test_envoy_runs_as_uid_101_without_any_capability(gateway: dict[str, Any]) -> None:
    pod = gateway["metadata"]["name"]
    status = _status_fields(_read(pod, "/proc/1/status"))
    assert status["Uid"].split() == ["101"] * 4, status["Uid"]
    assert status["Gid"].split() == ["101"] * 4, status["Gid"]
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["NoNewPrivs"] == "1"  # allowPrivilegeEscalation: false
    assert status["Seccomp"] == "2"  # a filter (RuntimeDefault) is installed
    cmdline = _read(pod, "/proc/1/cmdline").split("\0")
    assert cmdline[0].endswith("envoy") and "--disable-hot-restart" in cmdline, cmdline


def test_declared_ports_below_1024_are_bound_by_the_sysctl(gateway: dict[str, Any]) -> None:
    pod = gateway["metadata"]["name"]
    start = _read(pod, "/proc/sys/net/ipv4/ip_unprivileged_port_start").strip()
    assert start == str(LOW_UDP), "the pod's network namespace starts at its lowest port"
    tcp = _listening_ports(pod, "tcp")
    udp = _listening_ports(pod, "udp")
    admin_port = int(gateway["metadata"]["annotations"][c.ANNOTATION_ADMIN_PORT])
    assert {LOW_TCP, HIGH_TCP, admin_port} <= tcp, sorted(tcp)
    assert LOW_UDP in udp, sorted(udp)


def test_no_service_account_token_and_no_service_links(gateway: dict[str, Any]) -> None:
    pod = gateway["metadata"]["name"]
    spec = gateway["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert not [v for v in spec["volumes"] if "projected" in v], spec["volumes"]
    code, out = _exec(pod, "cat", f"{SA_TOKEN_DIR}/token")
    assert code != 0 and "No such file" in out, out
    assert SA_TOKEN_DIR not in _read(pod, "/proc/1/mounts")
    # enableServiceLinks: false. The gateway's own Service (created before its Deployment)
    # would otherwise be in the environment; only the API server's is always there.
    environ = _read(pod, "/proc/1/environ").split("\0")
    own = gateway["metadata"]["labels"][c.LABEL_GATEWAY].upper().replace("-", "_")
    assert not [e for e in environ if e.startswith(f"{own}_SERVICE_")], environ


def test_the_root_filesystem_is_read_only(gateway: dict[str, Any]) -> None:
    pod = gateway["metadata"]["name"]
    root = [m.split() for m in _read(pod, "/proc/1/mounts").splitlines() if m.split()[1] == "/"]
    assert root and "ro" in root[-1][3].split(","), root
    # /tmp is mode 1777 in the image, so uid 101 may write there unless the mount forbids it.
    for path in ("/tmp/probe", "/probe", "/etc/envoy/probe"):
        code, out = _exec(pod, "sh", "-c", f"echo x > {path}")
        assert code != 0 and "Read-only file system" in out, (path, out)


def _dry_run_pod(pod: dict[str, Any]) -> tuple[int, str]:
    """A server-side dry run of creating ``pod`` in the gateway namespace, as the admin: only
    admission (Pod Security among it) can refuse it. (exit code, output)."""
    res = subprocess.run(
        ["kubectl", "create", "--dry-run=server", "-n", GATEWAY_NS, "-o", "name", "-f", "-"],
        input=json.dumps(pod), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return res.returncode, res.stdout + res.stderr


def _pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_the_namespace_admits_gateway_and_exporter_pods(
    admin: Kube, gateway: dict[str, Any]
) -> None:
    name = gateway["metadata"]["labels"][c.LABEL_GATEWAY]
    deployment = admin.get(DEPLOYMENT, name, GATEWAY_NS)
    assert deployment is not None
    code, out = _dry_run_pod(_pod(f"{name}-copy", deployment["spec"]["template"]["spec"]))
    assert code == 0 and "Warning" not in out, out
    [exporter] = [o for o in kustomize(EXPORTER) if o["kind"] == "Deployment"]
    spec = exporter["spec"]["template"]["spec"]
    code, out = _dry_run_pod(_pod(f"exporter-{uuid.uuid4().hex[:8]}", spec))
    assert code == 0 and "Warning" not in out, out


@pytest.mark.parametrize(
    ("what", "security"),
    [
        ("privileged", {"privileged": True}),
        ("a capability", {"capabilities": {"add": ["NET_ADMIN"]}}),
        ("root", {}),
    ],
)
def test_the_namespace_refuses_privileged_pods(
    dev_stack: DevStack, what: str, security: dict[str, Any]
) -> None:
    spec = {
        "containers": [
            {
                "name": "c",
                "image": "egress-dev.local/pause:1",
                "securityContext": security,
                "resources": {"limits": {"cpu": "10m", "memory": "16Mi"}},
            }
        ],
    }
    code, out = _dry_run_pod(_pod(f"bad-{uuid.uuid4().hex[:8]}", spec))
    assert code != 0, f"{what}: admitted: {out}"
    assert f'violates PodSecurity "{POD_SECURITY_LEVEL}:latest"' in out, (what, out)


def test_the_live_gateway_pod_is_what_was_rendered(gateway: dict[str, Any]) -> None:
    """The API server kept every hardening field (nothing was defaulted away)."""
    spec = gateway["spec"]
    assert spec["enableServiceLinks"] is False
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (c.GATEWAY_UID, c.GATEWAY_GID)
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["sysctls"] == [
        {"name": c.SYSCTL_UNPRIVILEGED_PORT_START, "value": str(LOW_UDP)}
    ]
    (container,) = spec["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
