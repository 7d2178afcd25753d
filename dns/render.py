"""Render CoreDNS rewrite rules from the live gateway Services. Pure and deterministic.

The original operator shipped a CoreDNS plugin; stock CoreDNS does the same with one rule per
hijacked name:

    rewrite stop name exact google.com google.egress-operator-system.svc.cluster.local

The question is rewritten to the gateway Service's cluster name, the ``kubernetes`` plugin
answers it with the ClusterIP (``rewrite`` always runs before it, whatever the line order), and
for ``exact`` rules CoreDNS rewrites the answer back so the client sees the name it asked for.

Guards: names inside the cluster domain, ``localhost``, reverse zones, single labels and
malformed names are never hijacked, and a name claimed by two ExternalServices goes to the
older one. Every refusal names the ExternalService and why, for its DnsHijacked condition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from reconcile.spec import check_dns_name

HEADER = "# Managed by egress-gateways: one rewrite per hijacked ExternalService. Do not edit.\n"
KEY_PREFIX = "egress-gateways-"
KEY_SUFFIX = ".override"
# A ConfigMap holds at most 1 MiB; stay well below, leaving room for metadata.
MAX_CONFIGMAP_BYTES = 900 * 1024
MAX_KEY_BYTES = 128 * 1024

REASON_DUPLICATE = "DuplicateDnsName"
REASON_FORBIDDEN = "ForbiddenDnsName"
REASON_CAPACITY = "DnsCapacityExceeded"

# Answered per node: hijacking them would hand a gateway's credentials to every granted pod.
NODE_LOCAL_NAMES = frozenset({"metadata.google.internal"})

_RULE = re.compile(r"^rewrite stop name exact (\S+) (\S+)$")


@dataclass(frozen=True, slots=True, order=True)
class Claim:
    """One gateway asking for its dnsName to be hijacked. Orders oldest first."""

    claimed_at: str  # the ExternalService's creationTimestamp (RFC 3339 sorts as text)
    name: str  # ExternalService (and Service) name
    dns_name: str


@dataclass(frozen=True, slots=True)
class Rule:
    dns_name: str
    target: str

    @property
    def line(self) -> str:
        return f"rewrite stop name exact {self.dns_name} {self.target}\n"


@dataclass
class Rendered:
    rules: list[Rule] = field(default_factory=list)
    granted: dict[str, str] = field(default_factory=dict)  # ExternalService -> dnsName
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (reason, message)
    data: dict[str, str] = field(default_factory=dict)  # ConfigMap data


class InvalidSnippet(ValueError):
    """A rendered snippet failed validation; it must never reach CoreDNS."""


def forbidden_reason(dns_name: str, cluster_domain: str) -> str | None:
    """Why ``dns_name`` may never be hijacked, or None if it may."""
    name = dns_name.lower().rstrip(".")
    domain = cluster_domain.lower().rstrip(".")
    if check_dns_name(name):
        return f"{dns_name!r} is not a valid external DNS name"
    if name == domain or name.endswith("." + domain):
        return f"{dns_name!r} is inside the cluster domain {domain!r}"
    if name == "localhost" or name.endswith(".localhost"):
        return f"{dns_name!r} is a localhost name"
    if name.endswith(".in-addr.arpa") or name.endswith(".ip6.arpa"):
        return f"{dns_name!r} is a reverse-lookup name"
    if name.endswith(".svc"):
        return f"{dns_name!r} is a partial cluster Service name"
    if name in NODE_LOCAL_NAMES:
        return f"{dns_name!r} names the node's metadata server"
    return None


def target_name(service: str, namespace: str, cluster_domain: str) -> str:
    return f"{service}.{namespace}.svc.{cluster_domain.rstrip('.')}"


def render(claims: list[Claim], namespace: str, cluster_domain: str) -> Rendered:
    """Grant each name to its oldest valid claim; shard the rules into ConfigMap keys."""
    out = Rendered()
    winners: dict[str, Claim] = {}
    for claim in sorted(claims):
        reason = forbidden_reason(claim.dns_name, cluster_domain)
        if reason is not None:
            out.refused[claim.name] = (REASON_FORBIDDEN, f"DNS is not hijacked: {reason}")
            continue
        holder = winners.get(claim.dns_name)
        if holder is not None:
            out.refused[claim.name] = (
                REASON_DUPLICATE,
                f"{claim.dns_name} is already hijacked for the older "
                f"ExternalService {holder.name!r}",
            )
            continue
        winners[claim.dns_name] = claim
    total = len(HEADER)
    for dns_name in sorted(winners):
        claim = winners[dns_name]
        rule = Rule(dns_name, target_name(claim.name, namespace, cluster_domain))
        if total + len(rule.line) > MAX_CONFIGMAP_BYTES:
            out.refused[claim.name] = (
                REASON_CAPACITY,
                f"the DNS ConfigMap is full ({MAX_CONFIGMAP_BYTES} bytes); "
                f"{dns_name} is not hijacked",
            )
            continue
        total += len(rule.line)
        out.rules.append(rule)
        out.granted[claim.name] = dns_name
    out.data = shard(out.rules)
    validate(out.data, namespace, cluster_domain)
    return out


def shard(rules: list[Rule]) -> dict[str, str]:
    """Split sorted rules into keys of at most MAX_KEY_BYTES, named in order."""
    data: dict[str, str] = {}
    current = HEADER
    index = 0
    for rule in rules:
        if len(current) + len(rule.line) > MAX_KEY_BYTES:
            data[f"{KEY_PREFIX}{index:03d}{KEY_SUFFIX}"] = current
            index += 1
            current = HEADER
        current += rule.line
    if rules:
        data[f"{KEY_PREFIX}{index:03d}{KEY_SUFFIX}"] = current
    return data


def validate(data: dict[str, str], namespace: str, cluster_domain: str) -> None:
    """Refuse anything but our own well-formed rules: a broken file would crash-loop CoreDNS."""
    seen: set[str] = set()
    suffix = f".{namespace}.svc.{cluster_domain.rstrip('.')}"
    for key, text in data.items():
        if not (key.startswith(KEY_PREFIX) and key.endswith(KEY_SUFFIX)):
            raise InvalidSnippet(f"unexpected key {key!r}")
        for number, line in enumerate(text.splitlines(), 1):
            if not line or line.startswith("#"):
                continue
            match = _RULE.match(line)
            if not match:
                raise InvalidSnippet(f"{key}:{number}: not a rewrite rule: {line!r}")
            source, target = match.groups()
            if forbidden_reason(source, cluster_domain):
                raise InvalidSnippet(f"{key}:{number}: {source!r} must not be hijacked")
            if not target.endswith(suffix) or check_dns_name(target):
                raise InvalidSnippet(f"{key}:{number}: {target!r} is not a gateway Service name")
            if source in seen:
                raise InvalidSnippet(f"{key}:{number}: {source!r} is rewritten twice")
            seen.add(source)
