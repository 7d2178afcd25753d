"""Render CoreDNS rewrite rules from the live gateway Services. Pure and deterministic.

The original operator shipped a CoreDNS plugin; stock CoreDNS does the same with one rule per
hijacked name:

    rewrite stop name exact google.com google.egress-operator-system.svc.cluster.local

The question is rewritten to the gateway Service's cluster name, the ``kubernetes`` plugin
answers it with the ClusterIP (``rewrite`` always runs before it, whatever the line order), and
for ``exact`` rules CoreDNS rewrites the answer back so the client sees the name it asked for.

Guards: names inside the cluster domain, ``localhost``, reverse zones, cloud metadata names
(the list is shared with the spec parser, which refuses them as upstreams), single labels and
malformed names are never hijacked, and a name claimed by two ExternalServices goes to the
older one. Every refusal names the ExternalService and why, for its DnsHijacked condition.

Where the rules go: while they fit in one ConfigMap (MAX_CONFIGMAP_BYTES) they all go to the
first, ``shards[0]``, keys ``egress-gateways-NNN.override``. Beyond that, with more than one
ConfigMap allowed, each rule goes to one of the others by a hash of its name
(``shards[1 + crc32(name) % (N - 1)]``, keys ``egress-gateways-sII-NNN.override``) and the
first holds none: a name's ConfigMap does not depend on the other names, so one change rewrites
one ConfigMap (and the first, where delivery commits; see dns.delivery), and the keys of all of
them are distinct files in the one directory CoreDNS imports. Capacity is per ConfigMap, oldest
claims first.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

from core.spec import check_dns_name, is_metadata_name

HEADER = "# Managed by egress-gateways: one rewrite per hijacked ExternalService. Do not edit.\n"
KEY_PREFIX = "egress-gateways-"
KEY_SUFFIX = ".override"
# A ConfigMap holds at most 1 MiB; stay well below, leaving room for metadata.
MAX_CONFIGMAP_BYTES = 900 * 1024
MAX_KEY_BYTES = 128 * 1024

# The settle marker: a key of its own holding one rule for a name that can never be asked for
# (RFC 6761 reserves .invalid). Every rules write leaves it out and a later quiet sync adds it,
# so each burst of writes ends with one more change of what CoreDNS imports; see
# dns.delivery for the CoreDNS race this closes.
SETTLE_KEY = f"{KEY_PREFIX}settled{KEY_SUFFIX}"
SETTLE_NAME = "settled.egress-gateways.invalid"
SETTLE_TEXT = (
    "# Managed by egress-gateways: makes CoreDNS reload once the rules are quiet. Do not edit.\n"
    f"rewrite stop name exact {SETTLE_NAME} {SETTLE_NAME}\n"
)

REASON_DUPLICATE = "DuplicateDnsName"
REASON_FORBIDDEN = "ForbiddenDnsName"
REASON_CAPACITY = "DnsCapacityExceeded"

_RULE = re.compile(r"^rewrite stop name exact (\S+) (\S+)$")


@dataclass(frozen=True, slots=True)
class Claim:
    """One gateway asking for its dnsName to be hijacked (``_age`` orders them oldest first)."""

    # When this gateway started to hold this name (hijack state turned true with this dnsName;
    # RFC 3339, sorts as text). Editing dnsName or hijackDns starts a new, younger claim.
    claimed_at: str
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
    data: dict[str, str] = field(default_factory=dict)  # every key of every ConfigMap
    # Data of each ConfigMap, the first one first (as many as allowed; unused ones are empty).
    shards: list[dict[str, str]] = field(default_factory=lambda: [{}])


class InvalidSnippet(ValueError):
    """A rendered snippet failed validation; it must never reach CoreDNS."""


# Namespaces every cluster has: "<service>.<namespace>" is a partial Service name that the
# pods' DNS search path completes, so such a name means something inside the cluster.
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
# Last labels of partial cluster names: "<svc>.<ns>.svc" and "<a-b-c-d>.<ns>.pod".
CLUSTER_SUFFIXES = frozenset({"svc", "pod"})
# Names that nodes and private resolvers answer, never the internet: cloud VMs' own names
# (GCE "<vm>.<zone>.c.<project>.internal", AWS "ip-<address>.ec2.internal" and
# "<region>.compute.internal", Azure "<vm>.internal.cloudapp.net" and "reddog.microsoft.com"),
# ICANN's private-use ".internal", mDNS ".local", RFC 8375 ".home.arpa" and ".localdomain".
# Hijacking one would send node-to-node or private traffic to a tenant's gateway.
PRIVATE_SUFFIXES = (
    "internal",
    "internal.cloudapp.net",
    "reddog.microsoft.com",
    "local",
    "localdomain",
    "home.arpa",
    "arpa",
)
# Endpoints the product itself needs from inside the cluster (the exporter publishes to Pub/Sub
# and gets its token through Workload Identity): a tenant must not be able to cut it off.
PRODUCT_NAMES = frozenset(
    {
        "pubsub.googleapis.com",
        "oauth2.googleapis.com",
        "sts.googleapis.com",
        "iamcredentials.googleapis.com",
    }
)


def forbidden_reason(
    dns_name: str, cluster_domain: str, namespaces: frozenset[str] = frozenset()
) -> str | None:
    """Why ``dns_name`` may never be hijacked, or None if it may.

    ``namespaces`` are namespaces of this installation (the gateway namespace, CoreDNS's) that
    count as partial Service names' second label, besides SYSTEM_NAMESPACES.
    """
    name = normalize_dns_name(dns_name)
    domain = normalize_dns_name(cluster_domain)
    labels = name.split(".")
    if check_dns_name(name):
        return f"{dns_name!r} is not a valid external DNS name"
    if name == domain or name.endswith("." + domain):
        return f"{dns_name!r} is inside the cluster domain {domain!r}"
    if name == "localhost" or name.endswith(".localhost"):
        return f"{dns_name!r} is a localhost name"
    if name.endswith(("in-addr.arpa", "ip6.arpa")):
        return f"{dns_name!r} is a reverse-lookup name"
    if labels[-1] in CLUSTER_SUFFIXES:
        return f"{dns_name!r} is a partial cluster Service or Pod name"
    if len(labels) == 2 and labels[1] in SYSTEM_NAMESPACES | namespaces:
        return f"{dns_name!r} is a partial cluster Service name (<service>.<namespace>)"
    if is_metadata_name(name):
        return f"{dns_name!r} names the node's metadata server"
    for suffix in PRIVATE_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return (
                f"{dns_name!r} is a private name (.{suffix}) that nodes, not the internet, answer"
            )
    if name in PRODUCT_NAMES:
        return f"{dns_name!r} is an endpoint the egress-gateway exporter itself needs"
    return None


def _age(claim: Claim) -> tuple[str, str]:
    """Oldest first; whole-second times (creationTimestamps of older versions) sort as ``.000000``
    so that they compare correctly with microsecond claim times."""
    at = claim.claimed_at
    if len(at) == 20 and at.endswith("Z"):
        at = at[:-1] + ".000000Z"
    return at, claim.name


def normalize_dns_name(dns_name: str) -> str:
    """The form names are compared and written in: DNS is case-insensitive, the root dot implied."""
    return dns_name.strip().lower().rstrip(".")


def target_name(service: str, namespace: str, cluster_domain: str) -> str:
    return f"{service}.{namespace}.svc.{cluster_domain.rstrip('.')}"


def shard_of(dns_name: str, shards: int) -> int:
    """The ConfigMap of a rule once the rules no longer fit in the first one (never 0)."""
    return 1 + zlib.crc32(dns_name.encode()) % (shards - 1)


def shard_key_prefix(index: int) -> str:
    return KEY_PREFIX if index == 0 else f"{KEY_PREFIX}s{index:02d}-"


def render(
    claims: list[Claim],
    namespace: str,
    cluster_domain: str,
    shards: int = 1,
    max_configmap_bytes: int = MAX_CONFIGMAP_BYTES,
) -> Rendered:
    """Grant each name to its oldest valid claim; spread the rules over ``shards`` ConfigMaps
    (see the module's docstring) and split each into keys."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    out = Rendered()
    winners: dict[str, Claim] = {}
    for claim in sorted(claims, key=_age):
        reason = forbidden_reason(claim.dns_name, cluster_domain, frozenset({namespace}))
        if reason is not None:
            out.refused[claim.name] = (REASON_FORBIDDEN, f"DNS is not hijacked: {reason}")
            continue
        dns_name = normalize_dns_name(claim.dns_name)
        holder = winners.get(dns_name)
        if holder is not None:
            out.refused[claim.name] = (
                REASON_DUPLICATE,
                f"{dns_name} is already hijacked for the older claim of "
                f"ExternalService {holder.name!r}",
            )
            continue
        winners[dns_name] = claim
    # Capacity goes to the oldest claims; the rules are then written sorted by name.
    by_age = [
        (claim, Rule(dns_name, target_name(claim.name, namespace, cluster_domain)))
        for dns_name, claim in sorted(winners.items(), key=lambda item: _age(item[1]))
    ]
    one = sum(len(rule.line) for _, rule in by_age) + len(HEADER) <= max_configmap_bytes
    spread = shards > 1 and not one
    totals = [len(HEADER)] * shards
    placed: list[list[Rule]] = [[] for _ in range(shards)]
    for claim, rule in by_age:
        index = shard_of(rule.dns_name, shards) if spread else 0
        if totals[index] + len(rule.line) > max_configmap_bytes:
            where = f"DNS ConfigMap {index} of {shards}" if spread else "the DNS ConfigMap"
            out.refused[claim.name] = (
                REASON_CAPACITY,
                f"{where} is full ({max_configmap_bytes} bytes); {rule.dns_name} is not hijacked",
            )
            continue
        totals[index] += len(rule.line)
        placed[index].append(rule)
        out.rules.append(rule)
        out.granted[claim.name] = rule.dns_name
    out.rules.sort(key=lambda rule: rule.dns_name)
    out.shards = [
        shard(sorted(rules, key=lambda rule: rule.dns_name), shard_key_prefix(index))
        for index, rules in enumerate(placed)
    ]
    out.data = {key: text for data in out.shards for key, text in data.items()}
    validate(out.data, namespace, cluster_domain)
    return out


def shard(rules: list[Rule], key_prefix: str = KEY_PREFIX) -> dict[str, str]:
    """Split sorted rules into keys of at most MAX_KEY_BYTES, named in order."""
    data: dict[str, str] = {}
    current = HEADER
    index = 0
    for rule in rules:
        if len(current) + len(rule.line) > MAX_KEY_BYTES:
            data[f"{key_prefix}{index:03d}{KEY_SUFFIX}"] = current
            index += 1
            current = HEADER
        current += rule.line
    if rules:
        data[f"{key_prefix}{index:03d}{KEY_SUFFIX}"] = current
    return data


def settled(data: dict[str, str]) -> dict[str, str]:
    """The rules with the settle marker added."""
    return {**data, SETTLE_KEY: SETTLE_TEXT}


def rules_only(data: dict[str, str]) -> dict[str, str]:
    """The rules without the settle marker."""
    return {key: text for key, text in data.items() if key != SETTLE_KEY}


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
            if forbidden_reason(source, cluster_domain, frozenset({namespace})):
                raise InvalidSnippet(f"{key}:{number}: {source!r} must not be hijacked")
            if not target.endswith(suffix) or check_dns_name(target):
                raise InvalidSnippet(f"{key}:{number}: {target!r} is not a gateway Service name")
            if source in seen:
                raise InvalidSnippet(f"{key}:{number}: {source!r} is rewritten twice")
            seen.add(source)
