"""Parse an ExternalService once, at the edge, into a frozen typed spec with its defaults.

The API server's CRD rejects most bad input, but objects can predate a stricter CRD and files
given to ``egressctl`` never met an API server, so every field is checked again here. All the
problems of one object are reported together, each naming the field and the reason, so that a
person fixes a manifest in one go.

Tenants who may create ExternalServices and nothing else are assumed hostile: whatever the
input, parsing returns a spec or raises InvalidExternalService (never another exception, so
one bad object cannot stop a sweep), its messages stay short enough for a status condition,
a spec never exceeds the operator's ceilings (``Ceilings``, from settings), and no spec can
point a gateway at the pod itself, the node's link-local network or a cloud metadata server.
Resource names and quantities follow Kubernetes' own grammar and rules, so a spec accepted
here never yields a Deployment the API server refuses.
"""

from __future__ import annotations

import decimal
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeGuard

from core import constants as c
from core.names import DNS1035_LABEL, DNS1123_LABEL, DNS1123_SUBDOMAIN, LABEL_NAME


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"


ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")
MAX_UINT32 = 2**32 - 1
MAX_INT32 = 2**31 - 1  # replicas are int32 in the Deployment and the HPA
MAX_IP_OVERRIDES = 32
MAX_PORTS = 64
# Real containers name a handful of resources; the bound keeps hostile maps cheap (CRD: same).
MAX_RESOURCE_NAMES = 16
# Longer than any sensible quantity ("9223372036854775807", "0.000000001", "1.5Gi").
MAX_QUANTITY_LENGTH = 64
# A status condition message holds at most 32768 characters: the errors of one object, each
# with its values shortened to MAX_SHOWN, are cut at MAX_REPORTED_ERRORS to stay far below.
MAX_REPORTED_ERRORS = 32
MAX_SHOWN = 64

DEFAULT_MIN_REPLICAS = 3
DEFAULT_MAX_REPLICAS = 12
DEFAULT_TARGET_CPU = 50
DEFAULT_REQUESTS = (("cpu", "100m"), ("memory", "50Mi"))
DEFAULT_LIMITS = (("cpu", "2"), ("memory", "1Gi"))

# Operator-level ceilings per gateway, raised by a platform team through these settings
# (core/settings.py reads them; named here so that refusals can name them).
ENV_MAX_REPLICAS = "GATEWAY_MAX_REPLICAS"
ENV_MAX_CPU = "GATEWAY_MAX_CPU"
ENV_MAX_MEMORY = "GATEWAY_MAX_MEMORY"
DEFAULT_CEILING_REPLICAS = 100
DEFAULT_CEILING_CPU = "8"
DEFAULT_CEILING_MEMORY = "16Gi"

CPU = "cpu"
MEMORY = "memory"
EPHEMERAL_STORAGE = "ephemeral-storage"
HUGEPAGES_PREFIX = "hugepages-"
STANDARD_RESOURCES = frozenset({CPU, MEMORY, EPHEMERAL_STORAGE})
# Kubernetes keeps these for its own resource names (quota's "requests.<name>" form, and the
# prefixed native resources): neither is an extended resource a container may ask for.
_RESERVED_RESOURCE_PREFIX = "requests."
_RESERVED_RESOURCE_DOMAIN = "kubernetes.io/"

# apimachinery's Quantity grammar: sign, digits with an optional fraction, then a binary SI,
# decimal SI or decimal exponent suffix. ASCII digits only, and the whole string (fullmatch).
# An exponent has at most 2 digits, which covers every magnitude a resource can have: the API
# server takes minutes of CPU (and times out) on an exponent such as 1e999999999, so a longer
# one must never reach it, in a Deployment or in the CRD's quantity() rules.
_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<binary>[KMGTPE]i)|(?P<decimal>[numkMGTPE])|[eE](?P<exponent>[+-]?[0-9]{1,2}))?"
)
_BINARY_SI = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# The API server rounds every quantity of a resource list up to a whole milli unit when it
# defaults a pod (SetDefaults_ResourceList), before it compares requests with limits.
_MILLI = Decimal("0.001")
# Exact for any mantissa of MAX_QUANTITY_LENGTH digits times 2**60 or 10**+-99.
_EXACT = decimal.Context(prec=400, Emax=10_000, Emin=-10_000, traps=[decimal.InvalidOperation])

# Names that resolve to a cloud provider's instance metadata server (and with it the node's
# credentials) from inside an instance: GCE, EC2 (instance-data.<region>.compute.internal
# outside us-east-1 as well), Tencent Cloud. Never an upstream, never hijacked (dns/render.py).
METADATA_DNS_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
    }
)
_EC2_REGIONAL_METADATA = re.compile(r"instance-data\.[a-z0-9-]+\.compute\.internal")
# Metadata servers outside the link-local ranges refused anyway: EC2's IPv6 endpoint, Alibaba
# Cloud's, and Azure's WireServer. 169.254.169.254 (most clouds) is link-local too, and listed
# so that its refusal says what it is.
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
        ipaddress.ip_address("168.63.129.16"),
    }
)
_IPV4_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
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
    """An ExternalService that can never be rendered; ``errors`` lists every problem found
    (at most MAX_REPORTED_ERRORS of them, then one line counting the rest)."""

    def __init__(self, name: str, errors: Sequence[FieldError]) -> None:
        self.name = name
        if len(errors) > MAX_REPORTED_ERRORS:
            rest = len(errors) - MAX_REPORTED_ERRORS + 1
            errors = [*errors[: MAX_REPORTED_ERRORS - 1], FieldError("spec", f"and {rest} more")]
        self.errors = tuple(errors)
        super().__init__(
            f"ExternalService {name or '<unnamed>'}: " + "; ".join(map(str, self.errors))
        )


def quantity_value(text: str) -> Decimal:
    """The value Kubernetes gives the quantity ``text``; ValueError if it refuses it.

    Only apimachinery's grammar is accepted (no NaN, Infinity, spaces, underscores or non-ASCII
    digits, which ``Decimal`` or the Python client would take), at most MAX_QUANTITY_LENGTH
    characters and exponents of at most 2 digits. The value is the one a container's resource
    list holds: rounded up (away from zero) to a whole milli unit.
    """
    if not text:
        raise ValueError("is empty")
    if len(text) > MAX_QUANTITY_LENGTH:
        raise ValueError(f"is longer than {MAX_QUANTITY_LENGTH} characters")
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError("is not a Kubernetes quantity")
    number = Decimal(match["number"])
    if match["binary"]:
        amount = _EXACT.multiply(number, Decimal(2 ** _BINARY_SI[match["binary"]]))
    else:
        suffix = match["decimal"]
        scale = _DECIMAL_SI[suffix] if suffix else int(match["exponent"] or 0)
        amount = _EXACT.scaleb(number, scale)
    amount = amount.quantize(_MILLI, rounding=decimal.ROUND_UP, context=_EXACT)
    return -amount if match["sign"] == "-" else amount


@dataclass(frozen=True, slots=True)
class Ceilings:
    """The most one gateway may ask for: replicas, and cpu and memory per gateway pod.

    Operator settings (ENV_MAX_*), so a platform team can raise them; the reconciler refuses a
    spec above them rather than let one tenant claim a cluster's worth of capacity.
    """

    max_replicas: int = DEFAULT_CEILING_REPLICAS
    cpu: str = DEFAULT_CEILING_CPU
    memory: str = DEFAULT_CEILING_MEMORY

    def __post_init__(self) -> None:
        # Checked once here, so that parsing can compare against them without failing.
        if not 1 <= self.max_replicas <= MAX_INT32:
            raise ValueError(f"max_replicas must be from 1 to {MAX_INT32}")
        for value in (self.cpu, self.memory):
            if quantity_value(value) <= 0:
                raise ValueError(f"ceiling {value!r} must be positive")


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


DEFAULT_CEILINGS = Ceilings()


def parse_external_service(obj: Any, ceilings: Ceilings = DEFAULT_CEILINGS) -> ExternalService:
    """Parse a decoded ExternalService manifest; raise InvalidExternalService listing all errors.

    ``ceilings`` are the operator's (``Settings.ceilings``); the defaults when not given.
    """
    errors: list[FieldError] = []
    if not isinstance(obj, Mapping):
        raise InvalidExternalService("", [FieldError("<document>", "must be a mapping")])
    if obj.get("apiVersion") != c.API_VERSION:
        errors.append(
            FieldError(
                "apiVersion", f"must be {c.API_VERSION!r}, got {_show(obj.get('apiVersion'))}"
            )
        )
    if obj.get("kind") != c.KIND:
        errors.append(FieldError("kind", f"must be {c.KIND!r}, got {_show(obj.get('kind'))}"))
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
        raw_uid, gen, raw_created = (
            metadata.get(k) for k in ("uid", "generation", "creationTimestamp")
        )
        uid = raw_uid if isinstance(raw_uid, str) else ""
        generation = gen if _is_int(gen) else 0
        created = raw_created if isinstance(raw_created, str) else ""
    raw_spec = obj.get("spec")
    spec: ExternalServiceSpec | None = None
    if not isinstance(raw_spec, Mapping):
        errors.append(FieldError("spec", "is required and must be a mapping"))
    else:
        spec, spec_errors = _parse_spec(raw_spec, name, ceilings)
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
    if not DNS1035_LABEL.fullmatch(name):
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


def _show(value: object) -> str:
    """``repr`` for messages, bounded: a hostile value must neither flood a status condition
    nor break ``repr`` itself (an int of more than 4300 digits cannot be printed)."""
    if _is_int(value) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, Mapping):
        return f"<a mapping of {len(value)} entries>"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"<a list of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _key(key: object) -> str:
    """A mapping key for a field path, bounded like ``_show``."""
    if isinstance(key, str):
        return key if len(key) <= MAX_SHOWN else key[: MAX_SHOWN - 3] + "..."
    return _show(key)


def _unknown_fields(keys: Iterable[object]) -> str:
    names = sorted({_key(k) for k in keys})
    shown = ", ".join(names[:5])
    return f"unknown field(s) {shown}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


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
        if not DNS1123_LABEL.fullmatch(label):
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


def is_metadata_name(dns_name: str) -> bool:
    """Whether ``dns_name`` resolves to a cloud instance metadata server inside an instance."""
    name = dns_name.lower().rstrip(".")
    return name in METADATA_DNS_NAMES or bool(_EC2_REGIONAL_METADATA.fullmatch(name))


def upstream_name_reason(dns_name: str) -> str | None:
    """Why a well-formed ``dns_name`` may never be a gateway's upstream, or None if it may.

    Gateways resolve their upstream with the node's resolver, so a metadata name would hand
    every granted pod the node's credentials, and a localhost name (RFC 6761) would point
    Envoy at its own pod, admin interface included; hijackDns has nothing to do with either.
    """
    if is_metadata_name(dns_name):
        return (
            f"{dns_name!r} names a cloud metadata server, which holds the node's credentials: "
            "never an upstream"
        )
    if dns_name == "localhost" or dns_name.endswith(".localhost"):
        return f"{dns_name!r} is a localhost name: it would point the gateway at itself"
    return None


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
        unknown = set(item) - {"port", "protocol"}
        if unknown:
            errors.append(FieldError(ipath, _unknown_fields(unknown)))
        raw_port = item.get("port")
        port = raw_port if _is_int(raw_port) else 0
        ok = True
        if not 1 <= port <= 65535:
            errors.append(
                FieldError(
                    f"{ipath}.port", f"must be an integer from 1 to 65535 (got {_show(raw_port)})"
                )
            )
            ok = False
        raw_proto = item.get("protocol", "TCP")
        if raw_proto not in ("TCP", "UDP"):
            errors.append(
                FieldError(f"{ipath}.protocol", f"must be TCP or UDP (got {_show(raw_proto)})")
            )
            ok = False
        if not ok:
            continue
        proto = Protocol(raw_proto)
        if (port, proto) in seen:
            errors.append(FieldError(ipath, f"duplicate port {port}/{proto}"))
            continue
        seen.add((port, proto))
        if name and len(service_port_name(name, port, proto)) > 63:
            errors.append(
                FieldError(
                    ipath,
                    f"the Service port name {service_port_name(name, port, proto)!r} would exceed "
                    "63 characters: shorten metadata.name",
                )
            )
            continue
        ports.append(Port(port=port, protocol=proto))
    return tuple(ports), errors


def service_port_name(name: str, port: int, proto: Protocol) -> str:
    """The name of gateway ``name``'s Service port for one listener (render and validation)."""
    return f"{name}-{proto.lower()}-{port}"


def is_extended_resource(name: str) -> bool:
    """``<domain>/<name>``: a device or other resource Kubernetes never overcommits."""
    return "/" in name


def _overcommittable(name: str) -> bool:
    return not is_extended_resource(name) and not name.startswith(HUGEPAGES_PREFIX)


def resource_name_reason(name: object) -> str | None:
    """Why ``name`` is not a container resource Kubernetes accepts, or None if it is."""
    if not isinstance(name, str):
        return "resource names are strings"
    if name in STANDARD_RESOURCES:
        return None
    if name.startswith(HUGEPAGES_PREFIX):
        try:
            size = quantity_value(name.removeprefix(HUGEPAGES_PREFIX))
        except ValueError:
            size = Decimal(0)
        if size <= 0:
            return "must name a page size, such as hugepages-2Mi"
        return None
    prefix, slash, short = name.partition("/")
    if (
        slash
        and len(prefix) <= 253 - len(_RESERVED_RESOURCE_PREFIX)
        and DNS1123_SUBDOMAIN.fullmatch(prefix)
        and len(short) <= 63
        and LABEL_NAME.fullmatch(short)
        and _RESERVED_RESOURCE_DOMAIN not in name
        and not name.startswith(_RESERVED_RESOURCE_PREFIX)
    ):
        return None
    return (
        "is not a container resource name: must be cpu, memory, ephemeral-storage, "
        "hugepages-<size> or an extended resource <domain>/<name> (outside kubernetes.io)"
    )


def _parse_quantities(
    raw: object, path: str
) -> tuple[dict[str, tuple[str, Decimal]], list[FieldError]]:
    """Resource name -> (quantity as written, its value), for one of requests or limits."""
    if raw is None:
        return {}, []
    if not isinstance(raw, Mapping):
        return {}, [FieldError(path, "must be a mapping of resource name to quantity")]
    if len(raw) > MAX_RESOURCE_NAMES:
        return {}, [
            FieldError(path, f"must name at most {MAX_RESOURCE_NAMES} resources (got {len(raw)})")
        ]
    errors: list[FieldError] = []
    out: dict[str, tuple[str, Decimal]] = {}
    for key in sorted(raw, key=_key):
        value = raw[key]
        kpath = f"{path}.{_key(key)}"
        name_reason = resource_name_reason(key)
        if name_reason is not None:
            errors.append(FieldError(kpath, name_reason))
            continue
        assert isinstance(key, str)
        # Integers and floats are what YAML makes of 2 or 0.5; JSON numbers are valid
        # quantities in Kubernetes too.
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            errors.append(
                FieldError(kpath, f"must be a quantity such as 100m or 1Gi (got {_show(value)})")
            )
            continue
        text = value if isinstance(value, str) else _show(value)
        try:
            amount = quantity_value(text)
        except ValueError as exc:
            errors.append(
                FieldError(kpath, f"{_show(text)} {exc}: use a quantity such as 100m or 1Gi")
            )
            continue
        if amount < 0:
            errors.append(FieldError(kpath, f"must not be negative (got {text!r})"))
            continue
        if is_extended_resource(key) and amount != amount.to_integral_value():
            errors.append(FieldError(kpath, f"must be a whole number (got {text!r})"))
            continue
        if key.startswith(HUGEPAGES_PREFIX):
            page = quantity_value(key.removeprefix(HUGEPAGES_PREFIX))
            if _ceil(amount) % _ceil(page):
                errors.append(
                    FieldError(kpath, f"must be a multiple of the page size (got {text!r})")
                )
                continue
        out[key] = (text, amount)
    return out, errors


def _ceil(amount: Decimal) -> int:
    return int(amount.to_integral_value(rounding=decimal.ROUND_CEILING))


def _parse_resources(raw: object, ceilings: Ceilings) -> tuple[Resources | None, list[FieldError]]:
    """``spec.resources`` as given, checked as the API server checks a container's, and
    against the operator's per-pod ceilings; None (the defaults) when absent."""
    path = "spec.resources"
    if raw is None:
        return None, []
    if not isinstance(raw, Mapping):
        return None, [FieldError(path, "must be a mapping with requests and/or limits")]
    errors: list[FieldError] = []
    unknown = set(raw) - {"requests", "limits"}
    if unknown:
        errors.append(FieldError(path, _unknown_fields(unknown)))
    requests, req_errors = _parse_quantities(raw.get("requests"), f"{path}.requests")
    limits, lim_errors = _parse_quantities(raw.get("limits"), f"{path}.limits")
    errors += req_errors + lim_errors
    for key, (text, amount) in requests.items():
        kpath = f"{path}.requests.{key}"
        limit = limits.get(key)
        if _overcommittable(key):
            if limit is not None and amount > limit[1]:
                errors.append(
                    FieldError(
                        kpath,
                        f"request {text} is greater than limit {limit[0]}: pods would be refused",
                    )
                )
        elif limit is None:
            errors.append(
                FieldError(
                    f"{path}.limits.{key}",
                    f"is required when {key} is requested: Kubernetes never overcommits "
                    "hugepages or extended resources, so their limit must equal the request",
                )
            )
        elif amount != limit[1]:
            errors.append(
                FieldError(
                    kpath,
                    f"request {text} must equal limit {limit[0]}: Kubernetes never overcommits "
                    "hugepages or extended resources",
                )
            )
    names = set(requests) | set(limits)
    if any(n.startswith(HUGEPAGES_PREFIX) for n in names) and not names & {CPU, MEMORY}:
        errors.append(
            FieldError(path, "hugepages require a cpu or memory request or limit (Kubernetes)")
        )
    ceiling = {CPU: (ceilings.cpu, ENV_MAX_CPU), MEMORY: (ceilings.memory, ENV_MAX_MEMORY)}
    for kind, given in (("requests", requests), ("limits", limits)):
        for key, (most, setting) in ceiling.items():
            if key in given and given[key][1] > quantity_value(most):
                errors.append(
                    FieldError(
                        f"{path}.{kind}.{key}",
                        f"{given[key][0]} is above the operator's ceiling of {most} {key} per "
                        f"gateway pod (setting {setting})",
                    )
                )
    resources = Resources(
        requests=tuple((k, requests[k][0]) for k in sorted(requests)),
        limits=tuple((k, limits[k][0]) for k in sorted(limits)),
    )
    return resources, errors


def upstream_address_reason(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> str | None:
    """Why ``address`` may never be a gateway's upstream endpoint, or None if it may.

    Envoy connects from the gateway pod, inside the cluster network and on the node: loopback
    reaches the pod itself (Envoy's admin port), link-local and metadata addresses reach the
    node's cloud metadata server and credentials, and the rest cannot be a single peer.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "must not carry a zone index (%...): it names the gateway's own interface"
        if address.ipv4_mapped is not None:
            return f"is an IPv4-mapped IPv6 address: write {address.ipv4_mapped} itself"
    if address in METADATA_ADDRESSES:
        return "is a cloud metadata server address, which holds the node's credentials"
    if address.is_loopback:
        return "is a loopback address: it would point the gateway at itself"
    if address.is_link_local:
        return "is link-local: the node's own network, where metadata servers answer"
    if address.is_unspecified:
        return "is the unspecified address"
    if address.is_multicast or address == _IPV4_BROADCAST:
        return "is a multicast or broadcast address, not one upstream endpoint"
    return None


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
            errors.append(FieldError(f"{path}[{i}]", f"{_show(item)} is not an IP address"))
            continue
        reason = upstream_address_reason(addr)
        if reason is not None:
            errors.append(FieldError(f"{path}[{i}]", f"{_show(item)} {reason}"))
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
        errors.append(FieldError(f"spec.{key}", f"must be true or false (got {_show(value)})"))
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
        errors.append(FieldError(f"spec.{key}", f"must be an integer {bound} (got {_show(value)})"))
        return default
    return int(value)


def _parse_spec(
    raw: Mapping[str, Any], name: str, ceilings: Ceilings
) -> tuple[ExternalServiceSpec | None, list[FieldError]]:
    errors: list[FieldError] = []
    unknown = {k for k in raw if k not in _SPEC_FIELDS}
    if unknown:
        errors.append(FieldError("spec", _unknown_fields(unknown)))
    dns_name = raw.get("dnsName")
    name_errors = check_dns_name(dns_name)
    errors += name_errors
    if not name_errors and isinstance(dns_name, str):
        reason = upstream_name_reason(dns_name)
        if reason is not None:
            errors.append(FieldError("spec.dnsName", reason))
    ports, port_errors = _parse_ports(raw.get("ports"), name)
    errors += port_errors
    hijack = _bool(raw, "hijackDns", errors)
    min_replicas = _int(
        raw, "minReplicas", errors, default=DEFAULT_MIN_REPLICAS, low=1, high=MAX_INT32
    )
    max_replicas = _int(
        raw, "maxReplicas", errors, default=DEFAULT_MAX_REPLICAS, low=1, high=MAX_INT32
    )
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        errors.append(
            FieldError(
                "spec.maxReplicas",
                f"must be at least minReplicas ({min_replicas}) (got {max_replicas})",
            )
        )
    for key, value in (("minReplicas", min_replicas), ("maxReplicas", max_replicas)):
        if value is not None and value > ceilings.max_replicas:
            errors.append(
                FieldError(
                    f"spec.{key}",
                    f"{value} is above the operator's ceiling of {ceilings.max_replicas} "
                    f"replicas per gateway (setting {ENV_MAX_REPLICAS})",
                )
            )
    target_cpu = _int(
        raw, "targetCPUUtilizationPercentage", errors, default=DEFAULT_TARGET_CPU, low=1, high=100
    )
    resources, res_errors = _parse_resources(raw.get("resources"), ceilings)
    errors += res_errors
    ip_override, ip_errors = _parse_ip_override(raw.get("ipOverride"))
    errors += ip_errors
    max_conn = _int(raw, "envoyClusterMaxConnections", errors, default=None, low=0, high=MAX_UINT32)
    log_level = raw.get("envoyLogLevel")
    if log_level is not None and log_level not in ENVOY_LOG_LEVELS:
        errors.append(
            FieldError(
                "spec.envoyLogLevel",
                f"must be one of {', '.join(ENVOY_LOG_LEVELS)} (got {_show(log_level)})",
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
                f"must be a non-empty string of at most 63 characters (got {_show(topology)})",
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
            resources=resources if resources is not None else Resources(),
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
