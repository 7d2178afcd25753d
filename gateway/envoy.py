"""The Envoy v3 bootstrap of one gateway, as a pure function of its spec.

The shape follows the original operator's generated config (a LOGICAL_DNS cluster and a TCP or
UDP proxy listener per port, admin on the lowest free port from 11000) so that gateways behave
the same after a migration; access logs use the stdout logger instead of writing to /dev/stdout.
The tests parse every generated bootstrap with Envoy's own protobuf definitions.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

from core import constants as c
from core.spec import ExternalServiceSpec, Port, Protocol
from core.yamlio import dump

CONNECT_TIMEOUT = "1s"
STDOUT_LOGGER = "envoy.access_loggers.stdout"
STDOUT_LOGGER_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
UDP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig"
UDP_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route"
AGGREGATE_TYPE = "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig"

CLUSTER_TEXT_FORMAT = (
    '[%START_TIME%] %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%DOWNSTREAM_REMOTE_ADDRESS%" '
    '"%UPSTREAM_HOST%" "%UPSTREAM_CLUSTER%"\n'
)
ADMIN_TEXT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)
# The original operator's JSON access log, for both the proxy and the admin log: these 21 field
# names are an interface (people index them). With omit_empty_values, a field whose operator has
# no value is left out of the line (Envoy 1.40 and later; 1.39 prints it as null), and text
# formats print an empty string instead of "-". For a TCP connection Envoy has no HTTP request:
# method, path, protocol, authority, user_agent and upstream_service_time are left out, and
# response_code is 0 (see README, "Access logs").
JSON_FORMAT: dict[str, str] = {
    "authority": "%REQ(:AUTHORITY)%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "duration": "%DURATION%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "response_code": "%RESPONSE_CODE%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "response_flags": "%RESPONSE_FLAGS%",
    "start_time": "%START_TIME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "user_agent": "%REQ(USER-AGENT)%",
}
# ipOverride health-check events (host ejected, added back, check failed) as JSON lines on
# stdout, as the original logged them; the event_logger extension replaces event_log_path.
HEALTH_EVENT_SINK = "envoy.health_check.event_sinks.file"
HEALTH_EVENT_SINK_TYPE = (
    "type.googleapis.com/envoy.extensions.health_check.event_sinks.file.v3.HealthCheckEventFileSink"
)
HEALTH_EVENT_LOG_PATH = "/dev/stdout"


def admin_port(spec: ExternalServiceSpec) -> int:
    """The lowest port from 11000 up that no TCP port of the spec uses."""
    taken = {p.port for p in spec.ports if p.protocol is Protocol.TCP}
    port = c.ADMIN_PORT_BASE
    while port in taken:
        port += 1
    return port


def cluster_name(name: str, port: Port) -> str:
    return f"{name}_{port.protocol.value}_{port.port}"


def _access_log(json: bool, text_format: str) -> list[dict[str, Any]]:
    log_format: dict[str, Any] = (
        {"json_format": dict(JSON_FORMAT)}
        if json
        else {"text_format_source": {"inline_string": text_format}}
    )
    log_format["omit_empty_values"] = True
    return [
        {
            "name": STDOUT_LOGGER,
            "typed_config": {"@type": STDOUT_LOGGER_TYPE, "log_format": log_format},
        }
    ]


def _socket_address(address: str, port: Port) -> dict[str, Any]:
    sock: dict[str, Any] = {"address": address, "port_value": port.port}
    if port.protocol is Protocol.UDP:
        sock["protocol"] = "UDP"
    return {"socket_address": sock}


def _common_cluster(name: str, spec: ExternalServiceSpec) -> dict[str, Any]:
    cluster: dict[str, Any] = {"name": name, "connect_timeout": CONNECT_TIMEOUT}
    if spec.envoy_cluster_max_connections is not None:
        cluster["circuit_breakers"] = {
            "thresholds": [{"max_connections": spec.envoy_cluster_max_connections}]
        }
    return cluster


def _keepalive() -> dict[str, Any]:
    return {"tcp_keepalive": {"keepalive_probes": 3, "keepalive_time": 30, "keepalive_interval": 5}}


def _load_assignment(name: str, hosts: Sequence[str], port: Port) -> dict[str, Any]:
    endpoints = [{"endpoint": {"address": _socket_address(host, port)}} for host in hosts]
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]}


def _dns_cluster(name: str, spec: ExternalServiceSpec, port: Port) -> dict[str, Any]:
    cluster = _common_cluster(name, spec)
    cluster.update(
        {
            "type": "LOGICAL_DNS",
            "dns_lookup_family": "V4_ONLY",
            "lb_policy": "ROUND_ROBIN",
            "upstream_connection_options": _keepalive(),
            "load_assignment": _load_assignment(name, [spec.dns_name], port),
        }
    )
    if spec.envoy_dns_refresh_rate_s is not None:
        cluster["dns_refresh_rate"] = f"{spec.envoy_dns_refresh_rate_s}s"
    if spec.envoy_respect_dns_ttl:
        cluster["respect_dns_ttl"] = True
    return cluster


def _override_cluster(name: str, spec: ExternalServiceSpec, port: Port) -> dict[str, Any]:
    cluster = _common_cluster(name, spec)
    cluster.update(
        {
            "type": "STATIC",
            "lb_policy": "ROUND_ROBIN",
            "upstream_connection_options": _keepalive(),
            "load_assignment": _load_assignment(name, spec.ip_override, port),
        }
    )
    # A TCP connect says nothing about a UDP service, so UDP overrides are not health checked.
    if port.protocol is Protocol.TCP:
        # As the original: a host that fails its checks loses its open connections too (clients
        # reconnect, through the DNS cluster while no override host is healthy), and every check
        # opens a fresh connection, as a client would.
        cluster["close_connections_on_host_health_failure"] = True
        cluster["health_checks"] = [
            {
                "timeout": "1s",
                "interval": "10s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 3,
                "reuse_connection": False,
                "tcp_health_check": {},
                "event_logger": [
                    {
                        "name": HEALTH_EVENT_SINK,
                        "typed_config": {
                            "@type": HEALTH_EVENT_SINK_TYPE,
                            "event_log_path": HEALTH_EVENT_LOG_PATH,
                        },
                    }
                ],
            }
        ]
    return cluster


def _aggregate_cluster(name: str, spec: ExternalServiceSpec, members: list[str]) -> dict[str, Any]:
    cluster = _common_cluster(name, spec)
    cluster.update(
        {
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {
                "name": "envoy.clusters.aggregate",
                "typed_config": {"@type": AGGREGATE_TYPE, "clusters": members},
            },
        }
    )
    return cluster


def _listener(name: str, route_to: str, spec: ExternalServiceSpec, port: Port) -> dict[str, Any]:
    access_log = _access_log(spec.envoy_json_cluster_access_logs, CLUSTER_TEXT_FORMAT)
    listener: dict[str, Any] = {"name": name, "address": _socket_address("0.0.0.0", port)}
    if port.protocol is Protocol.TCP:
        listener["filter_chains"] = [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": TCP_PROXY_TYPE,
                            "stat_prefix": "tcp_proxy",
                            "cluster": route_to,
                            "access_log": access_log,
                        },
                    }
                ]
            }
        ]
    else:
        listener["udp_listener_config"] = {}
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.udp_listener.udp_proxy",
                "typed_config": {
                    "@type": UDP_PROXY_TYPE,
                    "stat_prefix": "udp_proxy",
                    "matcher": {
                        "on_no_match": {
                            "action": {
                                "name": "route",
                                "typed_config": {"@type": UDP_ROUTE_TYPE, "cluster": route_to},
                            }
                        }
                    },
                    "access_log": access_log,
                },
            }
        ]
    return listener


def bootstrap(name: str, spec: ExternalServiceSpec) -> dict[str, Any]:
    """The Envoy bootstrap for gateway ``name`` as plain data, in a fixed order."""
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for port in spec.ports:
        base = cluster_name(name, port)
        clusters.append(_dns_cluster(base, spec, port))
        route_to = base
        # UDP ports follow ipOverride too (the original ignored it for UDP and always used DNS).
        # Their override hosts are not health checked, so they are always chosen: UDP never
        # falls back to DNS while ipOverride is set.
        if spec.ip_override:
            override = f"{base}-override"
            route_to = f"{base}-aggregate"
            clusters.append(_override_cluster(override, spec, port))
            clusters.append(_aggregate_cluster(route_to, spec, [override, base]))
        listeners.append(_listener(base, route_to, spec, port))
    return {
        "admin": {
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": admin_port(spec)}},
            "access_log": _access_log(spec.envoy_json_admin_access_logs, ADMIN_TEXT_FORMAT),
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


@functools.lru_cache(maxsize=4096)
def bootstrap_yaml(name: str, spec: ExternalServiceSpec) -> str:
    """``envoy.yaml`` as stored in the ConfigMap: deterministic text, byte for byte.

    Memoised (the spec is frozen): the ConfigMap and the Deployment's config hash both need it,
    and a sweep renders every gateway.
    """
    return dump(bootstrap(name, spec))


def config_hash(envoy_yaml: str) -> str:
    """Hash of envoy.yaml for the pod template annotation, so a config change rolls the pods."""
    return hashlib.sha256(envoy_yaml.encode()).hexdigest()
