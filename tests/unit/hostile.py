"""ExternalServices a hostile tenant might write, refused by both the CRD and the reconciler.

One table, three consumers, so that the two lines of defence cannot drift apart:
``tests/unit/test_spec.py`` (the parser names the field and why), ``tests/unit/test_crd.py``
(schema cases fail the offline JSON Schema; CEL cases pass it and their message is one of the
CRD's rules) and ``tests/integration/test_hostile_crd.py`` (the real API server refuses each).
The parser and the API server report some problems on different paths (a CEL rule on a map
reports the map), hence two field columns.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

# The API server's own words for schema failures.
PATTERN = "in body should match"
TOO_LONG = "may not be more than 64"
INT32 = "less than or equal to 2147483647"

# CEL rule messages (substrings of the CRD's).
METADATA_NAME = "must not name a cloud metadata server"
LOCALHOST = "must not be a localhost name"
PLAIN_IP = "must be plain IP addresses"
NOT_UPSTREAM = "must not be a loopback, link-local, unspecified, multicast or broadcast"
METADATA_IP = "must not be a cloud metadata server address"
RESOURCE_NAME = "resource names must be cpu, memory, ephemeral-storage"
WHOLE = "must be whole numbers"
NO_OVERCOMMIT = "need a resources.limits entry equal to the request"
HUGEPAGES = "hugepages must also request or limit cpu or memory"


@dataclass(frozen=True)
class Hostile:
    id: str
    spec: dict[str, Any]  # merged into a minimal valid spec
    field: str  # where the reconciler reports it
    words: str  # what its reason says
    crd_field: str  # where the API server reports it
    crd_message: str  # a substring of the API server's message
    cel: bool = False  # only a CEL rule refuses it (the structural schema accepts it)
    name: str = "hostile"
    # Never sent to an API server: some values cost it minutes of CPU (a request times out).
    offline_only: bool = False

    def manifest(self, name: str | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"dnsName": "example.com", "ports": [{"port": 443}]}
        spec.update(copy.deepcopy(self.spec))
        return {
            "apiVersion": "egress.monzo.com/v1",
            "kind": "ExternalService",
            "metadata": {"name": name or self.name},
            "spec": spec,
        }


def _limits(**quantities: Any) -> dict[str, Any]:
    return {"resources": {"limits": quantities}}


def _ip(address: str) -> dict[str, Any]:
    return {"ipOverride": [address]}


def _dns(name: str) -> dict[str, Any]:
    return {"dnsName": name}


HOSTILE: list[Hostile] = [
    # 1. replicas past int32
    Hostile(
        "max-replicas-over-int32",
        {"maxReplicas": 2**31},
        "spec.maxReplicas",
        "2147483647",
        "spec.maxReplicas",
        INT32,
    ),
    Hostile(
        "min-replicas-over-int32",
        {"minReplicas": 2**31, "maxReplicas": 2**31},
        "spec.minReplicas",
        "2147483647",
        "spec.minReplicas",
        INT32,
    ),
    # 4. upstreams that reach the pod itself, the node or a metadata server
    Hostile(
        "dns-metadata-google",
        _dns("metadata.google.internal"),
        "spec.dnsName",
        "metadata server",
        "spec.dnsName",
        METADATA_NAME,
        cel=True,
    ),
    Hostile(
        "dns-metadata-goog",
        _dns("metadata.goog"),
        "spec.dnsName",
        "metadata server",
        "spec.dnsName",
        METADATA_NAME,
        cel=True,
    ),
    Hostile(
        "dns-instance-data-ec2",
        _dns("instance-data.ec2.internal"),
        "spec.dnsName",
        "metadata server",
        "spec.dnsName",
        METADATA_NAME,
        cel=True,
    ),
    Hostile(
        "dns-instance-data-regional",
        _dns("instance-data.eu-west-1.compute.internal"),
        "spec.dnsName",
        "metadata server",
        "spec.dnsName",
        METADATA_NAME,
        cel=True,
    ),
    Hostile(
        "dns-metadata-tencent",
        _dns("metadata.tencentyun.com"),
        "spec.dnsName",
        "metadata server",
        "spec.dnsName",
        METADATA_NAME,
        cel=True,
    ),
    Hostile(
        "dns-localhost",
        _dns("admin.localhost"),
        "spec.dnsName",
        "localhost",
        "spec.dnsName",
        LOCALHOST,
        cel=True,
    ),
    Hostile(
        "dns-trailing-newline",
        _dns("example.com\n"),
        "spec.dnsName",
        "RFC 1123",
        "spec.dnsName",
        PATTERN,
    ),
    Hostile(
        "ip-metadata-v4",
        _ip("169.254.169.254"),
        "spec.ipOverride[0]",
        "metadata server",
        "spec.ipOverride[0]",
        METADATA_IP,
        cel=True,
    ),
    Hostile(
        "ip-metadata-ec2-v6",
        _ip("fd00:ec2::254"),
        "spec.ipOverride[0]",
        "metadata server",
        "spec.ipOverride[0]",
        METADATA_IP,
        cel=True,
    ),
    Hostile(
        "ip-metadata-ec2-v6-uppercase",
        _ip("FD00:EC2::254"),
        "spec.ipOverride[0]",
        "metadata server",
        "spec.ipOverride[0]",
        METADATA_IP,
        cel=True,
    ),
    Hostile(
        "ip-metadata-alibaba",
        _ip("100.100.100.200"),
        "spec.ipOverride[0]",
        "metadata server",
        "spec.ipOverride[0]",
        METADATA_IP,
        cel=True,
    ),
    Hostile(
        "ip-azure-wireserver",
        _ip("168.63.129.16"),
        "spec.ipOverride[0]",
        "metadata server",
        "spec.ipOverride[0]",
        METADATA_IP,
        cel=True,
    ),
    Hostile(
        "ip-loopback-v4",
        _ip("127.0.0.1"),
        "spec.ipOverride[0]",
        "loopback",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-loopback-v4-not-first",
        _ip("127.1.2.3"),
        "spec.ipOverride[0]",
        "loopback",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-loopback-v6",
        _ip("::1"),
        "spec.ipOverride[0]",
        "loopback",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-link-local-v4",
        _ip("169.254.0.1"),
        "spec.ipOverride[0]",
        "link-local",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-link-local-v6",
        _ip("fe80::1"),
        "spec.ipOverride[0]",
        "link-local",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-unspecified-v6",
        _ip("::"),
        "spec.ipOverride[0]",
        "unspecified",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-multicast-v4",
        _ip("224.0.0.251"),
        "spec.ipOverride[0]",
        "multicast",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-multicast-v6",
        _ip("ff02::1"),
        "spec.ipOverride[0]",
        "multicast",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-broadcast",
        _ip("255.255.255.255"),
        "spec.ipOverride[0]",
        "broadcast",
        "spec.ipOverride[0]",
        NOT_UPSTREAM,
        cel=True,
    ),
    Hostile(
        "ip-scope-id",
        _ip("fe80::1%eth0"),
        "spec.ipOverride[0]",
        "zone index",
        "spec.ipOverride[0]",
        PLAIN_IP,
    ),
    Hostile(
        "ip-v4-mapped-metadata",
        _ip("::ffff:169.254.169.254"),
        "spec.ipOverride[0]",
        "IPv4-mapped",
        "spec.ipOverride[0]",
        PLAIN_IP,
        cel=True,
    ),
    # 5. quantities and resource names Kubernetes would not take
    Hostile(
        "quantity-nan",
        _limits(cpu="NaN"),
        "spec.resources.limits.cpu",
        "not a Kubernetes quantity",
        "spec.resources.limits.cpu",
        PATTERN,
    ),
    Hostile(
        "quantity-signalling-nan",
        _limits(memory="sNaN"),
        "spec.resources.limits.memory",
        "not a Kubernetes quantity",
        "spec.resources.limits.memory",
        PATTERN,
    ),
    Hostile(
        "quantity-infinity",
        {"resources": {"requests": {"memory": "Infinity"}}},
        "spec.resources.requests.memory",
        "not a Kubernetes quantity",
        "spec.resources.requests.memory",
        PATTERN,
    ),
    Hostile(
        "quantity-inf",
        _limits(cpu="inf"),
        "spec.resources.limits.cpu",
        "not a Kubernetes quantity",
        "spec.resources.limits.cpu",
        PATTERN,
    ),
    Hostile(
        "quantity-empty",
        _limits(cpu=""),
        "spec.resources.limits.cpu",
        "empty",
        "spec.resources.limits.cpu",
        PATTERN,
    ),
    Hostile(
        "quantity-overlong",
        _limits(memory="1" * 65),
        "spec.resources.limits.memory",
        "longer than 64",
        "spec.resources.limits.memory",
        TOO_LONG,
    ),
    Hostile(
        "quantity-fractional-exponent",
        _limits(cpu="1e1.5"),
        "spec.resources.limits.cpu",
        "not a Kubernetes quantity",
        "spec.resources.limits.cpu",
        PATTERN,
    ),
    Hostile(
        "quantity-long-exponent",  # the API server spends minutes on it: never send it
        _limits(**{"example.com/dongle": "1e999999999"}),
        "spec.resources.limits.example.com/dongle",
        "not a Kubernetes quantity",
        "spec.resources.limits.example.com/dongle",
        PATTERN,
        offline_only=True,
    ),
    Hostile(
        "quantity-exponent-past-int32",
        _limits(cpu="1e4294967296"),
        "spec.resources.limits.cpu",
        "not a Kubernetes quantity",
        "spec.resources.limits.cpu",
        PATTERN,
    ),
    Hostile(
        "quantity-underscore",
        _limits(memory="1_000"),
        "spec.resources.limits.memory",
        "not a Kubernetes quantity",
        "spec.resources.limits.memory",
        PATTERN,
    ),
    Hostile(
        "quantity-space",
        _limits(memory=" 1Gi"),
        "spec.resources.limits.memory",
        "not a Kubernetes quantity",
        "spec.resources.limits.memory",
        PATTERN,
    ),
    Hostile(
        "quantity-arabic-digit",
        _limits(cpu="\u0661"),
        "spec.resources.limits.cpu",
        "not a Kubernetes quantity",
        "spec.resources.limits.cpu",
        PATTERN,
    ),
    Hostile(
        "quantity-lowercase-ki",
        _limits(memory="1ki"),
        "spec.resources.limits.memory",
        "not a Kubernetes quantity",
        "spec.resources.limits.memory",
        PATTERN,
    ),
    Hostile(
        "resource-unknown",
        _limits(gpu="1"),
        "spec.resources.limits.gpu",
        "container resource name",
        "spec.resources.limits",
        RESOURCE_NAME,
        cel=True,
    ),
    Hostile(
        "resource-kubernetes-io",
        _limits(**{"example.kubernetes.io/thing": "1"}),
        "spec.resources.limits.example.kubernetes.io/thing",
        "container resource name",
        "spec.resources.limits",
        RESOURCE_NAME,
        cel=True,
    ),
    Hostile(
        "resource-quota-form",
        _limits(**{"requests.example.com/thing": "1"}),
        "spec.resources.limits.requests.example.com/thing",
        "container resource name",
        "spec.resources.limits",
        RESOURCE_NAME,
        cel=True,
    ),
    Hostile(
        "resource-hugepages-no-size",
        _limits(**{"hugepages-huge": "2Mi", "memory": "1Gi"}),
        "spec.resources.limits.hugepages-huge",
        "page size",
        "spec.resources.limits",
        RESOURCE_NAME,
        cel=True,
    ),
    Hostile(
        "extended-request-without-limit",
        {"resources": {"requests": {"example.com/dongle": "1"}}},
        "spec.resources.limits.example.com/dongle",
        "is required",
        "spec.resources",
        NO_OVERCOMMIT,
        cel=True,
    ),
    Hostile(
        "extended-request-below-limit",
        {"resources": {"requests": {"example.com/dongle": 1}, "limits": {"example.com/dongle": 2}}},
        "spec.resources.requests.example.com/dongle",
        "must equal limit",
        "spec.resources",
        NO_OVERCOMMIT,
        cel=True,
    ),
    Hostile(
        "extended-fraction",
        _limits(**{"example.com/dongle": "500m"}),
        "spec.resources.limits.example.com/dongle",
        "whole number",
        "spec.resources.limits",
        WHOLE,
        cel=True,
    ),
    Hostile(
        "hugepages-alone",
        _limits(**{"hugepages-2Mi": "4Mi"}),
        "spec.resources",
        "cpu or memory",
        "spec.resources",
        HUGEPAGES,
        cel=True,
    ),
    Hostile(
        "too-many-resource-names",
        {"resources": {"limits": {f"r{i}.example.com/thing": "1" for i in range(17)}}},
        "spec.resources.limits",
        "at most 16",
        "spec.resources.limits",
        "must have at most 16",
    ),
]
