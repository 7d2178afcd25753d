"""Gateway logs are an interface, read back from what a real Envoy writes on the dev node.

People index the gateways' access logs, so they keep the original operator's shape: its 21
JSON field names for both the proxy and the admin log, and with ``omit_empty_values`` a value
Envoy does not have is left out of a JSON line (never ``null``) and printed as an empty string
in a text line (never ``-``). ipOverride health-check events are JSON lines on stdout too, and a
host that fails its checks loses its open connections. (Envoy before 1.40 prints ``null`` for
empty JSON values whatever the config says, envoyproxy/envoy#37941: the gateway image must be
1.40 or later.)

Why here and not only in the unit tests: the bootstrap says what Envoy is asked to do; only a
real Envoy shows what it writes. Each test sends real traffic from a granted client pod to a
gateway pod, reads the pod's log through the API (``pods/log``) and parses every line.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from core import constants as c
from core.kube import CONFIGMAP, Kube
from reconcile.app import build_reconciler
from reconcile.controller import Reconciler
from tests.conftest import DevStack
from tests.integration.helpers import (
    GATEWAY_NS,
    create_es,
    dev_settings,
    eventually,
    external_service,
    gateway_pods,
    kubectl,
    purge,
    run_pod,
    serve_offline_name,
    set_pods_ready,
    sh,
)
from tests.unit.test_envoy import log_formats

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]

# The original operator's JSON access-log fields (its issue lists them), spelled out here rather
# than imported so that this test pins the interface, not the code.
ORIGINAL_JSON_FIELDS = frozenset(
    {
        "authority", "bytes_received", "bytes_sent", "connection_termination_details",
        "downstream_local_address", "downstream_remote_address", "duration", "method", "path",
        "protocol", "requested_server_name", "response_code", "response_code_details",
        "response_flags", "start_time", "upstream_cluster", "upstream_host",
        "upstream_local_address", "upstream_service_time", "upstream_transport_failure_reason",
        "user_agent",
    }
)  # fmt: skip
# What Envoy always knows about a proxied TCP connection that reached an upstream host.
TCP_ALWAYS = frozenset(
    {
        "start_time", "bytes_received", "bytes_sent", "duration", "downstream_local_address",
        "downstream_remote_address", "upstream_cluster", "upstream_host",
        "upstream_local_address", "response_code", "response_flags",
    }
)  # fmt: skip
# HTTP-only fields: a TCP connection has no request, so they are left out of its lines.
HTTP_ONLY = frozenset({"method", "path", "protocol", "authority", "user_agent"})

# The original's text formats (SPEC §3), as regular expressions over one line.
CLUSTER_TEXT = re.compile(
    r"^\[(?P<start_time>[^\]]+)\] (?P<bytes_received>\d+) (?P<bytes_sent>\d+) "
    r'(?P<duration>\d+) "(?P<downstream_remote_address>[^"]*)" "(?P<upstream_host>[^"]*)" '
    r'"(?P<upstream_cluster>[^"]*)"$'
)
ADMIN_TEXT = re.compile(
    r'^\[(?P<start_time>[^\]]+)\] "(?P<method>\S*) (?P<path>\S*) (?P<protocol>\S*)" '
    r"(?P<response_code>\d+) (?P<response_flags>\S+) (?P<bytes_received>\d+) "
    r"(?P<bytes_sent>\d+) (?P<duration>\d+) (?P<upstream_service_time>\S*) "
    r'"(?P<x_forwarded_for>[^"]*)" "(?P<user_agent>[^"]*)" "(?P<request_id>[^"]*)" '
    r'"(?P<authority>[^"]*)" "(?P<upstream_host>[^"]*)"$'
)
# Envoy flushes its logs to stdout every 10 s (file_flush_interval_msec); a busy node is slower.
FLUSH_S = 60


def upstream_ports(env: dict[str, str]) -> tuple[int, int]:
    """The offline upstream's TCP and UDP ports (nothing listens on TCP + 1)."""
    return int(env["EGRESS_DEV_UPSTREAM_TCP_PORT"]), int(env["EGRESS_DEV_UPSTREAM_UDP_PORT"])


@dataclass(frozen=True)
class Gateway:
    name: str
    pod: str
    ip: str
    admin_port: int


@pytest.fixture(scope="module")
def reconciler(dev_stack: DevStack) -> Reconciler:
    from core.kube import api_client_from_kubeconfig

    kube = Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler")))
    return build_reconciler(
        kube,
        dev_settings(delete_grace_s=0, coredns_import_path=dev_stack.env["COREDNS_IMPORT_PATH"]),
    )


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    suffix = uuid.uuid4().hex[:6]
    return {role: f"gl-{role[0]}-{suffix}" for role in ("json", "text", "override")}


@pytest.fixture(scope="module")
def override_ip(dev_stack: DevStack) -> Iterator[str]:
    """An address of this module's own in the offline internet, served by its own instance of
    the test services: the override host. Its health checks can then be made to fail without
    touching the shared upstream addresses other tests use, and without breaking the
    connections already open (new connections are dropped, established ones flow)."""
    env = dev_stack.env
    netns = env["EGRESS_DEV_INET_NETNS"]
    base = ipaddress.ip_address(env["EGRESS_DEV_UPSTREAM_IP"]) - 10  # the offline /26
    ip = str(base + 20 + uuid.uuid4().int % 30)
    tcp_port, udp_port = upstream_ports(env)
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "egressctl.devstack.upstream",
         "--bind", ip, "--tcp", str(tcp_port), "--udp", str(udp_port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        listening = ["ip", "netns", "exec", netns, "ss", "-Hltn", f"src {ip}:{tcp_port}"]
        eventually(
            lambda: subprocess.run(listening, capture_output=True, text=True).stdout.strip(),
            30,
            "the private upstream to listen",
        )
        yield ip
    finally:
        server.terminate()
        server.wait(10)
        subprocess.run(["ip", "-n", netns, "addr", "del", f"{ip}/32", "dev", "lo"], check=False)


def only_pod(admin: Kube, name: str) -> dict[str, Any] | None:
    """The gateway's one running pod, once a rollout (if any) is over."""
    pods = [p for p in gateway_pods(admin, name) if p["status"].get("phase") == "Running"]
    return pods[0] if len(pods) == 1 else None


@pytest.fixture(scope="module")
def gateways(
    dev_stack: DevStack,
    reconciler: Reconciler,
    admin: Kube,
    names: dict[str, str],
    override_ip: str,
) -> Iterator[dict[str, Gateway]]:
    """Three one-pod gateways, started together:

    - ``json``: JSON proxy and admin logs; TCP to the offline upstream, a TCP port where the
      upstream refuses, and UDP;
    - ``text``: the text formats, for a name that does not resolve (so the proxy has no
      upstream host to print);
    - ``override``: ipOverride to ``override_ip``, TCP and UDP.
    """
    env = dev_stack.env
    tcp_port, udp_port = upstream_ports(env)
    specs: dict[str, dict[str, Any]] = {
        "json": {
            "dnsName": serve_offline_name(env, f"{names['json']}.offline.test"),
            "ports": [
                {"port": tcp_port},
                {"port": tcp_port + 1},
                {"port": udp_port, "protocol": "UDP"},
            ],
            "envoyJsonAdminAccessLogs": True,
            "envoyJsonClusterAccessLogs": True,
        },
        "text": {
            "dnsName": f"{names['text']}.offline.test",  # NXDOMAIN: the offline DNS knows it not
            "ports": [{"port": tcp_port}],
        },
        "override": {
            "dnsName": serve_offline_name(env, f"{names['override']}.offline.test"),
            "ipOverride": [override_ip],
            "ports": [{"port": tcp_port}, {"port": udp_port, "protocol": "UDP"}],
            "envoyJsonClusterAccessLogs": True,
        },
    }
    try:
        for role, spec in specs.items():
            create_es(admin, external_service(names[role], **spec))
            reconciler.reconcile(names[role])
        out = {}
        for role in specs:
            set_pods_ready(admin, names[role], True)

            def one_pod(name: str = names[role]) -> dict[str, Any] | None:
                return only_pod(admin, name)

            pod = eventually(one_pod, 120, f"{names[role]} to have one running pod")
            out[role] = Gateway(
                names[role],
                pod["metadata"]["name"],
                pod["status"]["podIP"],
                int(pod["metadata"]["annotations"][c.ANNOTATION_ADMIN_PORT]),
            )
        yield out
    finally:
        for name in names.values():
            purge(admin, name)


@pytest.fixture(scope="module")
def client(
    k8s: Any, dev_stack: DevStack, names: dict[str, str], gateways: dict[str, Gateway]
) -> Iterator[dict[str, Any]]:
    """A client pod granted every gateway of this module."""
    from kubernetes import client as k8s_client

    core = k8s_client.CoreV1Api(k8s)
    ns = f"gl-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    labels = {c.grant_label(name): c.GRANT_LABEL_VALUE for name in names.values()}
    try:
        pod = run_pod(
            k8s, ns, "client", dev_stack.env["EGRESS_DEV_CLIENT_IMAGE"], ["sleep", "3600"],
            labels=labels,
        )  # fmt: skip
        pod["ns"] = ns
        # The NetworkPolicy enforcer admits a new pod within seconds (longer on a busy node).
        tcp_port, _ = upstream_ports(dev_stack.env)
        for role in ("json", "override"):
            ip = gateways[role].ip

            def admitted(ip: str = ip) -> bool:
                return "upstream tcp/" in send_tcp(pod, ip, tcp_port)

            eventually(admitted, 90, f"the client's grant to the {role} gateway to be enforced")
        yield pod
    finally:
        core.delete_namespace(ns)


def send_tcp(pod: dict[str, Any], ip: str, port: int) -> str:
    return sh(pod["ns"], "client", f"echo hi | nc -w 3 {ip} {port}").stdout


def send_udp(pod: dict[str, Any], ip: str, port: int) -> str:
    return sh(pod["ns"], "client", f"echo hi | nc -u -w 2 {ip} {port}").stdout


def dialled(reply: str) -> str | None:
    """The address the upstream was dialled at (``at=``), from its reply line."""
    return next((w.removeprefix("at=") for w in reply.split() if w.startswith("at=")), None)


def pod_log(k8s: Any, gw: Gateway) -> list[str]:
    """The gateway container's log, through the API server's pods/log."""
    from kubernetes import client as k8s_client

    text = k8s_client.CoreV1Api(k8s).read_namespaced_pod_log(
        gw.pod, GATEWAY_NS, container=c.CONTAINER_NAME
    )
    return str(text).splitlines()


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Every JSON object line (access logs and health-check events; Envoy's own log lines
    start with ``[``). A line that looks like JSON but does not parse fails the test."""
    return [json.loads(line) for line in lines if line.startswith("{")]


def access_lines(k8s: Any, gw: Gateway, port: int) -> list[dict[str, Any]]:
    return [
        d
        for d in json_lines(pod_log(k8s, gw))
        if "start_time" in d and str(d.get("downstream_local_address", "")).endswith(f":{port}")
    ]


def assert_original_shape(line: dict[str, Any]) -> None:
    """Only the original's field names, and no empty value: omitted, never null or ""."""
    assert set(line) <= ORIGINAL_JSON_FIELDS, sorted(set(line) - ORIGINAL_JSON_FIELDS)
    empty = sorted(k for k, v in line.items() if v is None or v == "")
    assert not empty, f"empty values {empty} in {line}"


def live_bootstrap(admin: Kube, name: str) -> dict[str, Any]:
    cm = admin.get(CONFIGMAP, name, GATEWAY_NS)
    assert cm is not None
    loaded: dict[str, Any] = yaml.safe_load(cm["data"][c.CONFIGMAP_KEY])
    return loaded


def test_json_logs_have_the_original_fields_and_omit_empty_values(
    k8s: Any,
    dev_stack: DevStack,
    admin: Kube,
    gateways: dict[str, Gateway],
    client: dict[str, Any],
) -> None:
    gw = gateways["json"]
    env = dev_stack.env
    tcp_port, udp_port = upstream_ports(env)
    # The configured formats: exactly the original's 21 fields, empty values omitted.
    config = live_bootstrap(admin, gw.name)
    formats = log_formats(config)
    assert len(formats) == 4
    for log_format in formats:
        assert set(log_format["json_format"]) == ORIGINAL_JSON_FIELDS
        assert log_format["omit_empty_values"] is True

    # Real traffic: a TCP request answered by the upstream, one refused by it, and UDP.
    assert "upstream tcp/" in send_tcp(client, gw.ip, tcp_port)
    send_tcp(client, gw.ip, tcp_port + 1)
    assert "upstream udp/" in send_udp(client, gw.ip, udp_port)

    ok = eventually(lambda: access_lines(k8s, gw, tcp_port), FLUSH_S, "the TCP access log line")
    refused = eventually(
        lambda: access_lines(k8s, gw, tcp_port + 1), FLUSH_S, "the refused TCP line"
    )
    probes = eventually(
        lambda: [
            d
            for d in access_lines(k8s, gw, gw.admin_port)
            if str(d.get("user_agent", "")).startswith("kube-probe/")
        ],
        FLUSH_S,
        "the kubelet's readiness probes in the admin log",
    )
    for line in ok + refused + probes:
        assert_original_shape(line)

    line = ok[-1]
    assert set(line) >= TCP_ALWAYS, sorted(TCP_ALWAYS - set(line))
    assert not HTTP_ONLY & set(line), "a TCP connection has no HTTP request"
    assert line["response_code"] == 0  # Envoy's value for a connection without HTTP
    assert line["upstream_cluster"] == f"{gw.name}_TCP_{tcp_port}"
    assert line["upstream_host"] == f"{env['EGRESS_DEV_UPSTREAM_IP']}:{tcp_port}"
    assert line["bytes_received"] == 3 and line["bytes_sent"] > 0  # "hi\n" and the reply

    (line,) = refused
    assert "UF" in line["response_flags"], line  # upstream connection failure
    assert line["upstream_transport_failure_reason"], line  # the reason is no longer lost

    line = probes[-1]
    assert {"method", "path", "protocol", "response_code", "authority", "user_agent"} <= set(line)
    assert (line["method"], line["path"], line["response_code"]) == ("GET", "/ready", 200)
    assert not {"upstream_host", "upstream_cluster"} & set(line), "admin has no upstream"


def test_text_logs_print_empty_values_as_empty_strings(
    k8s: Any,
    dev_stack: DevStack,
    gateways: dict[str, Gateway],
    client: dict[str, Any],
) -> None:
    gw = gateways["text"]
    tcp_port = int(dev_stack.env["EGRESS_DEV_UPSTREAM_TCP_PORT"])

    def parsed() -> tuple[list[dict[str, str]], list[dict[str, str]]] | None:
        # The name does not resolve: Envoy has no upstream host and closes the connection.
        assert "upstream" not in send_tcp(client, gw.ip, tcp_port)
        lines = pod_log(k8s, gw)
        proxy = [m.groupdict() for m in map(CLUSTER_TEXT.match, lines) if m]
        probes = [
            m.groupdict()
            for m in map(ADMIN_TEXT.match, lines)
            if m and m["user_agent"].startswith("kube-probe/")
        ]
        return (proxy, probes) if proxy and probes else None

    proxy, probes = eventually(parsed, FLUSH_S, "a proxy line and a probe line")
    for line in proxy + probes:
        dashes = sorted(k for k, v in line.items() if v == "-" and k != "response_flags")
        assert not dashes, f"'-' for an empty value in {dashes}: {line}"
    line = proxy[-1]
    assert line["upstream_host"] == "", line  # no host: "" as in the original, not "-"
    assert line["upstream_cluster"] == f"{gw.name}_TCP_{tcp_port}"
    assert line["downstream_remote_address"].startswith(client["status"]["pod_ip"] + ":")
    line = probes[-1]
    assert (line["method"], line["path"], line["response_code"]) == ("GET", "/ready", "200")
    # No upstream behind the admin listener, no request id: empty, not "-".
    assert line["upstream_service_time"] == line["request_id"] == line["upstream_host"] == ""


def health_events(k8s: Any, gw: Gateway) -> list[dict[str, Any]]:
    return [d for d in json_lines(pod_log(k8s, gw)) if "health_checker_type" in d]


def test_ip_override_udp_uses_the_override_and_health_events_reach_stdout(
    k8s: Any,
    dev_stack: DevStack,
    gateways: dict[str, Gateway],
    client: dict[str, Any],
    override_ip: str,
) -> None:
    """UDP ports follow ipOverride too (through the aggregate cluster; the original ignored the
    override for UDP), and the override cluster's health-check events are JSON lines on the
    gateway's stdout."""
    gw = gateways["override"]
    alt = override_ip
    tcp_port, udp_port = upstream_ports(dev_stack.env)
    assert dialled(send_tcp(client, gw.ip, tcp_port)) == alt
    for _ in range(3):
        assert dialled(send_udp(client, gw.ip, udp_port)) == alt
    events = eventually(lambda: health_events(k8s, gw), FLUSH_S, "a health-check event")
    event = events[0]
    assert event["health_checker_type"] == "TCP"
    assert event["cluster_name"] == f"{gw.name}_TCP_{tcp_port}-override"
    assert event["host"]["socket_address"]["address"] == alt


def envoy_time(stamp: str) -> float:
    """Seconds since the epoch of an Envoy timestamp (``2026-01-02T03:04:05.678Z``)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_host_failing_health_checks_loses_its_connections(
    k8s: Any,
    dev_stack: DevStack,
    gateways: dict[str, Gateway],
    client: dict[str, Any],
    override_ip: str,
) -> None:
    """close_connections_on_host_health_failure: a connection through the override host is
    closed by Envoy the moment that host is ejected for failing its checks, and new
    connections go to the DNS destination.

    The override host stops accepting connections (its SYNs are dropped) while the open one
    keeps flowing: a line each way every second. Nothing but Envoy's reaction to the failed
    checks ends it. Its access-log line says when it ended, the ejection event when the host
    was ejected: the two must coincide.
    """
    gw = gateways["override"]
    env = dev_stack.env
    real = env["EGRESS_DEV_UPSTREAM_IP"]
    tcp_port, _ = upstream_ports(env)
    ns, log = client["ns"], f"/tmp/long-{uuid.uuid4().hex[:6]}"
    script = (
        f"( ( while :; do echo hi; sleep 1; done | nc {gw.ip} {tcp_port} > {log} 2>&1; "
        f"echo closed >> {log} ) < /dev/null > /dev/null 2>&1 & )"
    )
    started = time.time()
    assert kubectl("exec", "-n", ns, "client", "--", "sh", "-c", script).returncode == 0

    def replies() -> list[str]:
        out = kubectl("exec", "-n", ns, "client", "--", "cat", log).stdout
        return out.splitlines()

    assert eventually(lambda: dialled(" ".join(replies())), 15, "a reply") == override_ip
    drop_syn = ["-d", override_ip, "-p", "tcp", "--syn", "-j", "DROP"]
    iptables = ["ip", "netns", "exec", env["EGRESS_DEV_INET_NETNS"], "iptables"]
    subprocess.run([*iptables, "-I", "INPUT", *drop_syn], check=True)
    try:
        before = len(replies())
        time.sleep(3)
        assert len(replies()) > before, "the open connection flows while new ones are dropped"

        def ejected_and_closed() -> tuple[dict[str, Any], dict[str, Any]] | None:
            lines = json_lines(pod_log(k8s, gw))
            eject = [e for e in lines if "eject_unhealthy_event" in e]
            long = [
                d
                for d in lines
                if d.get("upstream_host") == f"{override_ip}:{tcp_port}"
                and envoy_time(d["start_time"]) >= started - 1
            ]
            return (eject[0], long[0]) if eject and long else None

        # Checks run every 60 s until the cluster has carried traffic, then every 10 s; two
        # failures eject the host.
        event, line = eventually(ejected_and_closed, 150, "the ejection and the closed line")
        assert event["host"]["socket_address"]["address"] == override_ip
        assert event["cluster_name"] == f"{gw.name}_TCP_{tcp_port}-override"
        ejected_at = envoy_time(event["timestamp"])
        closed_at = envoy_time(line["start_time"]) + line["duration"] / 1000
        assert abs(closed_at - ejected_at) < 2, (event, line)
        assert_original_shape(line)
        eventually(lambda: "closed" in replies(), 15, "the client to see the close")
        assert dialled(send_tcp(client, gw.ip, tcp_port)) == real
    finally:
        subprocess.run([*iptables, "-D", "INPUT", *drop_syn], check=False)


def test_udp_sessions_are_logged_when_they_end(
    k8s: Any,
    dev_stack: DevStack,
    gateways: dict[str, Gateway],
    client: dict[str, Any],
    override_ip: str,
) -> None:
    """A UDP session's line is written when the session ends (the UDP proxy's idle timeout,
    60 s): the same fields, none empty; it names the upstream host but no cluster."""
    env = dev_stack.env
    _, udp_port = upstream_ports(env)
    expected = {"json": env["EGRESS_DEV_UPSTREAM_IP"], "override": override_ip}
    for role in expected:
        assert "upstream udp/" in send_udp(client, gateways[role].ip, udp_port)
    for role, host in expected.items():
        gw = gateways[role]

        def udp_lines(gw: Gateway = gw) -> list[dict[str, Any]]:
            return access_lines(k8s, gw, udp_port)

        lines = eventually(udp_lines, 60 + FLUSH_S, f"{role}'s UDP line")
        for line in lines:
            assert_original_shape(line)
            assert set(line) >= TCP_ALWAYS - {"upstream_cluster"}, line
            assert line["upstream_host"] == f"{host}:{udp_port}"
            assert line["bytes_received"] == 3
