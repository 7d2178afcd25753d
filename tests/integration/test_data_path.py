"""The product's promise with real packets on the dev node: from a namespace with the README's
default-deny egress policy, only a granted pod reaches a declared destination, by its real
name, through its gateway, and only on the declared ports.

Why: every other test proves objects and answers; this one proves what a client pod actually
receives. The offline internet's test services say who their peer was, so "through the
gateway" is checked, not assumed.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core import constants as c
from core.kube import CONFIGMAP, SERVICE, Kube
from reconcile.app import build_reconciler
from reconcile.controller import Reconciler
from tests.conftest import DevStack
from tests.integration.helpers import (
    GATEWAY_NS,
    await_dns,
    create_es,
    dev_settings,
    eventually,
    external_service,
    gateway_pods,
    no_room_for_new_pods,
    purge,
    run_pod,
    serve_offline_name,
    set_pods_ready,
    sh,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DENY = REPO / "infra" / "examples" / "default-deny-egress"
POLICY_DEADLINE_S = 60.0


@dataclass(frozen=True)
class Gateway:
    name: str
    dns_name: str
    cluster_ip: str
    pod_ips: frozenset[str]


@pytest.fixture(scope="module")
def reconciler(dev_stack: DevStack) -> Reconciler:
    from core.kube import api_client_from_kubeconfig

    kube = Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler")))
    return build_reconciler(
        kube,
        dev_settings(delete_grace_s=0, coredns_import_path=dev_stack.env["COREDNS_IMPORT_PATH"]),
    )


def make_gateway(admin: Kube, reconciler: Reconciler, env: dict[str, str], name: str) -> Gateway:
    """A hijacking gateway for a name only the offline internet answers (its test service)."""
    dns_name = serve_offline_name(env, f"{name}.offline.test")
    ports = [
        {"port": int(env["EGRESS_DEV_UPSTREAM_TCP_PORT"])},
        {"port": int(env["EGRESS_DEV_UPSTREAM_UDP_PORT"]), "protocol": "UDP"},
    ]
    create_es(admin, external_service(name, dnsName=dns_name, hijackDns=True, ports=ports))
    reconciler.reconcile(name)
    set_pods_ready(admin, name, True)
    assert reconciler.reconcile(name).hijack_state == "true"
    service = admin.get(SERVICE, name, GATEWAY_NS)
    assert service is not None
    pods = frozenset(p["status"]["podIP"] for p in gateway_pods(admin, name))
    return Gateway(name, dns_name, service["spec"]["clusterIP"], pods)


@pytest.fixture(scope="module")
def gateways(dev_stack: DevStack, reconciler: Reconciler) -> Iterator[tuple[Gateway, Gateway]]:
    from core.kube import api_client_from_kubeconfig

    admin = Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))
    suffix = uuid.uuid4().hex[:6]
    names = [f"dp-a-{suffix}", f"dp-b-{suffix}"]
    try:
        yield (
            make_gateway(admin, reconciler, dev_stack.env, names[0]),
            make_gateway(admin, reconciler, dev_stack.env, names[1]),
        )
    finally:
        for name in names:
            purge(admin, name)
        assert reconciler.dns is not None
        reconciler.dns.sync(reconciler.kube)


@pytest.fixture(scope="module")
def clients(
    k8s: Any, dev_stack: DevStack, gateways: tuple[Gateway, Gateway]
) -> Iterator[dict[str, dict[str, Any]]]:
    """Client pods in a namespace with the README's default-deny egress policy."""
    from kubernetes import client

    a, _ = gateways
    core = client.CoreV1Api(k8s)
    ns = f"dp-{a.name.rsplit('-', 1)[1]}"
    core.create_namespace({"metadata": {"name": ns}})
    res = subprocess.run(
        ["kubectl", "apply", "-n", ns, "-k", str(DEFAULT_DENY)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    image = dev_stack.env["EGRESS_DEV_CLIENT_IMAGE"]
    labels = {
        "granted": {c.GRANT_LABEL_PREFIX + a.name: "true"},
        "granted-old-label": {c.GRANT_LABEL_GATEWAY: a.name},
        "stranger": {"role": "none"},
    }
    try:
        yield {
            name: {**run_pod(k8s, ns, name, image, ["sleep", "3600"], labels=lbl), "ns": ns}
            for name, lbl in labels.items()
        }
    finally:
        core.delete_namespace(ns)


def tcp(pod: dict[str, Any], host: str, port: int | str) -> str:
    return sh(pod["ns"], pod["metadata"]["name"], f"echo hi | nc -w 3 {host} {port}").stdout


def udp(pod: dict[str, Any], host: str, port: int | str) -> str:
    return sh(pod["ns"], pod["metadata"]["name"], f"echo hi | nc -u -w 2 {host} {port}").stdout


def peer(reply: str) -> str | None:
    for word in reply.split():
        if word.startswith("peer="):
            return word.removeprefix("peer=").rsplit(":", 1)[0]
    return None


def answered(reply: str) -> str | None:
    """The reply if the offline internet's test service sent it."""
    return reply if peer(reply) else None


def resolves_to_gateway(pod: dict[str, Any], gw: Gateway) -> bool:
    out = sh(pod["ns"], pod["metadata"]["name"], f"nslookup {gw.dns_name}").stdout
    return gw.cluster_ip in out


def test_granted_pod_reaches_the_upstream_by_name_through_its_gateway(
    admin: Kube,
    dev_stack: DevStack,
    gateways: tuple[Gateway, Gateway],
    clients: dict[str, dict[str, Any]],
) -> None:
    a, _ = gateways
    env = dev_stack.env
    for name in ("granted", "granted-old-label"):
        pod = clients[name]
        await_dns(lambda pod=pod: resolves_to_gateway(pod, a), admin, "the hijacked name")
        # A new pod's policies and a new gateway's first upstream lookup take effect within
        # seconds, not at once: the first answer is awaited, then must come from the gateway.
        for send, protocol in ((tcp, "TCP"), (udp, "UDP")):
            port = env[f"EGRESS_DEV_UPSTREAM_{protocol}_PORT"]
            reply = eventually(
                lambda pod=pod, send=send, port=port: answered(send(pod, a.dns_name, port)),
                POLICY_DEADLINE_S,
                f"{name}: a {protocol} answer by name",
            )
            assert peer(reply) in a.pod_ips, (
                f"{name}: {protocol} not through the gateway: {reply!r}"
            )


def test_nothing_else_gets_through(
    admin: Kube,
    dev_stack: DevStack,
    gateways: tuple[Gateway, Gateway],
    clients: dict[str, dict[str, Any]],
) -> None:
    a, b = gateways
    env = dev_stack.env
    tcp_port, udp_port = env["EGRESS_DEV_UPSTREAM_TCP_PORT"], env["EGRESS_DEV_UPSTREAM_UDP_PORT"]
    granted, stranger = clients["granted"], clients["stranger"]
    await_dns(lambda: resolves_to_gateway(stranger, a), admin, "the hijacked name")
    await_dns(lambda: resolves_to_gateway(granted, b), admin, "the second hijacked name")
    # No grant: the gateway's NetworkPolicy refuses, by name or by ClusterIP.
    assert "upstream" not in tcp(stranger, a.dns_name, tcp_port)
    assert "upstream" not in tcp(stranger, a.cluster_ip, tcp_port)
    assert "upstream" not in udp(stranger, a.dns_name, udp_port)
    # Default-deny egress: nobody reaches the upstream's own address.
    for pod in (granted, stranger):
        assert "upstream" not in tcp(pod, env["EGRESS_DEV_UPSTREAM_IP"], tcp_port)
        assert "upstream" not in udp(pod, env["EGRESS_DEV_UPSTREAM_IP"], udp_port)
    # A grant for gateway A is no grant for gateway B.
    assert "upstream" not in tcp(granted, b.dns_name, tcp_port)
    # Undeclared ports: not on the Service, and refused on the gateway pod itself (admin port).
    admin_port = 11000
    out = sh(granted["ns"], "granted", f"nc -z -w 2 {a.cluster_ip} 9999; echo rc=$?").stdout
    assert "rc=1" in out
    for ip in a.pod_ips:
        out = sh(granted["ns"], "granted", f"nc -z -w 2 {ip} {admin_port}; echo rc=$?").stdout
        assert "rc=1" in out, f"the gateway's admin port is reachable: {out}"
    # ... while the declared port on the pod itself is open to the granted pod.
    for ip in a.pod_ips:
        assert peer(tcp(granted, ip, tcp_port)) == ip


def rules(admin: Kube) -> str:
    cm = admin.get(CONFIGMAP, "egress-gateway-dns", "kube-system") or {}
    return "".join((cm.get("data") or {}).values())


def test_client_sees_the_real_address_until_ready_then_the_gateway_for_good(
    k8s: Any, dev_stack: DevStack, reconciler: Reconciler, clients: dict[str, dict[str, Any]]
) -> None:
    """Hijack timing from a client pod: before a gateway pod is ready the name resolves to the
    upstream's real address; once ready, to the gateway's ClusterIP; a readiness blip of the
    gateway does not flip it back (the hijack state stays ``true``)."""
    from core.kube import api_client_from_kubeconfig

    env = dev_stack.env
    admin = Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))
    name = f"dp-t-{uuid.uuid4().hex[:6]}"
    dns_name = serve_offline_name(env, f"{name}.offline.test")
    pod = clients["granted"]

    def answer() -> str:
        return sh(pod["ns"], "granted", f"nslookup {dns_name}").stdout

    try:
        eventually(lambda: env["EGRESS_DEV_UPSTREAM_IP"] in answer(), 30, "the real address")
        with no_room_for_new_pods():  # the gateway's pod stays Pending: not ready
            create_es(admin, external_service(name, dnsName=dns_name, hijackDns=True))
            reconciler.reconcile(name)
            assert reconciler.reconcile(name).hijack_state == "waiting-for-pods"
            service = admin.get(SERVICE, name, GATEWAY_NS)
            assert service is not None
            cluster_ip = service["spec"]["clusterIP"]
            # Waiting: no rule, the client still gets the real address.
            assert dns_name not in rules(admin)
            for _ in range(3):
                out = answer()
                assert env["EGRESS_DEV_UPSTREAM_IP"] in out and cluster_ip not in out, out
        set_pods_ready(admin, name, True)
        assert reconciler.reconcile(name).hijack_state == "true"
        await_dns(lambda: cluster_ip in answer(), admin, "the gateway's ClusterIP")
        # A blip: the pod turns unready, the reconciler runs, the answer stays the gateway.
        set_pods_ready(admin, name, False)
        assert reconciler.reconcile(name).hijack_state == "true"
        assert dns_name in rules(admin), "the rule stays through the blip"
        for _ in range(5):
            out = answer()
            assert cluster_ip in out and env["EGRESS_DEV_UPSTREAM_IP"] not in out, out
    finally:
        purge(admin, name)
        assert reconciler.dns is not None
        reconciler.dns.sync(reconciler.kube)


def test_ip_override_serves_while_healthy_and_dns_takes_over_when_it_stops(
    k8s: Any, dev_stack: DevStack, reconciler: Reconciler, clients: dict[str, dict[str, Any]]
) -> None:
    """ipOverride endpoints are used while their TCP health checks pass; when the override
    stops answering, the gateway falls back to the DNS destination with no manual step."""
    from core.kube import api_client_from_kubeconfig

    env = dev_stack.env
    admin = Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))
    name = f"dp-o-{uuid.uuid4().hex[:6]}"
    real, override = env["EGRESS_DEV_UPSTREAM_IP"], env["EGRESS_DEV_UPSTREAM_ALT_IP"]
    tcp_port = env["EGRESS_DEV_UPSTREAM_TCP_PORT"]
    dns_name = serve_offline_name(env, f"{name}.offline.test", real)
    ns = clients["granted"]["ns"]
    pod = run_pod(
        k8s, ns, "override-client", env["EGRESS_DEV_CLIENT_IMAGE"], ["sleep", "3600"],
        labels={c.GRANT_LABEL_PREFIX + name: "true"},
    )  # fmt: skip
    pod["ns"] = ns
    inet = ["ip", "-n", env["EGRESS_DEV_INET_NETNS"], "addr"]
    spec = {"dnsName": dns_name, "hijackDns": True, "ipOverride": [override],
            "ports": [{"port": int(tcp_port)}]}  # fmt: skip
    try:
        create_es(admin, external_service(name, **spec))
        reconciler.reconcile(name)
        set_pods_ready(admin, name, True)
        assert reconciler.reconcile(name).hijack_state == "true"
        gateway_ips = {p["status"]["podIP"] for p in gateway_pods(admin, name)}

        def answered_at() -> str | None:
            reply = tcp(pod, dns_name, tcp_port)
            if peer(reply) not in gateway_ips:
                return None
            return next(w.removeprefix("at=") for w in reply.split() if w.startswith("at="))

        assert eventually(answered_at, 90, "an answer through the gateway") == override
        # The override stops answering (its address is gone from the offline internet).
        subprocess.run([*inet, "del", f"{override}/32", "dev", "lo"], check=True)
        eventually(lambda: answered_at() == real, 90, "the DNS destination to take over")
    finally:
        subprocess.run([*inet, "add", f"{override}/32", "dev", "lo"], check=False)
        purge(admin, name)
        assert reconciler.dns is not None
        reconciler.dns.sync(reconciler.kube)
