"""Parse an ExternalService once, at the edge, into a frozen typed spec with its defaults.

The API server's CRD rejects most bad input, but objects can predate a stricter CRD and files
given to ``egressctl`` never met an API server, so every field is checked again here. All the
problems of one object are reported together, each naming the field and the reason, so that a
person fixes a manifest in one go.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeGuard

from reconcile import constants as c
from reconcile.names import DNS1035_LABEL, DNS1123_LABEL


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"


ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")
MAX_UINT32 = 2**32 - 1
MAX_IP_OVERRIDES = 32
MAX_PORTS = 64

DEFAULT_MIN_REPLICAS = 3
DEFAULT_MAX_REPLICAS = 12
DEFAULT_TARGET_CPU = 50
DEFAULT_REQUESTS = (("cpu", "100m"), ("memory", "50Mi"))
DEFAULT_LIMITS = (("cpu", "2"), ("memory", "1Gi"))

_RESOURCE_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_SPEC_FIELDS = frozenset(
    {
        "dnsName",
        "ports",
        "hijackDns",
        "minReplicas",
        "maxReplicas",
        "targetCPUUtilizationPercentage",
        "resources",
        "ipOverride",
        "envoyClusterMaxConnections",
        "envoyLogLevel",
        "envoyDnsRefreshRateS",
        "envoyRespectDnsTTL",
        "serviceTopologyMode",
        "envoyJsonAdminAccessLogs",
        "envoyJsonClusterAccessLogs",
    }
)


@dataclass(frozen=True, slots=True)
class FieldError:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class InvalidExternalService(ValueError):
    """An ExternalService that can never be rendered; ``errors`` lists every problem found."""

    def __init__(self, name: str, errors: Sequence[FieldError]) -> None:
        self.name = name
        self.errors = tuple(errors)
        super().__init__(f"ExternalService {name or '<unnamed>'}: " + "; ".join(map(str, errors)))


@dataclass(frozen=True, slots=True)
class Port:
    port: int
    protocol: Protocol = Protocol.TCP


@dataclass(frozen=True, slots=True)
class Resources:
    """Container resources as sorted (name, quantity) pairs, so the spec stays hashable."""

    requests: tuple[tuple[str, str], ...] = DEFAULT_REQUESTS
    limits: tuple[tuple[str, str], ...] = DEFAULT_LIMITS

    def to_dict(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.limits:
            out["limits"] = dict(self.limits)
        if self.requests:
            out["requests"] = dict(self.requests)
        return out


@dataclass(frozen=True, slots=True)
class ExternalServiceSpec:
    dns_name: str
    ports: tuple[Port, ...]
    hijack_dns: bool = False
    min_replicas: int = DEFAULT_MIN_REPLICAS
    max_replicas: int = DEFAULT_MAX_REPLICAS
    target_cpu_utilization: int = DEFAULT_TARGET_CPU
    resources: Resources = field(default_factory=Resources)
    ip_override: tuple[str, ...] = ()
    envoy_cluster_max_connections: int | None = None
    envoy_log_level: str | None = None
    envoy_dns_refresh_rate_s: int | None = None
    envoy_respect_dns_ttl: bool = False
    service_topology_mode: str | None = None
    envoy_json_admin_access_logs: bool = False
    envoy_json_cluster_access_logs: bool = False


@dataclass(frozen=True, slots=True)
class ExternalService:
    """Identity of the object plus its parsed spec. ``uid`` is empty for objects read from files."""

    name: str
    spec: ExternalServiceSpec
    uid: str = ""
    generation: int = 0
    creation_timestamp: str = ""


def parse_external_service(obj: Any) -> ExternalService:
    """Parse a decoded ExternalService manifest; raise InvalidExternalService listing all errors."""
    errors: list[FieldError] = []
    if not isinstance(obj, Mapping):
        raise InvalidExternalService("", [FieldError("<document>", "must be a mapping")])
    if obj.get("apiVersion") != c.API_VERSION:
        errors.append(
            FieldError("apiVersion", f"must be {c.API_VERSION!r}, got {obj.get('apiVersion')!r}")
        )
    if obj.get("kind") != c.KIND:
        errors.append(FieldError("kind", f"must be {c.KIND!r}, got {obj.get('kind')!r}"))
    metadata = obj.get("metadata")
    name = ""
    uid = ""
    generation = 0
    created = ""
    if not isinstance(metadata, Mapping):
        errors.append(FieldError("metadata", "must be a mapping with a name"))
    else:
        raw_name = metadata.get("name")
        if isinstance(raw_name, str):
            name = raw_name
        errors.extend(_check_name(raw_name))
        if metadata.get("namespace"):
            errors.append(
                FieldError("metadata.namespace", "must be empty: ExternalService is cluster-scoped")
            )
        uid = str(metadata.get("uid") or "")
        gen = metadata.get("generation")
        generation = gen if isinstance(gen, int) and not isinstance(gen, bool) else 0
        created = str(metadata.get("creationTimestamp") or "")
    raw_spec = obj.get("spec")
    spec: ExternalServiceSpec | None = None
    if not isinstance(raw_spec, Mapping):
        errors.append(FieldError("spec", "is required and must be a mapping"))
    else:
        spec, spec_errors = _parse_spec(raw_spec, name)
        errors.extend(spec_errors)
    if errors or spec is None:
        raise InvalidExternalService(name, errors)
    return ExternalService(
        name=name, spec=spec, uid=uid, generation=generation, creation_timestamp=created
    )


def _check_name(name: object) -> list[FieldError]:
    path = "metadata.name"
    if not isinstance(name, str) or not name:
        return [FieldError(path, "is required")]
    if len(name) > c.MAX_NAME_LENGTH:
        return [
            FieldError(
                path,
                f"must be at most {c.MAX_NAME_LENGTH} characters so that the grant label "
                f"'{c.GRANT_LABEL_PREFIX}<name>' is a valid label key (got {len(name)})",
            )
        ]
    if not DNS1035_LABEL.match(name):
        return [
            FieldError(
                path,
                f"{name!r} must be a DNS-1035 label: lowercase letters, digits and '-', "
                "starting with a letter and ending with a letter or digit",
            )
        ]
    return []


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_dns_name(value: object, path: str = "spec.dnsName") -> list[FieldError]:
    """Lowercase RFC 1123 name of at least two labels, no wildcard, not an IP address."""
    if not isinstance(value, str) or not value:
        return [FieldError(path, "is required and must be a string")]
    if len(value) > 253:
        return [FieldError(path, f"must be at most 253 characters (got {len(value)})")]
    if "*" in value:
        return [FieldError(path, f"{value!r}: wildcards are not supported")]
    if value != value.lower():
        return [FieldError(path, f"{value!r} must be lowercase")]
    if value.endswith("."):
        return [FieldError(path, f"{value!r} must not end with a dot")]
    labels = value.split(".")
    if len(labels) < 2:
        return [FieldError(path, f"{value!r} must have at least two labels (e.g. example.com)")]
    for label in labels:
        if len(label) > 63:
            return [FieldError(path, f"{value!r}: label {label[:20]!r}... is longer than 63")]
        if not DNS1123_LABEL.match(label):
            return [
                FieldError(
                    path,
                    f"{value!r} is not a lowercase RFC 1123 name: label {label!r} must be "
                    "lowercase letters, digits and '-', not starting or ending with '-'",
                )
            ]
    if labels[-1].isdigit():
        return [FieldError(path, f"{value!r} looks like an IP address; use a DNS name")]
    return []


def _parse_ports(raw: object, name: str) -> tuple[tuple[Port, ...], list[FieldError]]:
    path = "spec.ports"
    if not isinstance(raw, list) or not raw:
        return (), [FieldError(path, "is required and must list at least one port")]
    if len(raw) > MAX_PORTS:
        return (), [FieldError(path, f"must list at most {MAX_PORTS} ports (got {len(raw)})")]
    errors: list[FieldError] = []
    ports: list[Port] = []
    seen: set[tuple[int, Protocol]] = set()
    for i, item in enumerate(raw):
        ipath = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            errors.append(FieldError(ipath, "must be a mapping with port and protocol"))
            continue
        unknown = sorted(set(item) - {"port", "protocol"})
        if unknown:
            errors.append(FieldError(f"{ipath}", f"unknown field(s) {', '.join(unknown)}"))
        raw_port = item.get("port")
        port = raw_port if _is_int(raw_port) else 0
        ok = True
        if not 1 <= port <= 65535:
            errors.append(
                FieldError(
                    f"{ipath}.port", f"must be an integer from 1 to 65535 (got {raw_port!r})"
                )
            )
            ok = False
        raw_proto = item.get("protocol", "TCP")
        if raw_proto not in ("TCP", "UDP"):
            errors.append(
                FieldError(f"{ipath}.protocol", f"must be TCP or UDP (got {raw_proto!r})")
            )
            ok = False
        if not ok:
            continue
        proto = Protocol(raw_proto)
        if (port, proto) in seen:
            errors.append(FieldError(ipath, f"duplicate port {port}/{proto}"))
            continue
        seen.add((port, proto))
        if name and len(_service_port_name(name, port, proto)) > 63:
            errors.append(
                FieldError(
                    ipath,
                    f"the Service port name {_service_port_name(name, port, proto)!r} would exceed "
                    "63 characters: shorten metadata.name",
                )
            )
            continue
        ports.append(Port(port=port, protocol=proto))
    return tuple(ports), errors


def _service_port_name(name: str, port: int, proto: Protocol) -> str:
    return f"{name}-{proto.lower()}-{port}"


def _parse_quantities(
    raw: object, path: str
) -> tuple[tuple[tuple[str, str], ...], list[FieldError]]:
    if raw is None:
        return (), []
    if not isinstance(raw, Mapping):
        return (), [FieldError(path, "must be a mapping of resource name to quantity")]
    from kubernetes.utils.quantity import parse_quantity  # heavy import, paid only when needed

    errors: list[FieldError] = []
    out: list[tuple[str, str]] = []
    for key in sorted(raw, key=str):
        value = raw[key]
        kpath = f"{path}.{key}"
        if not isinstance(key, str) or not _RESOURCE_NAME.match(key):
            errors.append(FieldError(kpath, "is not a valid resource name"))
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            errors.append(
                FieldError(kpath, f"must be a quantity such as 100m or 1Gi (got {value!r})")
            )
            continue
        text = str(value)
        try:
            amount = parse_quantity(text)
        except ValueError:
            errors.append(
                FieldError(kpath, f"{text!r} is not a Kubernetes quantity (e.g. 100m, 1Gi)")
            )
            continue
        if amount < 0:
            errors.append(FieldError(kpath, f"must not be negative (got {text!r})"))
            continue
        out.append((key, text))
    return tuple(out), errors


def _parse_resources(raw: object) -> tuple[Resources, list[FieldError]]:
    path = "spec.resources"
    if raw is None:
        return Resources(), []
    if not isinstance(raw, Mapping):
        return Resources(), [FieldError(path, "must be a mapping with requests and/or limits")]
    from kubernetes.utils.quantity import parse_quantity

    errors: list[FieldError] = []
    unknown = sorted(set(raw) - {"requests", "limits"})
    if unknown:
        errors.append(FieldError(path, f"unknown field(s) {', '.join(map(str, unknown))}"))
    requests, req_errors = _parse_quantities(raw.get("requests"), f"{path}.requests")
    limits, lim_errors = _parse_quantities(raw.get("limits"), f"{path}.limits")
    errors += req_errors + lim_errors
    limit_map = dict(limits)
    for key, value in requests:
        if key in limit_map and parse_quantity(value) > parse_quantity(limit_map[key]):
            errors.append(
                FieldError(
                    f"{path}.requests.{key}",
                    f"request {value} is greater than limit {limit_map[key]}: "
                    "pods would be refused",
                )
            )
    return Resources(requests=requests, limits=limits), errors


def _parse_ip_override(raw: object) -> tuple[tuple[str, ...], list[FieldError]]:
    path = "spec.ipOverride"
    if raw is None:
        return (), []
    if not isinstance(raw, list):
        return (), [FieldError(path, "must be a list of IP addresses")]
    if len(raw) > MAX_IP_OVERRIDES:
        return (), [FieldError(path, f"must list at most {MAX_IP_OVERRIDES} addresses")]
    errors: list[FieldError] = []
    out: list[str] = []
    for i, item in enumerate(raw):
        try:
            addr = ipaddress.ip_address(item if isinstance(item, str) else "")
        except ValueError:
            errors.append(FieldError(f"{path}[{i}]", f"{item!r} is not an IP address"))
            continue
        if addr.is_unspecified or addr.is_multicast:
            errors.append(FieldError(f"{path}[{i}]", f"{item!r} cannot be an upstream endpoint"))
            continue
        text = str(addr)
        if text in out:
            errors.append(FieldError(f"{path}[{i}]", f"duplicate address {text}"))
            continue
        out.append(text)
    return tuple(out), errors


def _bool(raw: Mapping[str, Any], key: str, errors: list[FieldError]) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        errors.append(FieldError(f"spec.{key}", f"must be true or false (got {value!r})"))
        return False
    return value


def _int(
    raw: Mapping[str, Any],
    key: str,
    errors: list[FieldError],
    *,
    default: int | None,
    low: int,
    high: int | None = None,
) -> int | None:
    value = raw.get(key)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        errors.append(FieldError(f"spec.{key}", f"must be an integer {bound} (got {value!r})"))
        return default
    return int(value)


def _parse_spec(
    raw: Mapping[str, Any], name: str
) -> tuple[ExternalServiceSpec | None, list[FieldError]]:
    errors: list[FieldError] = []
    unknown = sorted(set(map(str, raw)) - _SPEC_FIELDS)
    if unknown:
        errors.append(FieldError("spec", f"unknown field(s) {', '.join(unknown)}"))
    dns_name = raw.get("dnsName")
    errors += check_dns_name(dns_name)
    ports, port_errors = _parse_ports(raw.get("ports"), name)
    errors += port_errors
    hijack = _bool(raw, "hijackDns", errors)
    min_replicas = _int(raw, "minReplicas", errors, default=DEFAULT_MIN_REPLICAS, low=1)
    max_replicas = _int(raw, "maxReplicas", errors, default=DEFAULT_MAX_REPLICAS, low=1)
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        errors.append(
            FieldError(
                "spec.maxReplicas",
                f"must be at least minReplicas ({min_replicas}) (got {max_replicas})",
            )
        )
    target_cpu = _int(
        raw, "targetCPUUtilizationPercentage", errors, default=DEFAULT_TARGET_CPU, low=1, high=100
    )
    resources, res_errors = _parse_resources(raw.get("resources"))
    errors += res_errors
    ip_override, ip_errors = _parse_ip_override(raw.get("ipOverride"))
    errors += ip_errors
    max_conn = _int(raw, "envoyClusterMaxConnections", errors, default=None, low=0, high=MAX_UINT32)
    log_level = raw.get("envoyLogLevel")
    if log_level is not None and log_level not in ENVOY_LOG_LEVELS:
        errors.append(
            FieldError(
                "spec.envoyLogLevel",
                f"must be one of {', '.join(ENVOY_LOG_LEVELS)} (got {log_level!r})",
            )
        )
        log_level = None
    refresh = _int(raw, "envoyDnsRefreshRateS", errors, default=None, low=1, high=MAX_UINT32)
    respect_ttl = _bool(raw, "envoyRespectDnsTTL", errors)
    topology = raw.get("serviceTopologyMode")
    if topology is not None and (
        not isinstance(topology, str) or not topology or len(topology) > 63
    ):
        errors.append(
            FieldError(
                "spec.serviceTopologyMode",
                f"must be a non-empty string of at most 63 characters (got {topology!r})",
            )
        )
        topology = None
    json_admin = _bool(raw, "envoyJsonAdminAccessLogs", errors)
    json_cluster = _bool(raw, "envoyJsonClusterAccessLogs", errors)
    if errors:
        return None, errors
    assert isinstance(dns_name, str) and min_replicas is not None and max_replicas is not None
    assert target_cpu is not None
    return (
        ExternalServiceSpec(
            dns_name=dns_name,
            ports=ports,
            hijack_dns=hijack,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            target_cpu_utilization=target_cpu,
            resources=resources if raw.get("resources") is not None else Resources(),
            ip_override=ip_override,
            envoy_cluster_max_connections=max_conn,
            envoy_log_level=log_level,
            envoy_dns_refresh_rate_s=refresh,
            envoy_respect_dns_ttl=respect_ttl,
            service_topology_mode=topology,
            envoy_json_admin_access_logs=json_admin,
            envoy_json_cluster_access_logs=json_cluster,
        ),
        [],
    )
