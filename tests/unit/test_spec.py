"""Parsing ExternalServices: defaults, every accepted form, and a matrix of invalid objects."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from reconcile.spec import (
    ExternalServiceSpec,
    InvalidExternalService,
    Port,
    Protocol,
    Resources,
    parse_external_service,
)


def manifest(name: str = "google", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"dnsName": "google.com", "ports": [{"port": 443}]}
    body.update(spec)
    return {
        "apiVersion": "egress.monzo.com/v1",
        "kind": "ExternalService",
        "metadata": {"name": name},
        "spec": body,
    }


def test_defaults_match_the_original_operator() -> None:
    es = parse_external_service(manifest())
    assert es.name == "google"
    assert es.spec == ExternalServiceSpec(
        dns_name="google.com",
        ports=(Port(443, Protocol.TCP),),
        hijack_dns=False,
        min_replicas=3,
        max_replicas=12,
        target_cpu_utilization=50,
        resources=Resources(
            requests=(("cpu", "100m"), ("memory", "50Mi")),
            limits=(("cpu", "2"), ("memory", "1Gi")),
        ),
    )
    assert es.spec.resources.to_dict() == {
        "limits": {"cpu": "2", "memory": "1Gi"},
        "requests": {"cpu": "100m", "memory": "50Mi"},
    }


def test_every_field_is_read() -> None:
    es = parse_external_service(
        manifest(
            "payments",
            dnsName="api.payments.example.com",
            ports=[{"port": 443, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}],
            hijackDns=True,
            minReplicas=2,
            maxReplicas=4,
            targetCPUUtilizationPercentage=70,
            resources={"requests": {"cpu": 1, "memory": "100Mi"}, "limits": {"memory": "200Mi"}},
            ipOverride=["10.1.2.3", "2001:db8::1"],
            envoyClusterMaxConnections=0,
            envoyLogLevel="warn",
            envoyDnsRefreshRateS=30,
            envoyRespectDnsTTL=True,
            serviceTopologyMode="None",
            envoyJsonAdminAccessLogs=True,
            envoyJsonClusterAccessLogs=True,
        )
    )
    spec = es.spec
    assert spec.ports == (Port(443, Protocol.TCP), Port(53, Protocol.UDP))
    assert spec.hijack_dns and spec.envoy_respect_dns_ttl
    assert (spec.min_replicas, spec.max_replicas, spec.target_cpu_utilization) == (2, 4, 70)
    assert spec.resources.to_dict() == {
        "limits": {"memory": "200Mi"},
        "requests": {"cpu": "1", "memory": "100Mi"},
    }
    assert spec.ip_override == ("10.1.2.3", "2001:db8::1")
    assert spec.envoy_cluster_max_connections == 0
    assert spec.envoy_log_level == "warn"
    assert spec.envoy_dns_refresh_rate_s == 30
    assert spec.service_topology_mode == "None"
    assert spec.envoy_json_admin_access_logs and spec.envoy_json_cluster_access_logs


def test_metadata_from_the_api_server_is_kept() -> None:
    obj = manifest()
    obj["metadata"].update(uid="abc", generation=7, creationTimestamp="2026-01-01T00:00:00Z")
    es = parse_external_service(obj)
    assert (es.uid, es.generation, es.creation_timestamp) == ("abc", 7, "2026-01-01T00:00:00Z")


def test_spec_is_frozen() -> None:
    es = parse_external_service(manifest())
    with pytest.raises(AttributeError):
        es.spec.dns_name = "evil.com"  # type: ignore[misc]


def test_name_at_the_length_limit_is_accepted() -> None:
    name = "a" * 53
    assert parse_external_service(manifest(name, ports=[{"port": 65535}])).name == name


def _without(key: str) -> dict[str, Any]:
    obj = manifest()
    del obj["spec"][key]
    return obj


def _set(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    obj = manifest()
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


# (id, object, field path that must be reported, words the reason must contain)
BAD: list[tuple[str, Any, str, str]] = [
    ("not-a-mapping", ["x"], "<document>", "mapping"),
    (
        "wrong-api-version",
        _set(("apiVersion",), "egress.monzo.com/v2"),
        "apiVersion",
        "egress.monzo.com/v1",
    ),
    ("wrong-kind", _set(("kind",), "Service"), "kind", "ExternalService"),
    ("no-metadata", _set(("metadata",), None), "metadata", "mapping"),
    ("no-name", _set(("metadata",), {}), "metadata.name", "required"),
    ("name-uppercase", manifest("Google"), "metadata.name", "DNS-1035"),
    ("name-starts-with-digit", manifest("1google"), "metadata.name", "DNS-1035"),
    ("name-with-dot", manifest("google.com"), "metadata.name", "DNS-1035"),
    ("name-ends-with-dash", manifest("google-"), "metadata.name", "DNS-1035"),
    ("name-too-long-for-grant-label", manifest("a" * 56), "metadata.name", "at most 55"),
    (
        "name-too-long-for-port-name",
        manifest("a" * 54, ports=[{"port": 65535}]),
        "spec.ports[0]",
        "63",
    ),
    (
        "namespaced",
        _set(("metadata", "namespace"), "default"),
        "metadata.namespace",
        "cluster-scoped",
    ),
    ("no-spec", _set(("spec",), None), "spec", "required"),
    ("unknown-spec-field", manifest(hijackDNS=True), "spec", "hijackDNS"),
    ("no-dns-name", _without("dnsName"), "spec.dnsName", "required"),
    ("dns-name-not-string", manifest(dnsName=42), "spec.dnsName", "string"),
    ("dns-name-single-label", manifest(dnsName="localhost"), "spec.dnsName", "two labels"),
    ("dns-name-uppercase", manifest(dnsName="Google.com"), "spec.dnsName", "lowercase"),
    ("dns-name-wildcard", manifest(dnsName="*.google.com"), "spec.dnsName", "wildcard"),
    ("dns-name-trailing-dot", manifest(dnsName="google.com."), "spec.dnsName", "dot"),
    ("dns-name-underscore", manifest(dnsName="my_host.example.com"), "spec.dnsName", "RFC 1123"),
    ("dns-name-label-dash", manifest(dnsName="-bad.example.com"), "spec.dnsName", "RFC 1123"),
    ("dns-name-empty-label", manifest(dnsName="a..com"), "spec.dnsName", "RFC 1123"),
    ("dns-name-label-too-long", manifest(dnsName="a" * 64 + ".com"), "spec.dnsName", "63"),
    ("dns-name-too-long", manifest(dnsName=".".join(["a" * 60] * 5)), "spec.dnsName", "253"),
    ("dns-name-ip", manifest(dnsName="10.0.0.1"), "spec.dnsName", "IP address"),
    ("no-ports", _without("ports"), "spec.ports", "at least one"),
    ("empty-ports", manifest(ports=[]), "spec.ports", "at least one"),
    ("port-zero", manifest(ports=[{"port": 0}]), "spec.ports[0].port", "1 to 65535"),
    ("port-too-big", manifest(ports=[{"port": 65536}]), "spec.ports[0].port", "1 to 65535"),
    ("port-string", manifest(ports=[{"port": "443"}]), "spec.ports[0].port", "integer"),
    ("port-bool", manifest(ports=[{"port": True}]), "spec.ports[0].port", "integer"),
    ("port-not-mapping", manifest(ports=[443]), "spec.ports[0]", "mapping"),
    (
        "protocol-sctp",
        manifest(ports=[{"port": 1, "protocol": "SCTP"}]),
        "spec.ports[0].protocol",
        "TCP or UDP",
    ),
    (
        "protocol-lowercase",
        manifest(ports=[{"port": 1, "protocol": "tcp"}]),
        "spec.ports[0].protocol",
        "TCP or UDP",
    ),
    (
        "duplicate-port-default-protocol",
        manifest(ports=[{"port": 443}, {"port": 443, "protocol": "TCP"}]),
        "spec.ports[1]",
        "duplicate",
    ),
    (
        "port-unknown-field",
        manifest(ports=[{"port": 443, "name": "https"}]),
        "spec.ports[0]",
        "name",
    ),
    ("hijack-string", manifest(hijackDns="true"), "spec.hijackDns", "true or false"),
    ("min-replicas-zero", manifest(minReplicas=0), "spec.minReplicas", "at least 1"),
    ("max-replicas-zero", manifest(maxReplicas=0), "spec.maxReplicas", "at least 1"),
    ("min-above-max", manifest(minReplicas=5, maxReplicas=2), "spec.maxReplicas", "minReplicas"),
    ("min-above-default-max", manifest(minReplicas=13), "spec.maxReplicas", "minReplicas (13)"),
    ("replicas-float", manifest(minReplicas=1.5), "spec.minReplicas", "integer"),
    (
        "cpu-zero",
        manifest(targetCPUUtilizationPercentage=0),
        "spec.targetCPUUtilizationPercentage",
        "1 to 100",
    ),
    (
        "cpu-over-100",
        manifest(targetCPUUtilizationPercentage=101),
        "spec.targetCPUUtilizationPercentage",
        "1 to 100",
    ),
    ("resources-not-mapping", manifest(resources="big"), "spec.resources", "mapping"),
    ("resources-unknown-field", manifest(resources={"claims": []}), "spec.resources", "claims"),
    (
        "quantity-garbage",
        manifest(resources={"limits": {"cpu": "lots"}}),
        "spec.resources.limits.cpu",
        "quantity",
    ),
    (
        "quantity-negative",
        manifest(resources={"requests": {"memory": "-1Gi"}}),
        "spec.resources.requests.memory",
        "negative",
    ),
    (
        "request-above-limit",
        manifest(resources={"requests": {"cpu": "3"}, "limits": {"cpu": "2"}}),
        "spec.resources.requests.cpu",
        "greater than limit",
    ),
    (
        "resource-name-invalid",
        manifest(resources={"limits": {"c p u": "1"}}),
        "spec.resources.limits.c p u",
        "resource name",
    ),
    ("ip-override-not-list", manifest(ipOverride="1.2.3.4"), "spec.ipOverride", "list"),
    (
        "ip-override-hostname",
        manifest(ipOverride=["example.com"]),
        "spec.ipOverride[0]",
        "not an IP",
    ),
    ("ip-override-cidr", manifest(ipOverride=["10.0.0.0/8"]), "spec.ipOverride[0]", "not an IP"),
    (
        "ip-override-unspecified",
        manifest(ipOverride=["0.0.0.0"]),
        "spec.ipOverride[0]",
        "cannot be",
    ),
    (
        "ip-override-duplicate",
        manifest(ipOverride=["1.2.3.4", "1.2.3.4"]),
        "spec.ipOverride[1]",
        "duplicate",
    ),
    (
        "max-connections-negative",
        manifest(envoyClusterMaxConnections=-1),
        "spec.envoyClusterMaxConnections",
        "0 to",
    ),
    (
        "max-connections-over-uint32",
        manifest(envoyClusterMaxConnections=2**32),
        "spec.envoyClusterMaxConnections",
        "4294967295",
    ),
    ("log-level-unknown", manifest(envoyLogLevel="verbose"), "spec.envoyLogLevel", "one of"),
    ("log-level-uppercase", manifest(envoyLogLevel="INFO"), "spec.envoyLogLevel", "one of"),
    ("refresh-rate-zero", manifest(envoyDnsRefreshRateS=0), "spec.envoyDnsRefreshRateS", "1 to"),
    (
        "respect-ttl-string",
        manifest(envoyRespectDnsTTL="yes"),
        "spec.envoyRespectDnsTTL",
        "true or false",
    ),
    (
        "topology-mode-empty",
        manifest(serviceTopologyMode=""),
        "spec.serviceTopologyMode",
        "non-empty",
    ),
    (
        "json-logs-int",
        manifest(envoyJsonAdminAccessLogs=1),
        "spec.envoyJsonAdminAccessLogs",
        "true or false",
    ),
]


@pytest.mark.parametrize(("obj", "path", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_external_service_is_refused_with_the_field_and_reason(
    obj: Any, path: str, words: str
) -> None:
    with pytest.raises(InvalidExternalService) as info:
        parse_external_service(copy.deepcopy(obj))
    reported = {e.path: e.reason for e in info.value.errors}
    assert path in reported, f"expected an error on {path}, got {reported}"
    assert words in reported[path]


def test_all_errors_of_one_object_are_reported_together() -> None:
    obj = manifest(
        "Bad_Name", dnsName="*.x", ports=[{"port": 0}], minReplicas=0, envoyLogLevel="loud"
    )
    with pytest.raises(InvalidExternalService) as info:
        parse_external_service(obj)
    paths = [e.path for e in info.value.errors]
    assert paths == [
        "metadata.name",
        "spec.dnsName",
        "spec.ports[0].port",
        "spec.minReplicas",
        "spec.envoyLogLevel",
    ]
    assert "ExternalService <unnamed>" not in str(info.value)
