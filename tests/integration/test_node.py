"""The dev stack's node is a real node: pods are scheduled and run, `kubectl logs`, `exec` and
`port-forward` work, ClusterIPs route, cluster DNS is a pod, NetworkPolicy is enforced, and no
pod can reach anything but the stack's own addresses.

Why: every later promise about traffic (gateways, grants, DNS hijack) is proved on this node;
these tests prove the node itself first, with real packets between real pods.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DevStack
from tests.integration.helpers import eventually, kubectl, run_pod, sh

pytestmark = pytest.mark.cluster


@pytest.fixture
def client_image(dev_stack: DevStack) -> str:
    return dev_stack.env["EGRESS_DEV_CLIENT_IMAGE"]


@pytest.fixture
def server(k8s: Any, namespace: str, client_image: str) -> Iterator[dict[str, Any]]:
    """A pod answering TCP 8080 with a line naming itself (busybox nc as a server)."""
    pod = run_pod(
        k8s, namespace, "server", client_image,
        ["busybox", "nc", "-ll", "-p", "8080", "-e", "/bin/echo", "hello-from-server"],
        ports=[8080],
    )  # fmt: skip
    yield pod


def test_node_is_registered_ready_with_its_own_identity(k8s: Any, dev_stack: DevStack) -> None:
    from kubernetes import client

    node = client.CoreV1Api(k8s).read_node(dev_stack.env["EGRESS_DEV_NODE"])
    ready = {c.type: c.status for c in node.status.conditions}
    assert ready["Ready"] == "True"
    assert node.spec.pod_cidr == dev_stack.env["EGRESS_DEV_POD_CIDR"]
    internal = [a.address for a in node.status.addresses if a.type == "InternalIP"]
    assert internal and not internal[0].startswith("127."), internal
    # The kubelet registered itself: its client certificate is system:node:<name>.
    leases = client.CoordinationV1Api(k8s).read_namespaced_lease(
        dev_stack.env["EGRESS_DEV_NODE"], "kube-node-lease"
    )
    assert leases.spec.holder_identity == dev_stack.env["EGRESS_DEV_NODE"]


def test_pod_runs_and_logs_exec_and_port_forward_work(
    k8s: Any, namespace: str, client_image: str, server: dict[str, Any]
) -> None:
    pod = run_pod(
        k8s, namespace, "talker", client_image,
        ["sh", "-c", "echo started-$(hostname); exec sleep 3600"],
    )  # fmt: skip
    logs = eventually(
        lambda: "started-talker" in kubectl("logs", "-n", namespace, "talker").stdout,
        30, "kubectl logs to show the container's output",
    )  # fmt: skip
    assert logs
    out = sh(namespace, "talker", "cat /etc/resolv.conf; echo exit-$((6*7))")
    assert out.returncode == 0, out.stderr
    assert "exit-42" in out.stdout
    assert "nameserver " + dev_stack_dns(k8s) in out.stdout, "ClusterFirst pods use cluster DNS"
    assert pod["status"]["pod_ip"]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    forward = subprocess.Popen(
        ["kubectl", "port-forward", "-n", namespace, "pod/server", f"{local}:8080"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def through_forward() -> str | None:
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=2) as conn:
                    return conn.recv(100).decode() or None
            except OSError:
                return None

        assert "hello-from-server" in eventually(through_forward, 30, "port-forward to answer")
    finally:
        forward.terminate()
        forward.wait(10)


def dev_stack_dns(k8s: Any) -> str:
    from kubernetes import client

    svc = client.CoreV1Api(k8s).read_namespaced_service("kube-dns", "kube-system")
    return str(svc.spec.cluster_ip)


def test_cluster_ips_route_and_cluster_dns_is_a_pod(
    k8s: Any, namespace: str, client_image: str, server: dict[str, Any]
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    core.create_namespaced_service(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "server"},
            "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    run_pod(k8s, namespace, "client", client_image, ["sleep", "3600"])
    fqdn = f"server.{namespace}.svc.cluster.local"

    def via_service_name() -> str | None:
        out = sh(namespace, "client", f"nc -w 3 {fqdn} 80 </dev/null")
        return out.stdout if "hello-from-server" in out.stdout else None

    eventually(via_service_name, 60, "the Service's ClusterIP to route to the server pod")
    dns = core.list_namespaced_pod("kube-system", label_selector="k8s-app=kube-dns").items
    assert dns and all(p.status.phase == "Running" for p in dns), "cluster DNS runs as a pod"
    mounts = {m.mount_path for m in dns[0].spec.containers[0].volume_mounts}
    assert "/etc/coredns/egress-gateways" in mounts, "the rules ConfigMap is mounted as documented"


def test_network_policy_is_enforced(
    k8s: Any, namespace: str, client_image: str, server: dict[str, Any]
) -> None:
    from kubernetes import client

    ip = server["status"]["pod_ip"]
    run_pod(k8s, namespace, "granted", client_image, ["sleep", "3600"], labels={"role": "ok"})
    run_pod(k8s, namespace, "stranger", client_image, ["sleep", "3600"], labels={"role": "no"})
    probe = f"nc -w 2 {ip} 8080 </dev/null"
    assert "hello-from-server" in sh(namespace, "stranger", probe).stdout, "open before a policy"
    client.NetworkingV1Api(k8s).create_namespaced_network_policy(
        namespace,
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "only-ok"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "ok"}}}]}],
            },
        },
    )
    eventually(
        lambda: "hello-from-server" not in sh(namespace, "stranger", probe).stdout,
        60, "the policy to refuse the unlabelled pod",
    )  # fmt: skip
    for _ in range(3):  # refused every time, admitted every time
        assert "hello-from-server" not in sh(namespace, "stranger", probe).stdout
        assert "hello-from-server" in sh(namespace, "granted", probe).stdout


def test_offline_internet_answers_and_nothing_else_is_reachable(
    k8s: Any, namespace: str, client_image: str, dev_stack: DevStack
) -> None:
    env = dev_stack.env
    pod = run_pod(k8s, namespace, "probe", client_image, ["sleep", "3600"])
    name, tcp, udp = (
        env["EGRESS_DEV_UPSTREAM_NAME"],
        env["EGRESS_DEV_UPSTREAM_TCP_PORT"],
        env["EGRESS_DEV_UPSTREAM_UDP_PORT"],
    )
    out = sh(namespace, "probe", f"nslookup {name}")
    assert env["EGRESS_DEV_UPSTREAM_IP"] in out.stdout, out.stdout + out.stderr
    out = sh(namespace, "probe", f"echo hi | nc -w 3 {name} {tcp}")
    assert f"upstream tcp/{tcp} peer={pod['status']['pod_ip']}:" in out.stdout, out
    out = sh(namespace, "probe", f"echo hi | nc -u -w 2 {name} {udp}")
    assert f"upstream udp/{udp} peer={pod['status']['pod_ip']}:" in out.stdout, out
    # Names the offline internet does not serve do not exist; nothing is forwarded further.
    out = sh(namespace, "probe", "nslookup example.org; echo rc=$?")
    assert "rc=1" in out.stdout or "NXDOMAIN" in out.stdout, out.stdout
    # The machine's own resolver and any address outside the stack: no route from the node,
    # so the packet never leaves the node's namespace.
    resolvers = [
        line.split()[1]
        for line in Path("/etc/resolv.conf").read_text().splitlines()
        if line.startswith("nameserver") and len(line.split()) > 1
    ]
    for target in [*resolvers, "198.18.0.1"]:
        if ":" in target:
            continue
        out = sh(namespace, "probe", f"nc -z -w 2 {target} 53; echo rc=$?")
        assert "rc=1" in out.stdout, f"{target} reachable from a pod: {out.stdout}"
        route = subprocess.run(
            ["ip", "-n", env["EGRESS_DEV_NODE_NETNS"], "route", "get", target],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert route.returncode != 0 and "unreachable" in route.stderr, route


def test_the_machine_reaches_services_only_through_the_node(dev_stack: DevStack) -> None:
    """No route to pods or Services is added anywhere but the stack's own veth."""
    routes = subprocess.run(
        ["ip", "route", "show"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    ours = [r for r in routes if dev_stack.env["EGRESS_DEV_SERVICE_CIDR"] in r]
    assert ours and all("egdev" in r for r in ours), routes
