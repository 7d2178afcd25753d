"""The Envoy bootstrap: golden configs, Envoy's protobuf schema, and the rules of SPEC §3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from core.spec import ExternalService, parse_external_service
from gateway.envoy import (
    ADMIN_TEXT_FORMAT,
    CLUSTER_TEXT_FORMAT,
    JSON_FORMAT,
    admin_port,
    bootstrap,
    bootstrap_yaml,
    config_hash,
)
from tests.unit.envoy_proto import parse_bootstrap
from tests.unit.envoy_validate import envoy_validate

GOLDEN = Path(__file__).parent / "golden"


def es(name: str = "google", **spec: Any) -> ExternalService:
    body: dict[str, Any] = {"dnsName": "google.com", "ports": [{"port": 443}]}
    body.update(spec)
    return parse_external_service(
        {
            "apiVersion": "egress.monzo.com/v1",
            "kind": "ExternalService",
            "metadata": {"name": name},
            "spec": body,
        }
    )


CASES: dict[str, ExternalService] = {
    "tcp": es(),
    "udp": es("dns", dnsName="dns.example.net", ports=[{"port": 53, "protocol": "UDP"}]),
    "tcp-and-udp-same-port": es(
        "dns", dnsName="dns.example.net", ports=[{"port": 53, "protocol": "UDP"}, {"port": 53}]
    ),
    "ip-override": es(
        "payments",
        dnsName="api.payments.example.com",
        ports=[{"port": 443}, {"port": 8125, "protocol": "UDP"}],
        ipOverride=["192.0.2.10", "192.0.2.11"],
    ),
    "circuit-breaker-and-dns-tuning": es(
        envoyClusterMaxConnections=4096, envoyDnsRefreshRateS=30, envoyRespectDnsTTL=True
    ),
    "json-logs": es(envoyJsonAdminAccessLogs=True, envoyJsonClusterAccessLogs=True),
    "admin-port-collision": es(ports=[{"port": 11000}, {"port": 11001}, {"port": 11003}]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bootstrap_matches_golden(case: str) -> None:
    svc = CASES[case]
    expected = yaml.safe_load((GOLDEN / f"{case}.yaml").read_text())
    assert yaml.safe_load(bootstrap_yaml(svc.name, svc.spec)) == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_bootstrap_is_valid_for_envoy(case: str) -> None:
    svc = CASES[case]
    parsed = parse_bootstrap(bootstrap(svc.name, svc.spec))
    # Round-trip the YAML text too: what the pod reads is the string, not the dict.
    assert parse_bootstrap(yaml.safe_load(bootstrap_yaml(svc.name, svc.spec))) == parsed


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_envoy_accepts_the_bootstrap(case: str) -> None:
    svc = CASES[case]
    ok, out = envoy_validate(bootstrap_yaml(svc.name, svc.spec))
    assert ok, out


def test_real_envoy_check_can_fail() -> None:
    config = yaml.safe_load(bootstrap_yaml("google", CASES["tcp"].spec))
    # Two endpoints in a LOGICAL_DNS cluster: a valid protobuf that Envoy itself refuses.
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["type"] == "LOGICAL_DNS"
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoints.append(endpoints[0])
    parse_bootstrap(config)
    ok, out = envoy_validate(yaml.safe_dump(config))
    assert not ok and "LOGICAL_DNS" in out, out


def test_schema_check_can_fail_on_unknown_fields_and_types() -> None:
    config = bootstrap("google", CASES["tcp"].spec)
    config["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    with pytest.raises(json_format.ParseError):
        parse_bootstrap(config)
    config = bootstrap("google", CASES["tcp"].spec)
    listener_filter = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    listener_filter["typed_config"]["@type"] = "type.googleapis.com/envoy.NoSuchProxy"
    with pytest.raises(json_format.ParseError):
        parse_bootstrap(config)


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        pytest.param([{"port": 443}], 11000, id="no-collision"),
        pytest.param([{"port": 11000}], 11001, id="first-taken"),
        pytest.param([{"port": 11000}, {"port": 11001}, {"port": 11003}], 11002, id="gap"),
        pytest.param([{"port": 11000, "protocol": "UDP"}], 11000, id="udp-does-not-collide"),
    ],
)
def test_admin_port_is_lowest_free_tcp_port_from_11000(
    ports: list[dict[str, Any]], expected: int
) -> None:
    svc = es(ports=ports)
    assert admin_port(svc.spec) == expected
    assert (
        bootstrap(svc.name, svc.spec)["admin"]["address"]["socket_address"]["port_value"]
        == expected
    )


def test_clusters_listeners_and_routes() -> None:
    svc = CASES["ip-override"]
    config = bootstrap(svc.name, svc.spec)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert sorted(clusters) == [
        "payments_TCP_443",
        "payments_TCP_443-aggregate",
        "payments_TCP_443-override",
        "payments_UDP_8125",
        "payments_UDP_8125-aggregate",
        "payments_UDP_8125-override",
    ]
    dns = clusters["payments_TCP_443"]
    assert dns["type"] == "LOGICAL_DNS"
    assert dns["dns_lookup_family"] == "V4_ONLY"
    assert dns["connect_timeout"] == "1s"
    assert dns["upstream_connection_options"]["tcp_keepalive"] == {
        "keepalive_probes": 3,
        "keepalive_time": 30,
        "keepalive_interval": 5,
    }
    override = clusters["payments_TCP_443-override"]
    assert override["type"] == "STATIC"
    addresses = [
        e["endpoint"]["address"]["socket_address"]["address"]
        for e in override["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert addresses == ["192.0.2.10", "192.0.2.11"]
    assert override["health_checks"][0]["unhealthy_threshold"] == 2
    assert "health_checks" not in clusters["payments_UDP_8125-override"]
    assert "close_connections_on_host_health_failure" not in clusters["payments_UDP_8125-override"]
    aggregate = clusters["payments_TCP_443-aggregate"]["cluster_type"]["typed_config"]["clusters"]
    assert aggregate == ["payments_TCP_443-override", "payments_TCP_443"]
    listeners = {item["name"]: item for item in config["static_resources"]["listeners"]}
    tcp_proxy = listeners["payments_TCP_443"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert tcp_proxy["cluster"] == "payments_TCP_443-aggregate"
    assert tcp_proxy["stat_prefix"] == "tcp_proxy"
    udp = listeners["payments_UDP_8125"]
    assert udp["address"]["socket_address"]["protocol"] == "UDP"
    udp_proxy = udp["listener_filters"][0]["typed_config"]
    assert udp_proxy["stat_prefix"] == "udp_proxy"
    assert udp_proxy["matcher"]["on_no_match"]["action"]["typed_config"]["cluster"] == (
        "payments_UDP_8125-aggregate"
    )


def test_the_override_cluster_checks_like_the_original() -> None:
    """The original's STATIC override cluster: connections to a host that fails its checks are
    closed, every check opens a new connection, and check events go to stdout (through the
    event_logger extension: event_log_path is deprecated)."""
    svc = CASES["ip-override"]
    clusters = {c["name"]: c for c in bootstrap(svc.name, svc.spec)["static_resources"]["clusters"]}
    override = clusters["payments_TCP_443-override"]
    assert override["close_connections_on_host_health_failure"] is True
    (check,) = override["health_checks"]
    assert check["timeout"] == "1s" and check["interval"] == "10s"
    assert (check["unhealthy_threshold"], check["healthy_threshold"]) == (2, 3)
    assert check["reuse_connection"] is False
    assert check["tcp_health_check"] == {}
    assert "event_log_path" not in check
    assert check["event_logger"] == [
        {
            "name": "envoy.health_check.event_sinks.file",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.health_check.event_sinks.file.v3.HealthCheckEventFileSink",
                "event_log_path": "/dev/stdout",
            },
        }
    ]
    # Only the override clusters are health checked; the DNS and aggregate clusters are not.
    assert [name for name, c in clusters.items() if "health_checks" in c] == [
        "payments_TCP_443-override"
    ]


def log_formats(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every access-log format of a bootstrap: the admin's, then each listener's."""
    formats = [config["admin"]["access_log"][0]["typed_config"]["log_format"]]
    for listener in config["static_resources"]["listeners"]:
        if "filter_chains" in listener:
            proxy = listener["filter_chains"][0]["filters"][0]["typed_config"]
        else:
            proxy = listener["listener_filters"][0]["typed_config"]
        formats.append(proxy["access_log"][0]["typed_config"]["log_format"])
    return formats


def test_text_access_logs_use_the_original_formats() -> None:
    config = bootstrap("google", CASES["tcp"].spec)
    admin_format = config["admin"]["access_log"][0]["typed_config"]["log_format"]
    assert admin_format["text_format_source"]["inline_string"] == ADMIN_TEXT_FORMAT
    tcp_proxy = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    cluster_format = tcp_proxy["typed_config"]["access_log"][0]["typed_config"]["log_format"]
    assert cluster_format["text_format_source"]["inline_string"] == CLUSTER_TEXT_FORMAT


# The original operator's JSON access-log fields (its issue lists them): people index them.
ORIGINAL_JSON_FIELDS = {
    "authority", "bytes_received", "bytes_sent", "connection_termination_details",
    "downstream_local_address", "downstream_remote_address", "duration", "method", "path",
    "protocol", "requested_server_name", "response_code", "response_code_details",
    "response_flags", "start_time", "upstream_cluster", "upstream_host",
    "upstream_local_address", "upstream_service_time", "upstream_transport_failure_reason",
    "user_agent",
}  # fmt: skip


def test_json_access_logs_carry_the_original_fields_for_proxy_and_admin() -> None:
    svc = es(
        envoyJsonAdminAccessLogs=True,
        envoyJsonClusterAccessLogs=True,
        ports=[{"port": 443}, {"port": 53, "protocol": "UDP"}],
    )
    formats = log_formats(bootstrap(svc.name, svc.spec))
    assert len(formats) == 3  # admin, TCP, UDP
    for log_format in formats:
        assert set(log_format["json_format"]) == ORIGINAL_JSON_FIELDS
        assert log_format["json_format"] == JSON_FORMAT
    assert JSON_FORMAT["response_code"] == "%RESPONSE_CODE%"
    assert JSON_FORMAT["upstream_transport_failure_reason"] == "%UPSTREAM_TRANSPORT_FAILURE_REASON%"
    assert JSON_FORMAT["requested_server_name"] == "%REQUESTED_SERVER_NAME%"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_access_log_omits_empty_values(case: str) -> None:
    """As the original: text logs print "" for a value Envoy lacks (not "-"), JSON logs leave
    the field out (not null)."""
    svc = CASES[case]
    for log_format in log_formats(bootstrap(svc.name, svc.spec)):
        assert log_format["omit_empty_values"] is True


def test_optional_cluster_settings_appear_only_when_set() -> None:
    plain = bootstrap("google", CASES["tcp"].spec)["static_resources"]["clusters"][0]
    assert not {"circuit_breakers", "dns_refresh_rate", "respect_dns_ttl"} & set(plain)
    tuned = bootstrap("google", CASES["circuit-breaker-and-dns-tuning"].spec)["static_resources"][
        "clusters"
    ][0]
    assert tuned["circuit_breakers"] == {"thresholds": [{"max_connections": 4096}]}
    assert tuned["dns_refresh_rate"] == "30s"
    assert tuned["respect_dns_ttl"] is True


def test_rendering_is_deterministic_and_the_hash_follows_the_text() -> None:
    svc = CASES["ip-override"]
    first = bootstrap_yaml(svc.name, svc.spec)
    assert bootstrap_yaml(svc.name, svc.spec) == first
    assert config_hash(first) == config_hash(bootstrap_yaml(svc.name, svc.spec))
    changed = es("payments", dnsName="api.payments.example.com", ports=[{"port": 443}])
    assert config_hash(bootstrap_yaml(changed.name, changed.spec)) != config_hash(first)
