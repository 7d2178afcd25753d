"""Kubernetes NetworkPolicy semantics (networking.k8s.io/v1), as pure functions.

Why: the access audit must say what the cluster will actually do with a packet, not what the
grant labels suggest. A grant label only opens the gateway's ingress; the client's own
namespace may still deny the egress (a default-deny policy that forgets the gateway namespace
silently breaks every grant there), and a namespace without any egress policy can bypass the
gateway altogether. Both halves follow from the same rules, implemented here once:

- A pod is *isolated* in a direction when at least one policy of its namespace selects it
  (``spec.podSelector``) and has that direction in ``policyTypes``. An unisolated direction
  allows everything; an isolated one allows exactly the union of the selecting policies' rules.
  Pods on the host network are never selected (policies do not apply to them).
- ``policyTypes`` defaults to ``[Ingress]``, plus ``Egress`` when the policy has at least one
  egress rule (the API server's defaulting; ``egress: []`` adds nothing).
- A connection from A to B needs A's egress *and* B's ingress to allow it.
- A rule matches when one of its peers matches and one of its ports matches; an empty or
  missing ``to``/``from`` matches every peer, an empty or missing ``ports`` every port.
- Peers: ``podSelector`` alone selects pods in the policy's own namespace;
  ``namespaceSelector`` alone every pod in the selected namespaces; both together the selected
  pods in the selected namespaces; ``{}`` selects everything. ``ipBlock`` matches an address in
  ``cidr`` and in none of ``except``. Selectors never match traffic that is not from or to a
  pod (an outside address, a host-network pod): only ipBlocks can.
- ipBlocks are matched against pod IPs too, as kube-router, Calico and Cilium do (the API
  leaves it to the implementation). A pod without an IP (not yet scheduled) matches no ipBlock.
- Selectors: ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist; NotIn
  and DoesNotExist match a pod without the key), all of them ANDed.
- Ports: ``protocol`` defaults to TCP; a missing ``port`` is every port of the protocol;
  ``endPort`` makes a range; a named port is resolved against the *destination* pod's
  declared container ports (name and protocol), and so never matches an outside address.
- Policies see the destination pod after the Service's address translation: the caller passes
  the pod and the Service's ``targetPort``, never the ClusterIP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, overload

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_T = TypeVar("_T")
PROTOCOLS = frozenset({"TCP", "UDP", "SCTP"})
# The API server sets this label on every namespace (since Kubernetes 1.22); policies select a
# namespace by name with it.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


class PolicyError(ValueError):
    """An object that is not a well-formed NetworkPolicy (the message names the field)."""


class Labels(Mapping[str, str]):
    """An immutable, hashable label map."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(items)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    @overload
    def get(self, key: str, /) -> str | None: ...
    @overload
    def get(self, key: str, /, default: str | _T) -> str | _T: ...
    def get(self, key: str, /, default: object = None) -> object:
        # Mapping's own get goes through __getitem__ and an exception: this is the hot path.
        return self._items.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._items == other._items
        return isinstance(other, Mapping) and self._items == dict(other.items())

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"


class Direction(StrEnum):
    INGRESS = "Ingress"
    EGRESS = "Egress"


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator is Operator.IN:
            return self.key in labels and labels[self.key] in self.values
        if self.operator is Operator.NOT_IN:
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator is Operator.EXISTS:
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True, slots=True)
class Selector:
    """A label selector; the empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(req.matches(labels) for req in self.expressions)

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.expressions

    @property
    def keys(self) -> frozenset[str]:
        """The label keys whose values (or absence) decide a match: nothing else matters."""
        return frozenset(k for k, _ in self.match_labels) | {r.key for r in self.expressions}


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, ip: IPAddress) -> bool:
        if ip.version != self.cidr.version or ip not in self.cidr:
            return False
        return not any(ip.version == e.version and ip in e for e in self.excepts)


@dataclass(frozen=True, slots=True)
class ContainerPort:
    """A port a pod declares (``spec.containers[].ports[]``): what named ports resolve to."""

    port: int
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a connection: a pod (``namespace`` set) or an address outside the cluster."""

    namespace: str | None
    labels: Labels = field(default_factory=Labels)
    namespace_labels: Labels = field(default_factory=Labels)
    ip: IPAddress | None = None
    ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False

    @classmethod
    def external(cls, ip: IPAddress) -> Endpoint:
        return cls(namespace=None, ip=ip)

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None and not self.host_network

    def named_port(self, name: str, protocol: str) -> int | None:
        for p in self.ports:
            if p.name == name and p.protocol == protocol:
                return p.port
        return None


@dataclass(frozen=True, slots=True)
class Peer:
    pods: Selector | None = None
    namespaces: Selector | None = None
    ip_block: IPBlock | None = None

    def matches(self, policy_namespace: str, other: Endpoint) -> bool:
        if self.ip_block is not None:
            return other.ip is not None and self.ip_block.contains(other.ip)
        if self.pods is None and self.namespaces is None:
            return False  # refused by API validation; match nothing rather than everything
        if not other.is_pod:
            return False
        if self.namespaces is None:
            if other.namespace != policy_namespace:
                return False
        elif not self.namespaces.matches(other.namespace_labels):
            return False
        return self.pods is None or self.pods.matches(other.labels)


@dataclass(frozen=True, slots=True)
class PortRule:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol; str: a named port
    end_port: int | None = None

    def matches(self, port: int, protocol: str, destination: Endpoint) -> bool:
        if protocol != self.protocol:
            return False
        if self.port is None:
            return True
        if isinstance(self.port, str):
            return destination.is_pod and destination.named_port(self.port, protocol) == port
        if self.end_port is not None:
            return self.port <= port <= self.end_port
        return port == self.port

    @property
    def named(self) -> bool:
        return isinstance(self.port, str)


@dataclass(frozen=True, slots=True)
class Rule:
    peers: tuple[Peer, ...] = ()  # empty: every peer
    ports: tuple[PortRule, ...] = ()  # empty: every port

    def matches_peer(self, policy_namespace: str, other: Endpoint) -> bool:
        return not self.peers or any(p.matches(policy_namespace, other) for p in self.peers)

    def matches_port(self, port: int, protocol: str, destination: Endpoint) -> bool:
        return not self.ports or any(p.matches(port, protocol, destination) for p in self.ports)


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: Selector
    types: frozenset[Direction]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    def selects(self, pod: Endpoint, direction: Direction) -> bool:
        return (
            direction in self.types
            and pod.is_pod
            and pod.namespace == self.namespace
            and self.pod_selector.matches(pod.labels)
        )

    def rules(self, direction: Direction) -> tuple[Rule, ...]:
        return self.ingress if direction is Direction.INGRESS else self.egress

    def peer_keys(self, direction: Direction) -> tuple[frozenset[str], frozenset[str]]:
        """(pod label keys, namespace label keys) this policy's peers look at in a direction:
        two peers agreeing on those (and on namespace and address) get the same verdict."""
        pods: set[str] = set()
        namespaces: set[str] = set()
        for rule in self.rules(direction):
            for peer in rule.peers:
                if peer.pods is not None:
                    pods |= peer.pods.keys
                if peer.namespaces is not None:
                    namespaces |= peer.namespaces.keys
        return frozenset(pods), frozenset(namespaces)

    @property
    def uses_ip_blocks(self) -> bool:
        return any(
            p.ip_block is not None for rule in self.ingress + self.egress for p in rule.peers
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether one direction allows a connection, and which policies decided it."""

    allowed: bool
    # The policies isolating the pod in this direction; empty: nothing restricts it.
    policies: tuple[str, ...] = ()
    # The first of them with a rule that matched (allowed and isolated).
    allowed_by: str = ""

    @property
    def isolated(self) -> bool:
        return bool(self.policies)


class PolicyIndex:
    """Policies by namespace, answering connection questions. Its only state besides the
    policies is a cache of which policies select which labels (a gateway namespace holds one
    policy per gateway, and every question about a gateway asks it again)."""

    __slots__ = ("_by_namespace", "_selecting")

    def __init__(self, policies: Iterable[NetworkPolicy]) -> None:
        by_namespace: dict[str, list[NetworkPolicy]] = {}
        for policy in policies:
            by_namespace.setdefault(policy.namespace, []).append(policy)
        self._by_namespace = {ns: tuple(ps) for ns, ps in by_namespace.items()}
        self._selecting: dict[tuple[str, Labels, Direction], tuple[NetworkPolicy, ...]] = {}

    def in_namespace(self, namespace: str) -> tuple[NetworkPolicy, ...]:
        return self._by_namespace.get(namespace, ())

    def selecting(self, pod: Endpoint, direction: Direction) -> tuple[NetworkPolicy, ...]:
        if not pod.is_pod or pod.namespace is None:
            return ()
        key = (pod.namespace, pod.labels, direction)
        found = self._selecting.get(key)
        if found is None:
            found = tuple(p for p in self.in_namespace(pod.namespace) if p.selects(pod, direction))
            self._selecting[key] = found
        return found

    def egress(self, source: Endpoint, destination: Endpoint, port: int, protocol: str) -> Verdict:
        """Does the source pod's egress allow ``destination`` on ``port``/``protocol``?"""
        return _decide(
            self.selecting(source, Direction.EGRESS),
            Direction.EGRESS,
            lambda rule, ns: (
                rule.matches_peer(ns, destination)
                and rule.matches_port(port, protocol, destination)
            ),
        )

    def ingress(self, destination: Endpoint, source: Endpoint, port: int, protocol: str) -> Verdict:
        """Does the destination pod's ingress admit ``source`` on ``port``/``protocol``?"""
        return _decide(
            self.selecting(destination, Direction.INGRESS),
            Direction.INGRESS,
            lambda rule, ns: (
                rule.matches_peer(ns, source) and rule.matches_port(port, protocol, destination)
            ),
        )

    def connection(
        self, source: Endpoint, destination: Endpoint, port: int, protocol: str
    ) -> tuple[Verdict, Verdict]:
        """(egress at the source, ingress at the destination): both must allow."""
        return (
            self.egress(source, destination, port, protocol),
            self.ingress(destination, source, port, protocol),
        )

    def egress_some_port(self, source: Endpoint, destination: Endpoint) -> bool:
        """Does the source's egress allow ``destination`` on at least one port and protocol?"""
        selecting = self.selecting(source, Direction.EGRESS)
        if not selecting:
            return True
        for policy in selecting:
            for rule in policy.egress:
                if not rule.matches_peer(policy.namespace, destination):
                    continue
                if not rule.ports or any(not p.named or destination.is_pod for p in rule.ports):
                    return True
        return False


def _decide(
    selecting: Sequence[NetworkPolicy],
    direction: Direction,
    matches: Callable[[Rule, str], bool],
) -> Verdict:
    if not selecting:
        return Verdict(True)
    names = tuple(sorted(p.name for p in selecting))
    for policy in selecting:
        for rule in policy.rules(direction):
            if matches(rule, policy.namespace):
                return Verdict(True, names, policy.name)
    return Verdict(False, names)


# -- parsing (the edge: plain dicts from the API server or a test) --------------------------


def parse_selector(raw: Any, where: str) -> Selector:
    if raw is None:
        return Selector()
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be a label selector object")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise PolicyError(f"{where}.matchLabels: must be a map")
    expressions: list[Requirement] = []
    for i, expr in enumerate(raw.get("matchExpressions") or []):
        path = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping) or not isinstance(expr.get("key"), str):
            raise PolicyError(f"{path}: must have a key")
        try:
            operator = Operator(str(expr.get("operator")))
        except ValueError:
            raise PolicyError(
                f"{path}.operator: must be In, NotIn, Exists or DoesNotExist "
                f"(got {expr.get('operator')!r})"
            ) from None
        values = expr.get("values") or []
        if operator in (Operator.IN, Operator.NOT_IN) and not values:
            raise PolicyError(f"{path}.values: {operator} needs at least one value")
        if operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
            raise PolicyError(f"{path}.values: {operator} takes no values")
        expressions.append(Requirement(expr["key"], operator, frozenset(map(str, values))))
    return Selector(tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(expressions))


def parse_network(text: Any, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        raise PolicyError(f"{where}: not a CIDR ({text!r})") from None


def _parse_peer(raw: Any, where: str) -> Peer:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be an object")
    block = raw.get("ipBlock")
    if block is not None:
        if raw.get("podSelector") is not None or raw.get("namespaceSelector") is not None:
            raise PolicyError(f"{where}: ipBlock excludes podSelector and namespaceSelector")
        if not isinstance(block, Mapping) or "cidr" not in block:
            raise PolicyError(f"{where}.ipBlock.cidr: required")
        cidr = parse_network(block["cidr"], f"{where}.ipBlock.cidr")
        excepts = tuple(
            parse_network(e, f"{where}.ipBlock.except[{i}]")
            for i, e in enumerate(block.get("except") or [])
        )
        return Peer(ip_block=IPBlock(cidr, excepts))
    pods = raw.get("podSelector")
    namespaces = raw.get("namespaceSelector")
    return Peer(
        pods=None if pods is None else parse_selector(pods, f"{where}.podSelector"),
        namespaces=None
        if namespaces is None
        else parse_selector(namespaces, f"{where}.namespaceSelector"),
    )


def _parse_port(raw: Any, where: str) -> PortRule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be an object")
    protocol = str(raw.get("protocol") or "TCP")
    if protocol not in PROTOCOLS:
        raise PolicyError(f"{where}.protocol: must be TCP, UDP or SCTP (got {protocol!r})")
    port = raw.get("port")
    end_port = raw.get("endPort")
    if port is not None and not isinstance(port, int | str):
        raise PolicyError(f"{where}.port: must be a number or a name")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if end_port is not None and (
        not isinstance(end_port, int) or not isinstance(port, int) or end_port < port
    ):
        raise PolicyError(f"{where}.endPort: needs a numeric port no greater than it")
    return PortRule(protocol, port, end_port)


def _parse_rules(raw: Any, peers_key: str, where: str) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for i, rule in enumerate(raw or []):
        path = f"{where}[{i}]"
        if not isinstance(rule, Mapping):
            raise PolicyError(f"{path}: must be an object")
        peers = tuple(
            _parse_peer(p, f"{path}.{peers_key}[{j}]")
            for j, p in enumerate(rule.get(peers_key) or [])
        )
        ports = tuple(
            _parse_port(p, f"{path}.ports[{j}]") for j, p in enumerate(rule.get("ports") or [])
        )
        rules.append(Rule(peers, ports))
    return tuple(rules)


def parse_network_policy(obj: Mapping[str, Any]) -> NetworkPolicy:
    """A NetworkPolicy from its API object, with the API server's defaulting of policyTypes."""
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace"), meta.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str):
        raise PolicyError("NetworkPolicy: metadata.namespace and metadata.name are required")
    where = f"NetworkPolicy {namespace}/{name}: spec"
    spec = obj.get("spec") or {}
    ingress = _parse_rules(spec.get("ingress"), "from", f"{where}.ingress")
    egress = _parse_rules(spec.get("egress"), "to", f"{where}.egress")
    raw_types = spec.get("policyTypes") or []
    if raw_types:
        try:
            types = frozenset(Direction(t) for t in raw_types)
        except ValueError:
            raise PolicyError(f"{where}.policyTypes: Ingress or Egress ({raw_types!r})") from None
    else:
        types = frozenset({Direction.INGRESS} | ({Direction.EGRESS} if egress else set()))
    return NetworkPolicy(
        namespace,
        name,
        parse_selector(spec.get("podSelector") or {}, f"{where}.podSelector"),
        types,
        ingress,
        egress,
    )
