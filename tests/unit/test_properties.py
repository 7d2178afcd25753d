"""Property-based tests: any valid ExternalService renders valid, deterministic objects."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from core.hijack import HijackState
from core.settings import Settings
from core.spec import parse_external_service, upstream_address_reason
from core.yamlio import dump_all
from gateway.envoy import bootstrap
from gateway.render import render
from tests.unit.envoy_proto import parse_bootstrap
from tests.unit.envoy_validate import envoy_validate

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

label = st.from_regex(r"\A[a-z]([a-z0-9-]{0,10}[a-z0-9])?\Z")
names = st.from_regex(r"\A[a-z]([a-z0-9-]{0,40}[a-z0-9])?\Z")
dns_names = st.lists(label, min_size=2, max_size=4).map(".".join)
ports = st.lists(
    st.tuples(st.integers(1, 65535), st.sampled_from(["TCP", "UDP"])),
    min_size=1,
    max_size=6,
    unique=True,
).map(lambda items: [{"port": p, "protocol": proto} for p, proto in items])
# Addresses a gateway may reach (no loopback, link-local, metadata, multicast...).
ipv4 = st.ip_addresses(v=4).filter(lambda a: upstream_address_reason(a) is None).map(str)


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    min_replicas = draw(st.integers(1, 20))
    spec: dict[str, Any] = {
        "dnsName": draw(dns_names),
        "ports": draw(ports),
        "hijackDns": draw(st.booleans()),
        "minReplicas": min_replicas,
        "maxReplicas": draw(st.integers(min_replicas, 40)),
        "targetCPUUtilizationPercentage": draw(st.integers(1, 100)),
    }
    optional: dict[str, Any] = {
        "ipOverride": st.lists(ipv4, min_size=1, max_size=3, unique=True),
        "envoyClusterMaxConnections": st.integers(0, 2**32 - 1),
        "envoyLogLevel": st.sampled_from(
            ["trace", "debug", "info", "warning", "warn", "error", "critical", "off"]
        ),
        "envoyDnsRefreshRateS": st.integers(1, 86400),
        "envoyRespectDnsTTL": st.booleans(),
        "envoyJsonAdminAccessLogs": st.booleans(),
        "envoyJsonClusterAccessLogs": st.booleans(),
        "serviceTopologyMode": st.sampled_from(["Auto", "None"]),
        "resources": st.just(
            {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
        ),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            spec[key] = draw(strategy)
    return {
        "apiVersion": "egress.monzo.com/v1",
        "kind": "ExternalService",
        "metadata": {"name": draw(names)},
        "spec": spec,
    }


SETTINGS = [
    Settings(),
    Settings(enable_pdb=True, service_topology_mode=True, gateway_namespace="egress"),
]


@settings(max_examples=150, deadline=None)
@given(manifests(), st.sampled_from(SETTINGS), st.sampled_from(list(HijackState)))
def test_any_valid_spec_renders_valid_deterministic_objects(
    manifest: dict[str, Any], cfg: Settings, state: HijackState
) -> None:
    es = parse_external_service(manifest)
    parse_bootstrap(bootstrap(es.name, es.spec))
    objects = render(es, cfg, state)
    assert dump_all(objects) == dump_all(render(parse_external_service(manifest), cfg, state))
    for obj in objects:
        assert obj["metadata"]["name"] == es.name
        assert len(obj["metadata"]["name"]) <= 63
    service = next(o for o in objects if o["kind"] == "Service")
    port_names = [p["name"] for p in service["spec"]["ports"]]
    assert len(set(port_names)) == len(port_names)
    for port_name in port_names:
        assert len(port_name) <= 63 and DNS_LABEL.match(port_name)
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    for peer in policy["spec"]["ingress"][0]["from"]:
        for key in peer["podSelector"]["matchLabels"]:
            assert len(key.split("/", 1)[1]) <= 63


@settings(max_examples=60, deadline=None)
@given(manifests())
def test_real_envoy_accepts_any_valid_spec(manifest: dict[str, Any]) -> None:
    """The pinned Envoy itself loads every generated bootstrap (``--mode validate``)."""
    es = parse_external_service(manifest)
    configmap = next(
        o for o in render(es, Settings(), HijackState.FALSE) if o["kind"] == "ConfigMap"
    )
    ok, out = envoy_validate(configmap["data"]["envoy.yaml"])
    assert ok, out
