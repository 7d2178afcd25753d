"""Parsing ExternalServices: defaults, every accepted form, and a matrix of invalid objects.

Hostile input gets its own tests: the table shared with the CRD tests (``hostile.py``), the
operator's ceilings, Kubernetes' quantity grammar, and a fuzzer asserting that whatever the
input, parsing returns a spec or raises InvalidExternalService, never anything else, so that
one bad object cannot stop the others.
"""

from __future__ import annotations

import copy
import io
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.hijack import HijackState
from core.settings import Settings
from core.spec import (
    MAX_REPORTED_ERRORS,
    Ceilings,
    ExternalService,
    ExternalServiceSpec,
    InvalidExternalService,
    Port,
    Protocol,
    Resources,
    parse_external_service,
    quantity_value,
)
from egressctl.render_cmds import parse_files
from gateway.render import render
from tests.unit.hostile import HOSTILE, Hostile


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
    ("min-replicas-zero", manifest(minReplicas=0), "spec.minReplicas", "from 1 to"),
    ("max-replicas-zero", manifest(maxReplicas=0), "spec.maxReplicas", "from 1 to"),
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
        "unspecified",
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
    # The operator's ceilings (defaults: 100 replicas, 8 cpu and 16Gi memory per pod): the CRD
    # cannot know them, only the reconciler refuses these.
    (
        "max-replicas-over-ceiling",
        manifest(maxReplicas=101),
        "spec.maxReplicas",
        "GATEWAY_MAX_REPLICAS",
    ),
    (
        "min-replicas-over-ceiling",
        manifest(minReplicas=101, maxReplicas=101),
        "spec.minReplicas",
        "ceiling of 100 replicas",
    ),
    (
        "cpu-limit-over-ceiling",
        manifest(resources={"limits": {"cpu": 9}}),
        "spec.resources.limits.cpu",
        "GATEWAY_MAX_CPU",
    ),
    (
        "cpu-request-over-ceiling",
        manifest(resources={"requests": {"cpu": "8001m"}}),
        "spec.resources.requests.cpu",
        "ceiling of 8 cpu per gateway pod",
    ),
    (
        "cpu-exa",
        manifest(resources={"limits": {"cpu": "1E"}}),
        "spec.resources.limits.cpu",
        "GATEWAY_MAX_CPU",
    ),
    (
        "cpu-huge-exponent",
        manifest(resources={"limits": {"cpu": "1e99"}}),
        "spec.resources.limits.cpu",
        "GATEWAY_MAX_CPU",
    ),
    (
        "memory-limit-over-ceiling",
        manifest(resources={"limits": {"memory": "17Gi"}}),
        "spec.resources.limits.memory",
        "GATEWAY_MAX_MEMORY",
    ),
    (
        "memory-request-over-ceiling",
        manifest(resources={"requests": {"memory": "16.5Gi"}}),
        "spec.resources.requests.memory",
        "ceiling of 16Gi memory",
    ),
    # Input the API server never sends but files and old objects may hold: each once crashed
    # the parser or slipped through it.
    (
        "quantity-float-nan",
        manifest(resources={"limits": {"cpu": math.nan}}),
        "spec.resources.limits.cpu",
        "not a Kubernetes quantity",
    ),
    (
        "quantity-float-infinity",
        manifest(resources={"limits": {"memory": math.inf}}),
        "spec.resources.limits.memory",
        "not a Kubernetes quantity",
    ),
    (
        "quantity-nan-request-with-limit",
        manifest(resources={"requests": {"cpu": "NaN"}, "limits": {"cpu": "1"}}),
        "spec.resources.requests.cpu",
        "not a Kubernetes quantity",
    ),
    (
        "hugepages-not-a-multiple",
        manifest(resources={"limits": {"hugepages-2Mi": "3Mi", "memory": "1Gi"}}),
        "spec.resources.limits.hugepages-2Mi",
        "multiple of the page size",
    ),
    (
        "resource-name-not-string",
        manifest(resources={"limits": {1: "1"}}),
        "spec.resources.limits.1",
        "strings",
    ),
    (
        "resources-unknown-int-key",
        manifest(resources={"limits": {}, 7: {}}),
        "spec.resources",
        "unknown field(s) 7",
    ),
    (
        "port-unknown-mixed-keys",
        manifest(ports=[{"port": 443, 1: 2, "name": "x"}]),
        "spec.ports[0]",
        "unknown field(s) 1, name",
    ),
    (
        "port-huge-integer",
        manifest(ports=[{"port": 10**5000}]),
        "spec.ports[0].port",
        "an integer of 16610 bits",
    ),
    (
        "replicas-huge-integer",
        manifest(minReplicas=-(10**5000)),
        "spec.minReplicas",
        "an integer of 16610 bits",
    ),
    ("name-trailing-newline", manifest("google\n"), "metadata.name", "DNS-1035"),
    (
        "ip-override-long-zone",
        manifest(ipOverride=["fe80::1%" + "x" * 100_000]),
        "spec.ipOverride[0]",
        "...",
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


# --- hostile input ----------------------------------------------------------------------


@pytest.mark.parametrize("case", HOSTILE, ids=[h.id for h in HOSTILE])
def test_hostile_object_is_refused_with_the_field_and_reason(case: Hostile) -> None:
    """The same table the CRD tests and the API server refuse (tests/unit/hostile.py)."""
    with pytest.raises(InvalidExternalService) as info:
        parse_external_service(case.manifest())
    reported = {e.path: e.reason for e in info.value.errors}
    assert case.field in reported, f"expected an error on {case.field}, got {reported}"
    assert case.words in reported[case.field]


def test_raised_ceilings_admit_what_the_defaults_refuse() -> None:
    big = manifest(
        minReplicas=150,
        maxReplicas=400,
        resources={
            "requests": {"cpu": 16, "memory": "32Gi"},
            "limits": {"cpu": 32, "memory": "64Gi"},
        },
    )
    with pytest.raises(InvalidExternalService):
        parse_external_service(big)
    es = parse_external_service(big, Ceilings(max_replicas=400, cpu="32", memory="64Gi"))
    assert (es.spec.min_replicas, es.spec.max_replicas) == (150, 400)
    with pytest.raises(InvalidExternalService) as info:
        parse_external_service(big, Ceilings(max_replicas=399, cpu="32", memory="64Gi"))
    assert [e.path for e in info.value.errors] == ["spec.maxReplicas"]


@pytest.mark.parametrize(
    "bad", [{"max_replicas": 0}, {"max_replicas": 2**31}, {"cpu": "NaN"}, {"memory": "0"}]
)
def test_ceilings_are_checked_when_made(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Ceilings(**bad)


@pytest.mark.parametrize(
    "resources",
    [
        {
            "requests": {"cpu": "8", "memory": "16Gi"},
            "limits": {"cpu": "8000m", "memory": "16384Mi"},
        },
        {"limits": {"hugepages-2Mi": "4Mi", "memory": "1Gi"}},
        {"requests": {"hugepages-1Gi": "2Gi", "cpu": 1}, "limits": {"hugepages-1Gi": "2Gi"}},
        {"limits": {"example.com/dongle": 2}},
        {"requests": {"example.com/dongle": "1"}, "limits": {"example.com/dongle": 1}},
        {"requests": {"ephemeral-storage": "1Gi"}, "limits": {"ephemeral-storage": "2G"}},
        {"limits": {"cpu": "1e-1", "memory": "5."}},
        {"limits": {"cpu": "+.5"}},
        {},
    ],
    ids=[
        "at-the-ceilings",
        "hugepages",
        "hugepages-request-equals-limit",
        "extended-limit-only",
        "extended-request-equals-limit",
        "ephemeral-storage",
        "exponent-and-bare-fraction",
        "plus-sign",
        "empty",
    ],
)
def test_resources_kubernetes_accepts_are_accepted(resources: dict[str, Any]) -> None:
    es = parse_external_service(manifest(resources=resources))
    assert es.spec.resources.to_dict() == {
        k: {n: str(v) for n, v in q.items()} for k, q in resources.items() if q
    }


QUANTITY_VALUES: list[tuple[str, Decimal | None]] = [
    ("0", Decimal(0)),
    ("100m", Decimal("0.1")),
    ("1", Decimal(1)),
    ("+1", Decimal(1)),
    ("-1", Decimal(-1)),
    ("5.", Decimal(5)),
    (".5", Decimal("0.5")),
    ("1.5Gi", Decimal(3 * 2**29)),
    ("1Ki", Decimal(1024)),
    ("2Ei", Decimal(2 * 2**60)),
    ("1k", Decimal(1000)),
    ("1E", Decimal(10**18)),
    ("1e3", Decimal(1000)),
    ("1E3", Decimal(1000)),
    ("1e+3", Decimal(1000)),
    ("1e-3", Decimal("0.001")),
    # Rounded up to a whole milli unit, as the API server does for a container's resources.
    ("1n", Decimal("0.001")),
    ("0.1n", Decimal("0.001")),
    ("1.0001m", Decimal("0.002")),
    ("-1.0001m", Decimal("-0.002")),
    ("1e-30", Decimal("0.001")),
    ("1e99", Decimal("1e99")),
    ("99999999999999999999", Decimal("99999999999999999999")),
    ("1e100", None),  # longer exponents stall the API server (1e999999999: minutes)
    ("1e999999999", None),
    ("", None),
    ("NaN", None),
    ("nan", None),
    ("Infinity", None),
    ("-Infinity", None),
    ("inf", None),
    ("sNaN", None),
    ("1 ", None),
    (" 1", None),
    ("1_0", None),
    ("\u0661", None),
    ("1\n", None),
    (".", None),
    ("+", None),
    ("1e", None),
    ("1e1.5", None),
    ("1e1234567890", None),
    ("1K", None),
    ("1ki", None),
    ("1Gb", None),
    ("0x10", None),
    ("1" * 65, None),
]


@pytest.mark.parametrize(
    ("text", "value"), QUANTITY_VALUES, ids=[repr(t)[:30] for t, _ in QUANTITY_VALUES]
)
def test_quantity_value_follows_kubernetes(text: str, value: Decimal | None) -> None:
    if value is None:
        with pytest.raises(ValueError):
            quantity_value(text)
    else:
        assert quantity_value(text) == value


def test_errors_are_capped_so_that_the_condition_message_fits() -> None:
    obj = manifest(ports=[{"port": 0, "protocol": "x" * 10_000} for _ in range(64)])
    with pytest.raises(InvalidExternalService) as info:
        parse_external_service(obj)
    errors = info.value.errors
    assert len(errors) == MAX_REPORTED_ERRORS
    assert errors[-1].reason == f"and {2 * 64 - MAX_REPORTED_ERRORS + 1} more"
    assert len("; ".join(map(str, errors))) < 32768 // 4


VALID_NEIGHBOURS = """\
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata: {name: first}
spec: {dnsName: first.example.com, ports: [{port: 443}]}
---
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata: {name: nan-cpu}
spec: {dnsName: nan.example.com, ports: [{port: 443}], resources: {limits: {cpu: NaN}}}
---
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata: {name: nan-request}
spec:
  dnsName: nan.example.com
  ports: [{port: 443}]
  resources: {requests: {cpu: sNaN}, limits: {cpu: "1"}}
---
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata: {name: float-nan}
spec: {dnsName: nan.example.com, ports: [{port: 443}], resources: {limits: {memory: .nan}}}
---
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata: {name: infinite}
spec: {dnsName: inf.example.com, ports: [{port: 443}], resources: {requests: {memory: Infinity}}}
---
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata: {name: odd-keys}
spec: {dnsName: odd.example.com, ports: [{port: 443, 1: 2, null: x}], 3: 4}
---
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata: {name: last}
spec: {dnsName: last.example.com, ports: [{port: 8443}]}
"""


def test_an_unparsable_object_among_valid_ones_stops_nothing(tmp_path: Path) -> None:
    """Objects stored before the CRD (or files) with quantities Decimal chokes on, planted
    among valid ones: each bad one is refused with its field, every valid one still parses,
    through the parser and through ``egressctl render``'s reading of a multi-document file."""
    parsed: list[str] = []
    refused: dict[str, list[str]] = {}
    for doc in yaml.safe_load_all(VALID_NEIGHBOURS):
        try:
            parsed.append(parse_external_service(doc).name)
        except InvalidExternalService as exc:
            refused[exc.name] = [e.path for e in exc.errors]
    assert parsed == ["first", "last"]
    assert refused == {
        "nan-cpu": ["spec.resources.limits.cpu"],
        "nan-request": ["spec.resources.requests.cpu"],
        "float-nan": ["spec.resources.limits.memory"],
        "infinite": ["spec.resources.requests.memory"],
        "odd-keys": ["spec", "spec.ports[0]"],
    }

    path = tmp_path / "mixed.yaml"
    path.write_text(VALID_NEIGHBOURS)
    items, readable = parse_files([str(path)], err=io.StringIO())
    assert readable
    assert [i.service.name for i in items if i.service is not None] == ["first", "last"]
    assert len([i for i in items if i.error is not None]) == 5


# --- fuzzing: a spec or InvalidExternalService, never anything else ---------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["NaN", "Infinity", "-inf", "sNaN", "1e999999999", "", "0", "\n"])
)
_keys = st.text(max_size=8) | st.integers(-3, 3) | st.none() | st.booleans()
json_like = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),  # type: ignore[arg-type]
    max_leaves=12,
)
quantity_like = st.text(alphabet="0123456789.+-eEKMGTPinumkNaIfty _", max_size=14) | st.integers()
resource_names = st.sampled_from(
    [
        "cpu",
        "memory",
        "ephemeral-storage",
        "hugepages-2Mi",
        "hugepages-",
        "hugepages-x",
        "example.com/dongle",
        "example.kubernetes.io/x",
        "requests.example.com/x",
        "gpu",
        "",
        "/",
    ]
)
resource_maps = st.dictionaries(resource_names, quantity_like | json_like, max_size=5)
ip_like = st.sampled_from(
    ["169.254.169.254", "fd00:ec2::254", "::ffff:127.0.0.1", "fe80::1%eth0", "203.0.113.7", "::"]
) | st.text(alphabet="0123456789abcdef:.%", max_size=20)
dns_like = st.sampled_from(
    ["metadata.google.internal", "a.localhost", "example.com", "EXAMPLE.com", "a..b", "x\n.com"]
) | st.text(alphabet="abc.-0\n*", max_size=12)

SPEC_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "dnsName": dns_like | json_like,
    "ports": st.lists(
        st.dictionaries(st.sampled_from(["port", "protocol", "name"]), json_like, max_size=3)
        | st.fixed_dictionaries({"port": st.integers(-1, 70000) | json_like}),
        max_size=4,
    )
    | json_like,
    "hijackDns": json_like,
    "minReplicas": st.integers(-1, 2**32) | json_like,
    "maxReplicas": st.integers(-1, 2**32) | json_like,
    "targetCPUUtilizationPercentage": json_like,
    "resources": st.fixed_dictionaries(
        {}, optional={"requests": resource_maps | json_like, "limits": resource_maps | json_like}
    )
    | json_like,
    "ipOverride": st.lists(ip_like | json_like, max_size=4) | json_like,
    "envoyClusterMaxConnections": json_like,
    "envoyLogLevel": json_like,
    "envoyDnsRefreshRateS": json_like,
    "envoyRespectDnsTTL": json_like,
    "serviceTopologyMode": json_like,
    "envoyJsonAdminAccessLogs": json_like,
    "envoyJsonClusterAccessLogs": json_like,
    "typo": json_like,
}


@st.composite
def raw_objects(draw: st.DrawFn) -> Any:
    """Mostly a valid manifest with some fields replaced by anything; sometimes anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_like)
    obj = manifest()
    for key in draw(st.sets(st.sampled_from(sorted(SPEC_VALUES)), max_size=4)):
        obj["spec"][key] = draw(SPEC_VALUES[key])
    if draw(st.booleans()):
        obj[draw(st.sampled_from(["metadata", "spec", "apiVersion", "kind"]))] = draw(json_like)
    return obj


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_objects())
def test_any_input_parses_or_is_refused_with_invalid_external_service(obj: Any) -> None:
    try:
        es = parse_external_service(obj)
    except InvalidExternalService as exc:
        assert exc.errors
        # What the controller writes into the Valid condition must fit its 32768 characters.
        assert len("; ".join(str(e) for e in exc.errors)) <= 32768
        return
    assert isinstance(es, ExternalService)
    # A spec that parses is one the renderer can always turn into objects.
    render(es, Settings(), HijackState.FALSE)
