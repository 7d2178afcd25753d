"""`egressctl access --all` predicts what the real node enforces, pair by pair.

Why: the audit is a NetworkPolicy evaluator of our own; only packets can say it agrees with the
enforcer (kube-router on the dev node). Eight client workloads of five kinds, in a namespace with
the README's default-deny egress policy, one without any policy, and one whose default-deny
forgets the gateway namespace, are granted by each form (or not, or to another gateway); three
gateways declare TCP 8443, one also UDP 8053. From every workload we connect to every gateway's
Service on the declared ports and on ports it does not declare, and to the destination's own
address (a bypass), and require the audit, run as the read-only auditor identity, to have
predicted each observed allow and deny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core import constants as c
from core.kube import SERVICE, Kube, api_client_from_kubeconfig
from reconcile.app import build_reconciler
from tests.conftest import DevStack
from tests.integration.helpers import (
    GATEWAY_NS,
    create_es,
    dev_settings,
    eventually,
    external_service,
    kubectl,
    purge,
    serve_offline_name,
    set_pods_ready,
    sh,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DENY = REPO / "infra" / "examples" / "default-deny-egress"
TCP, UDP = "TCP", "UDP"
UNDECLARED_TCP = 9443
SMALL = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}
# kube-router programs a new pod's policies within seconds; the matrix must settle to the
# prediction within this.
ENFORCEMENT_DEADLINE_S = 120.0


@dataclass(frozen=True)
class Workload:
    namespace: str
    kind: str
    name: str
    labels: dict[str, str] = field(compare=False, hash=False)

    def pod_selector(self) -> str:
        return f"workload={self.name}"


@dataclass(frozen=True)
class Probe:
    workload: Workload
    gateway: str  # "" for the destination's own address
    port: int
    protocol: str


def _template(name: str, labels: dict[str, str], image: str, restart: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"workload": name, **labels}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": restart,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"],
                    "resources": {"requests": {"cpu": "5m", "memory": "8Mi"}},
                }
            ],
        },
    }


def _manifest(w: Workload, image: str) -> dict[str, Any]:
    selector = {"matchLabels": {"workload": w.name}}
    always = _template(w.name, w.labels, image, "Always")
    if w.kind == "Pod":
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": w.name, **always["metadata"]},
            "spec": always["spec"],
        }
    meta = {"name": w.name, "namespace": w.namespace}
    if w.kind == "Deployment":
        spec: dict[str, Any] = {"replicas": 1, "selector": selector, "template": always}
        return {"apiVersion": "apps/v1", "kind": w.kind, "metadata": meta, "spec": spec}
    if w.kind == "StatefulSet":
        spec = {"replicas": 1, "serviceName": w.name, "selector": selector, "template": always}
        return {"apiVersion": "apps/v1", "kind": w.kind, "metadata": meta, "spec": spec}
    if w.kind == "DaemonSet":
        return {
            "apiVersion": "apps/v1",
            "kind": w.kind,
            "metadata": meta,
            "spec": {"selector": selector, "template": always},
        }
    if w.kind == "CronJob":
        job = {"template": _template(w.name, w.labels, image, "Never"), "backoffLimit": 0}
        return {
            "apiVersion": "batch/v1",
            "kind": w.kind,
            "metadata": meta,
            "spec": {"schedule": "0 0 1 1 *", "suspend": True, "jobTemplate": {"spec": job}},
        }
    raise AssertionError(w.kind)


def _apply(namespace: str, obj: dict[str, Any]) -> None:
    res = subprocess.run(
        ["kubectl", "apply", "-n", namespace, "-f", "-"],
        input=json.dumps(obj), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def _running_pod(w: Workload) -> str:
    res = kubectl(
        "get", "pods", "-n", w.namespace, "-l", w.pod_selector(), "-o",
        "jsonpath={range .items[?(@.status.phase=='Running')]}{.metadata.name}{'\\n'}{end}",
    )  # fmt: skip
    names = res.stdout.split()
    return names[0] if names else ""


@pytest.fixture(scope="module")
def world(dev_stack: DevStack) -> Iterator[tuple[list[str], list[Workload], dict[str, str]]]:
    """Three gateways, three namespaces, eight workloads; yields (gateways, workloads, the
    gateways' ClusterIPs)."""
    env = dev_stack.env
    admin = Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))
    reconciler = build_reconciler(
        Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler"))),
        dev_settings(delete_grace_s=0),
    )
    u = uuid.uuid4().hex[:6]
    gateways = [f"ae1-{u}", f"ae2-{u}", f"ae3-{u}"]
    deny, open_, broken = f"ae-deny-{u}", f"ae-open-{u}", f"ae-broken-{u}"
    grant = c.GRANT_LABEL_PREFIX
    g1, g2, g3 = gateways
    workloads = [
        Workload(deny, "Deployment", "label-form", {grant + g1: "true"}),
        Workload(deny, "StatefulSet", "gateway-form", {c.GRANT_LABEL_GATEWAY: g1}),
        Workload(deny, "Pod", "ungranted", {}),
        Workload(deny, "CronJob", "other-gateway", {grant + g2: "true"}),
        Workload(deny, "DaemonSet", "two-grants", {grant + g1: "true", grant + g3: "true"}),
        Workload(open_, "Deployment", "open-granted", {grant + g1: "true"}),
        Workload(open_, "Pod", "open-ungranted", {}),
        Workload(broken, "Deployment", "forgotten", {grant + g1: "true"}),
    ]
    try:
        for index, name in enumerate(gateways):
            ports: list[dict[str, Any]] = [{"port": int(env["EGRESS_DEV_UPSTREAM_TCP_PORT"])}]
            if index == 0:
                ports.append({"port": int(env["EGRESS_DEV_UPSTREAM_UDP_PORT"]), "protocol": UDP})
            dns_name = serve_offline_name(env, f"{name}.offline.test")
            create_es(
                admin,
                external_service(
                    name, dnsName=dns_name, ports=ports, minReplicas=1, resources=SMALL
                ),
            )
            reconciler.reconcile(name)
        for ns in (deny, open_, broken):
            assert kubectl("create", "namespace", ns).returncode == 0
        res = kubectl("apply", "-n", deny, "-k", str(DEFAULT_DENY))
        assert res.returncode == 0, res.stderr
        # A default-deny that forgets the gateway namespace: DNS only.
        _apply(
            broken,
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "dns-only-egress"},
                "spec": {
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"protocol": UDP, "port": 53}]}],
                },
            },
        )
        image = env["EGRESS_DEV_CLIENT_IMAGE"]
        for w in workloads:
            _apply(w.namespace, _manifest(w, image))
            if w.kind == "CronJob":
                res = kubectl("create", "job", "-n", w.namespace, f"{w.name}-manual",
                              f"--from=cronjob/{w.name}")  # fmt: skip
                assert res.returncode == 0, res.stderr
        for name in gateways:
            set_pods_ready(admin, name, True)
        for w in workloads:
            eventually(lambda w=w: _running_pod(w), 120, f"a running pod of {w.kind}/{w.name}")
        ips = {}
        for name in gateways:
            svc = admin.get(SERVICE, name, GATEWAY_NS)
            assert svc is not None
            ips[name] = str(svc["spec"]["clusterIP"])
        yield gateways, workloads, ips
    finally:
        for ns in (deny, open_, broken):
            kubectl("delete", "namespace", ns, "--wait=false")
        for name in gateways:
            purge(admin, name)


def _probes(gateways: list[str], workloads: list[Workload], env: dict[str, str]) -> list[Probe]:
    tcp, udp = int(env["EGRESS_DEV_UPSTREAM_TCP_PORT"]), int(env["EGRESS_DEV_UPSTREAM_UDP_PORT"])
    out = []
    for w in workloads:
        for gw in gateways:
            out += [
                Probe(w, gw, tcp, TCP),
                Probe(w, gw, UNDECLARED_TCP, TCP),
                Probe(w, gw, udp, UDP),
            ]
        out.append(Probe(w, "", tcp, TCP))
    return out


def _observe(probes: list[Probe], ips: dict[str, str], env: dict[str, str]) -> dict[Probe, bool]:
    """Every probe of a workload at once, from one of its pods: True when the offline
    internet's test service answered."""
    observed: dict[Probe, bool] = {}
    by_workload: dict[Workload, list[Probe]] = {}
    for probe in probes:
        by_workload.setdefault(probe.workload, []).append(probe)
    for w, mine in by_workload.items():
        lines = []
        for i, p in enumerate(mine):
            host = ips[p.gateway] if p.gateway else env["EGRESS_DEV_UPSTREAM_IP"]
            nc = "nc -w 3" if p.protocol == TCP else "nc -u -w 2"
            lines.append(f'( echo "P{i} $(echo hi | {nc} {host} {p.port} 2>&1)" ) &')
        pod = _running_pod(w)
        res = sh(w.namespace, pod, "\n".join([*lines, "wait"]), timeout=30)
        replies = {
            int(line.split(" ", 1)[0][1:]): line
            for line in res.stdout.splitlines()
            if line[:1] == "P"
        }
        for i, p in enumerate(mine):
            observed[p] = "upstream" in replies.get(i, "")
    return observed


def _predict(dev_stack: DevStack) -> dict[str, Any]:
    """`egressctl access --all --json`, as the read-only auditor."""
    env = {**os.environ, "KUBECONFIG": dev_stack.identity_kubeconfig("egress-auditor")}
    res = subprocess.run(
        [sys.executable, "-m", "egressctl", "access", "--all", "--json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode in (0, 3), res.stderr
    loaded: dict[str, Any] = json.loads(res.stdout)
    return loaded


def _predicted(report: dict[str, Any], probe: Probe) -> bool:
    """What the audit says of one probe: rows exist for granted workloads only; a workload's
    own entry says whether its egress reaches public addresses."""
    w = probe.workload
    key = (w.namespace, w.kind, w.name)
    (entry,) = [e for e in report["workloads"] if (e["namespace"], e["kind"], e["name"]) == key]
    rows = [r for r in report["rows"] if (r["namespace"], r["kind"], r["name"]) == key]
    if not probe.gateway:
        on_port = [bool(r["direct"]) for r in rows if r["port"] == probe.port]
        return any(on_port) if on_port else bool(entry["direct_egress"])
    return any(
        bool(r["reachable"])
        for r in rows
        if (r["external_service"], r["port"], r["protocol"])
        == (probe.gateway, probe.port, probe.protocol)
    )


def test_the_audit_predicts_every_allow_and_deny_the_node_enforces(
    dev_stack: DevStack, world: tuple[list[str], list[Workload], dict[str, str]]
) -> None:
    gateways, workloads, ips = world
    probes = _probes(gateways, workloads, dev_stack.env)
    assert len(workloads) >= 6 and len(gateways) >= 3
    report = _predict(dev_stack)
    predicted = {p: _predicted(report, p) for p in probes}
    # The prediction is not trivial: both answers occur, for each kind of probe.
    assert {predicted[p] for p in probes if p.gateway and p.port != UNDECLARED_TCP} == {True, False}
    assert {predicted[p] for p in probes if not p.gateway} == {True, False}
    mismatches: list[str] = []

    def agree() -> bool:
        observed = _observe(probes, ips, dev_stack.env)
        mismatches[:] = [
            f"{p.workload.namespace}/{p.workload.kind}/{p.workload.name} -> "
            f"{p.gateway or 'destination'}:{p.port}/{p.protocol}: "
            f"predicted {'allow' if predicted[p] else 'deny'}, "
            f"observed {'allow' if observed[p] else 'deny'}"
            for p in probes
            if observed[p] != predicted[p]
        ]
        return not mismatches

    try:
        eventually(agree, ENFORCEMENT_DEADLINE_S, "the node to enforce what the audit predicts")
    except AssertionError:
        pytest.fail("audit and enforcement disagree:\n" + "\n".join(mismatches))
    allowed = sum(predicted.values())
    print(f"{len(probes)} probes agree: {allowed} allowed, {len(probes) - allowed} denied")
