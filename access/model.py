"""Who can reach which gateway, on which ports, and who could go around it: the access audit.

Why: a grant label is only half of a path. The gateway's NetworkPolicy admits labelled pods,
but the client's own namespace decides whether its pods may send to the gateway at all (a
default-deny egress policy that forgets the gateway namespace silently breaks every grant in
it), and whether they could skip the gateway and reach the internet directly (no default-deny
egress: the gateway is bypassable). This module answers from live state exactly as the
cluster's NetworkPolicy enforcement will (``access.policy``), per workload rather than per pod.

Reading (``snapshot_from_kube``) is the only I/O: one paginated LIST per kind, like the sweep
(pods and NetworkPolicies across all namespaces, namespaces, ExternalServices, our gateway
Services; ReplicaSets and Jobs only when some pod is owned by one, to name the Deployment or
CronJob behind it). The rest is pure: ``Snapshot.from_objects`` builds the same snapshot from
plain dicts, and ``audit`` turns it into rows and findings.

Decisions, each the closest answer to what the packets will do:

- **Workloads.** Pods are grouped by namespace and controller: a ReplicaSet's pods under its
  Deployment, a Job's under its CronJob (from ownerReferences and the listed ReplicaSets and
  Jobs), StatefulSet and DaemonSet pods under themselves, a pod without a controller (or a
  static pod, owned by its Node) as a bare ``Pod``. A row counts the workload's pods and how
  many can reach; booleans are true when at least one pod is (a rollout can mix old and new
  labels; the ``partial-access`` finding says so). The gateway pods are not workloads.
- **Reaching a gateway** (``policy_allows``) means the client pod's egress policies allow the
  gateway pods on the Service's ``targetPort`` and the ingress policies selecting the gateway
  pods (ours and any other) admit the client there, for every gateway pod (the Service picks
  one per connection). ``reachable`` also needs the gateway's Service to expose the port: it
  is what a connection to the gateway will do. A grant is either label form the gateway's
  NetworkPolicy admits; a pod that is admitted without one (another policy opens the gateway)
  is reported, not hidden.
- **A gateway without pods** (scaled down, not yet scheduled) is judged against the pod its
  Deployment would create: the gateway labels in the gateway namespace, the declared ports,
  and, for ipBlock rules, the IP of another gateway pod if there is one (pod IPs come from the
  same pod CIDR), else no IP (no ipBlock matches it).
- **Direct egress** (``direct``): DNS is never resolved (the audit must not depend on the
  auditor's resolver, and CDN addresses change). Instead the client's egress policies are asked
  about a representative public address, ``192.0.2.1`` (TEST-NET-1, RFC 5737: outside every
  cluster, pod and service range in practice), on the ExternalService's port, and about each of
  its ``ipOverride`` addresses. A policy that allows some public ranges but not 192.0.2.1 (an
  allow-list of one provider's addresses) is therefore not reported as a bypass unless those
  addresses are ipOverrides; ``audit(snapshot, probes=[PUBLIC_PROBE, ...])`` (it replaces the
  default) and ``egressctl access --probe IP`` (it adds) test more addresses. A workload's
  ``direct_egress`` is the same question about the probes on any port.
- **Host-network pods** are not subject to NetworkPolicy (their egress is the node's); as
  clients they appear to the gateway with the node's address, so only an ipBlock can admit
  them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from access.policy import (
    NAMESPACE_NAME_LABEL,
    ContainerPort,
    Direction,
    Endpoint,
    IPAddress,
    Labels,
    NetworkPolicy,
    PolicyIndex,
    parse_network_policy,
)
from core import constants as c
from core.kube import (
    EXTERNAL_SERVICE,
    JOB,
    NAMESPACE,
    NETWORK_POLICY,
    POD,
    REPLICA_SET,
    SERVICE,
    Kube,
)
from core.settings import DEFAULT_GATEWAY_NAMESPACE, Settings

# Listed objects, only read here (``core.kube.Obj`` as the audit sees it).
ObjView = Mapping[str, Any]

# A public address no cluster uses (TEST-NET-1, RFC 5737): "can this pod reach the internet?"
PUBLIC_PROBE: IPAddress = ipaddress.ip_address("192.0.2.1")

FORM_PER_GATEWAY = "allowed-<name>"  # egress.monzo.com/allowed-<name>: "true"
FORM_GATEWAY = "allowed-gateway"  # egress.monzo.com/allowed-gateway: <name>
PROTOCOLS = ("TCP", "UDP")
# Controllers whose own controller names the workload (Deployment, CronJob).
INTERMEDIATE_KINDS = frozenset({"ReplicaSet", "Job"})


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


SEVERITY_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


class Code(StrEnum):
    UNKNOWN_GATEWAY = "unknown-gateway"
    GRANT_VALUE_IGNORED = "grant-value-ignored"
    ALLOWED_GATEWAY_FORM = "allowed-gateway-form"
    GRANT_BLOCKED = "grant-blocked"
    NO_DEFAULT_DENY = "no-default-deny"
    UNREACHABLE_GATEWAY = "unreachable-gateway"
    UNGRANTED_ACCESS = "ungranted-access"
    PARTIAL_ACCESS = "partial-access"
    GATEWAY_NOT_DEPLOYED = "gateway-not-deployed"
    GATEWAY_WITHOUT_PODS = "gateway-without-pods"


# -- the snapshot ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class WorkloadKey:
    namespace: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.kind}/{self.name}"


@dataclass(frozen=True, slots=True)
class OwnerRef:
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    labels: Labels
    ip: IPAddress | None = None
    host_network: bool = False
    ports: tuple[ContainerPort, ...] = ()
    owner: OwnerRef | None = None


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Labels


@dataclass(frozen=True, slots=True)
class OwnerLink:
    """A ReplicaSet or Job and the controller that owns it (a Deployment, a CronJob)."""

    namespace: str
    kind: str
    name: str
    parent: OwnerRef


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    protocol: str
    target: int | str


@dataclass(frozen=True, slots=True)
class GatewayService:
    name: str
    selector: Labels
    ports: tuple[ServicePort, ...]

    def port(self, port: int, protocol: str) -> ServicePort | None:
        for p in self.ports:
            if p.port == port and p.protocol == protocol:
                return p
        return None


@dataclass(frozen=True, slots=True)
class ExternalServiceInfo:
    """What the audit needs of an ExternalService, read leniently: an invalid object still has
    a name and may still have a gateway running (its last good one)."""

    name: str
    dns_name: str = ""
    ports: tuple[tuple[int, str], ...] = ()
    ip_override: tuple[IPAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Live state the audit reads, parsed. Build it with ``snapshot_from_kube`` or
    ``Snapshot.from_objects``."""

    gateway_namespace: str
    namespaces: tuple[Namespace, ...]
    pods: tuple[Pod, ...]  # every pod but the gateways'
    gateway_pods: tuple[Pod, ...]
    policies: tuple[NetworkPolicy, ...]
    external_services: tuple[ExternalServiceInfo, ...]
    services: tuple[GatewayService, ...]
    owners: tuple[OwnerLink, ...] = ()

    @classmethod
    def from_objects(
        cls,
        *,
        pods: Iterable[ObjView] = (),
        namespaces: Iterable[ObjView] = (),
        policies: Iterable[ObjView] = (),
        external_services: Iterable[ObjView] = (),
        services: Iterable[ObjView] = (),
        gateway_pods: Iterable[ObjView] = (),
        owners: Iterable[ObjView] = (),
        gateway_namespace: str = DEFAULT_GATEWAY_NAMESPACE,
    ) -> Snapshot:
        """A snapshot from API objects as plain dicts.

        ``pods`` may include gateway pods (recognised by their labels in the gateway
        namespace), or pass them as ``gateway_pods``. ``owners`` are the ReplicaSet and Job
        objects (``kind`` set) whose ownerReferences name the Deployments and CronJobs behind
        pods; a pod whose ReplicaSet or Job is missing there is reported under that ReplicaSet
        or Job. ``services`` are the gateway Services in the gateway namespace (others are
        ignored).
        """
        workload_pods: list[Pod] = []
        gateways: dict[tuple[str, str], Pod] = {}
        for obj in [*pods, *gateway_pods]:
            pod = parse_pod(obj)
            if _is_gateway_pod(pod, gateway_namespace):
                gateways[(pod.namespace, pod.name)] = pod
            else:
                workload_pods.append(pod)
        return cls(
            gateway_namespace=gateway_namespace,
            namespaces=tuple(parse_namespace(o) for o in namespaces),
            pods=tuple(workload_pods),
            gateway_pods=tuple(gateways.values()),
            policies=tuple(parse_network_policy(o) for o in policies),
            external_services=tuple(parse_external_service_info(o) for o in external_services),
            services=tuple(
                parse_gateway_service(o)
                for o in services
                if _is_gateway_service(o, gateway_namespace)
            ),
            owners=tuple(link for o in owners if (link := parse_owner_link(o)) is not None),
        )


def snapshot_from_kube(kube: Kube, settings: Settings) -> Snapshot:
    """Read the snapshot from the API server: one paginated LIST per kind, nothing else.

    ReplicaSets and Jobs are listed only when some pod is owned by one. Works with any identity
    that may list these kinds (``infra/rbac/auditor.yaml``); the lists are not one atomic
    view, which an audit of a moving cluster can live with.
    """
    namespace = settings.gateway_namespace
    external_services, _ = kube.list_all(EXTERNAL_SERVICE)
    namespaces, _ = kube.list_all(NAMESPACE)
    policies, _ = kube.list_all(NETWORK_POLICY)
    services, _ = kube.list_all(SERVICE, namespace, label_selector=c.LABEL_GATEWAY)
    pods, _ = kube.list_all(POD)
    owner_kinds = {ref.get("kind") for p in pods for ref in _owner_refs(p)}
    owners: list[ObjView] = []
    if "ReplicaSet" in owner_kinds:
        owners += kube.list_all(REPLICA_SET)[0]
    if "Job" in owner_kinds:
        owners += kube.list_all(JOB)[0]
    return Snapshot.from_objects(
        pods=pods,
        namespaces=namespaces,
        policies=policies,
        external_services=external_services,
        services=services,
        owners=owners,
        gateway_namespace=namespace,
    )


# -- parsing ------------------------------------------------------------------------------------


def _meta(obj: ObjView) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: ObjView) -> Labels:
    raw = _meta(obj).get("labels") or {}
    return (
        Labels({str(k): str(v) for k, v in raw.items()}) if isinstance(raw, Mapping) else Labels()
    )


def _owner_refs(obj: ObjView) -> list[Mapping[str, Any]]:
    refs = _meta(obj).get("ownerReferences") or []
    return [r for r in refs if isinstance(r, Mapping)] if isinstance(refs, list) else []


def _controller(obj: ObjView) -> OwnerRef | None:
    refs = _owner_refs(obj)
    chosen = next((r for r in refs if r.get("controller")), None)
    if chosen is None:
        return None
    return OwnerRef(str(chosen.get("kind", "")), str(chosen.get("name", "")))


def _ip(text: Any) -> IPAddress | None:
    try:
        return ipaddress.ip_address(str(text)) if text else None
    except ValueError:
        return None


def parse_pod(obj: ObjView) -> Pod:
    meta = _meta(obj)
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    ports: list[ContainerPort] = []
    for container in spec.get("containers") or []:
        for p in (container or {}).get("ports") or []:
            if isinstance(p, Mapping) and isinstance(p.get("containerPort"), int):
                ports.append(
                    ContainerPort(
                        p["containerPort"],
                        str(p.get("protocol") or "TCP"),
                        str(p.get("name") or ""),
                    )
                )
    return Pod(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        labels=_labels(obj),
        ip=_ip(status.get("podIP")),
        host_network=bool(spec.get("hostNetwork")),
        ports=tuple(ports),
        owner=_controller(obj),
    )


def parse_namespace(obj: ObjView) -> Namespace:
    name = str(_meta(obj).get("name", ""))
    # The API server always sets this label; objects written by hand may lack it.
    return Namespace(name, Labels({NAMESPACE_NAME_LABEL: name, **_labels(obj)}))


def parse_owner_link(obj: ObjView) -> OwnerLink | None:
    parent = _controller(obj)
    kind = str(obj.get("kind", ""))
    if parent is None or kind not in INTERMEDIATE_KINDS:
        return None
    meta = _meta(obj)
    return OwnerLink(str(meta.get("namespace", "")), kind, str(meta.get("name", "")), parent)


def parse_gateway_service(obj: ObjView) -> GatewayService:
    spec = obj.get("spec") or {}
    ports: list[ServicePort] = []
    for p in spec.get("ports") or []:
        if not isinstance(p, Mapping) or not isinstance(p.get("port"), int):
            continue
        target = p.get("targetPort", p["port"])
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        ports.append(ServicePort(p["port"], str(p.get("protocol") or "TCP"), target))
    selector = spec.get("selector") or {}
    return GatewayService(
        str(_meta(obj).get("name", "")),
        Labels({str(k): str(v) for k, v in selector.items()}),
        tuple(ports),
    )


def parse_external_service_info(obj: ObjView) -> ExternalServiceInfo:
    spec = obj.get("spec") or {}
    ports: list[tuple[int, str]] = []
    for p in spec.get("ports") or []:
        if not isinstance(p, Mapping):
            continue
        port, protocol = p.get("port"), str(p.get("protocol") or "TCP")
        if not isinstance(port, int) or not 1 <= port <= 65535 or protocol not in PROTOCOLS:
            continue
        if (port, protocol) not in ports:
            ports.append((port, protocol))
    overrides = tuple(ip for raw in spec.get("ipOverride") or [] if (ip := _ip(raw)) is not None)
    return ExternalServiceInfo(
        name=str(_meta(obj).get("name", "")),
        dns_name=str(spec.get("dnsName", "")),
        ports=tuple(ports),
        ip_override=overrides,
    )


def _is_gateway_pod(pod: Pod, gateway_namespace: str) -> bool:
    return (
        pod.namespace == gateway_namespace
        and c.LABEL_GATEWAY in pod.labels
        and pod.labels.get(c.LABEL_APP) == c.APP_VALUE
    )


def _is_gateway_service(obj: ObjView, gateway_namespace: str) -> bool:
    meta = _meta(obj)
    return meta.get("namespace", gateway_namespace) == gateway_namespace and _labels(obj).get(
        c.LABEL_GATEWAY
    ) == meta.get("name")


def gateway_pod_labels(name: str) -> Labels:
    """The labels the gateway's Deployment gives its pods (gateway.render.gateway_labels)."""
    return Labels({c.LABEL_APP: c.APP_VALUE, c.LABEL_GATEWAY: name})


def grant_form(labels: Mapping[str, str], gateway: str) -> str:
    """Which grant form in ``labels`` the gateway's NetworkPolicy admits, or "" for none."""
    if labels.get(c.grant_label(gateway)) == c.GRANT_LABEL_VALUE:
        return FORM_PER_GATEWAY
    if labels.get(c.GRANT_LABEL_GATEWAY) == gateway:
        return FORM_GATEWAY
    return ""


# -- the answer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One workload and one port of one ExternalService."""

    namespace: str
    kind: str
    name: str
    external_service: str
    port: int
    protocol: str
    granted: bool  # a pod carries a grant label for this gateway
    grant_form: str  # FORM_PER_GATEWAY, FORM_GATEWAY or ""
    policy_allows: bool  # client egress allows the gateway pods and their ingress admits it
    reachable: bool  # policy_allows and the gateway's Service exposes the port
    direct: bool  # the client's egress also allows the destination without the gateway
    egress_allows: bool = False  # the client half of policy_allows
    ingress_allows: bool = False  # the gateway half of policy_allows
    pods: int = 0
    pods_reachable: int = 0

    @property
    def workload(self) -> WorkloadKey:
        return WorkloadKey(self.namespace, self.kind, self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Finding:
    """Something a person should look at. ``code`` is one of ``Code``, ``severity`` one of
    ``Severity``; ``subject`` is ``<namespace>/<Kind>/<name>`` for a workload,
    ``Namespace/<name>`` or ``ExternalService/<name>``; the last three fields let views
    filter (empty when not about one)."""

    code: str
    severity: str
    subject: str
    message: str
    namespace: str = ""
    workload: str = ""  # Kind/name, in namespace
    external_service: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class WorkloadAccess:
    """A workload's own facts, independent of any one gateway."""

    namespace: str
    kind: str
    name: str
    pods: int
    direct_egress: bool  # egress allows the public probe address on some port
    egress_policies: tuple[str, ...]  # policies isolating its egress; empty: none
    grants: tuple[str, ...]  # gateways its labels name (existing or not)

    @property
    def key(self) -> WorkloadKey:
        return WorkloadKey(self.namespace, self.kind, self.name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["egress_policies"] = list(self.egress_policies)
        out["grants"] = list(self.grants)
        return out


@dataclass(frozen=True, slots=True)
class _PodAnswer:
    form: str
    egress: bool
    ingress: bool
    direct: bool


@dataclass(frozen=True, slots=True)
class _Gateway:
    info: ExternalServiceInfo
    service: GatewayService | None
    pods: tuple[Endpoint, ...]  # real gateway pods, or the one its Deployment would create
    synthetic: bool
    # The client label keys and namespace label keys its ingress policies look at: clients
    # that agree on these get the same ingress verdict (most agree on "no grant label").
    pod_keys: tuple[str, ...] = ()
    namespace_keys: tuple[str, ...] = ()


class _Evaluator:
    """The pure core: answers (workload, gateway, port) questions from a snapshot, memoised by
    pod shape (pods of one workload usually share namespace and labels)."""

    def __init__(self, snapshot: Snapshot, probes: Sequence[IPAddress]) -> None:
        self.snapshot = snapshot
        self.probes = tuple(probes)
        self.index = PolicyIndex(snapshot.policies)
        self.namespace_labels = {ns.name: ns.labels for ns in snapshot.namespaces}
        links = {(o.namespace, o.kind, o.name): o.parent for o in snapshot.owners}
        self.workloads: dict[WorkloadKey, list[Pod]] = {}
        for pod in snapshot.pods:
            self.workloads.setdefault(_workload_of(pod, links), []).append(pod)
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self._answers: dict[tuple[Any, ...], _PodAnswer] = {}
        self._ingress_cache: dict[tuple[Any, ...], bool] = {}
        self.gateways = self._gateways()
        # Gateway ingress rules with ipBlocks make the answer depend on the client's IP.
        gw_ns = snapshot.gateway_namespace
        self.ip_matters = any(
            p.namespace == gw_ns and Direction.INGRESS in p.types and p.uses_ip_blocks
            for p in snapshot.policies
        )
        # Each workload's pods by shape: pods that policies cannot tell apart answer alike.
        self.shapes: dict[WorkloadKey, list[tuple[Pod, int]]] = {}
        for key, pods in self.workloads.items():
            counts: dict[tuple[Any, ...], list[Any]] = {}
            for pod in pods:
                shape = (pod.labels, pod.host_network, self._ip_key(pod))
                counts.setdefault(shape, [pod, 0])[1] += 1
            self.shapes[key] = [(pod, n) for pod, n in counts.values()]

    def _ip_key(self, pod: Pod) -> IPAddress | None:
        return pod.ip if (self.ip_matters or pod.host_network) else None

    def _gateways(self) -> dict[str, _Gateway]:
        snap = self.snapshot
        services = {s.name: s for s in snap.services}
        real: dict[str, list[Endpoint]] = {}
        for pod in snap.gateway_pods:
            real.setdefault(pod.labels.get(c.LABEL_GATEWAY, ""), []).append(self.endpoint(pod))
        some_ip = next((p.ip for p in snap.gateway_pods if p.ip is not None), None)
        out: dict[str, _Gateway] = {}
        for es in snap.external_services:
            service = services.get(es.name)
            pods = [
                e
                for e in real.get(es.name, [])
                if service is None or all(e.labels.get(k) == v for k, v in service.selector.items())
            ]
            synthetic = not pods
            if synthetic:
                pods = [
                    Endpoint(
                        namespace=snap.gateway_namespace,
                        labels=gateway_pod_labels(es.name),
                        namespace_labels=self._namespace_labels(snap.gateway_namespace),
                        ip=some_ip,
                        ports=tuple(ContainerPort(p, proto) for p, proto in es.ports),
                    )
                ]
            pod_keys: set[str] = set()
            namespace_keys: set[str] = set()
            for gw in pods:
                for policy in self.index.selecting(gw, Direction.INGRESS):
                    keys = policy.peer_keys(Direction.INGRESS)
                    pod_keys |= keys[0]
                    namespace_keys |= keys[1]
            out[es.name] = _Gateway(
                es,
                service,
                tuple(pods),
                synthetic,
                tuple(sorted(pod_keys)),
                tuple(sorted(namespace_keys)),
            )
        return out

    def _namespace_labels(self, namespace: str) -> Labels:
        labels = self.namespace_labels.get(namespace)
        return labels if labels is not None else Labels({NAMESPACE_NAME_LABEL: namespace})

    def endpoint(self, pod: Pod) -> Endpoint:
        key = (pod.namespace, pod.name)
        found = self._endpoints.get(key)
        if found is None:
            found = Endpoint(
                namespace=pod.namespace,
                labels=pod.labels,
                namespace_labels=self._namespace_labels(pod.namespace),
                ip=pod.ip,
                ports=pod.ports,
                host_network=pod.host_network,
            )
            self._endpoints[key] = found
        return found

    def ports(self, gateway: _Gateway) -> list[tuple[int, str]]:
        """The declared ports, and any port the live Service exposes beyond them."""
        ports = list(gateway.info.ports)
        for p in gateway.service.ports if gateway.service else ():
            if (p.port, p.protocol) not in ports:
                ports.append((p.port, p.protocol))
        return ports

    def answer(
        self, pod: Pod, gateway: _Gateway, port: int, protocol: str, full: bool
    ) -> _PodAnswer | None:
        """One pod's answer; None when it is neither granted nor admitted and ``full`` is off
        (the common case for most pods and gateways, decided by the gateway's ingress alone)."""
        form = grant_form(pod.labels, gateway.info.name)
        ingress = self._ingress(pod, gateway, port, protocol)
        if not form and not ingress and not full:
            return None
        key = (
            pod.namespace,
            pod.labels,
            pod.host_network,
            self._ip_key(pod),
            gateway.info.name,
            port,
            protocol,
        )
        found = self._answers.get(key)
        if found is None:
            source = self.endpoint(pod)
            egress = all(
                target is not None and self.index.egress(source, gw, target, protocol).allowed
                for gw, target in self._targets(gateway, port, protocol)
            )
            probes = self.probes + gateway.info.ip_override
            direct = any(
                self.index.egress(source, Endpoint.external(ip), port, protocol).allowed
                for ip in probes
            )
            found = _PodAnswer(form, egress, ingress, direct)
            self._answers[key] = found
        return found

    def _ingress(self, pod: Pod, gateway: _Gateway, port: int, protocol: str) -> bool:
        """Do the ingress policies of every gateway pod admit this pod? Memoised on what those
        policies can see of it."""
        key = (
            gateway.info.name,
            port,
            protocol,
            pod.namespace == self.snapshot.gateway_namespace,
            pod.host_network,
            self._ip_key(pod),
            tuple(pod.labels.get(k) for k in gateway.pod_keys),
            tuple(self._namespace_labels(pod.namespace).get(k) for k in gateway.namespace_keys),
        )
        found = self._ingress_cache.get(key)
        if found is None:
            source = self.endpoint(pod)
            found = all(
                target is not None and self.index.ingress(gw, source, target, protocol).allowed
                for gw, target in self._targets(gateway, port, protocol)
            )
            self._ingress_cache[key] = found
        return found

    def _targets(
        self, gateway: _Gateway, port: int, protocol: str
    ) -> list[tuple[Endpoint, int | None]]:
        return [(gw, self._target_port(gateway, gw, port, protocol)) for gw in gateway.pods]

    def admitted_by(self, workload: WorkloadKey, gateway: _Gateway, row: Row) -> str:
        """The gateway-side policy that admits the workload's first pod on the row's port."""
        source = self.endpoint(self.workloads[workload][0])
        for gw in gateway.pods:
            target = self._target_port(gateway, gw, row.port, row.protocol)
            if target is not None:
                verdict = self.index.ingress(gw, source, target, row.protocol)
                if verdict.allowed_by:
                    return verdict.allowed_by
        return ""

    @staticmethod
    def _target_port(gateway: _Gateway, pod: Endpoint, port: int, protocol: str) -> int | None:
        """The port on the gateway pod a connection to the Service's ``port`` arrives at (our
        Services use targetPort = port; a named targetPort resolves on each pod)."""
        service_port = gateway.service.port(port, protocol) if gateway.service else None
        if service_port is None:
            return port
        if isinstance(service_port.target, int):
            return service_port.target
        return pod.named_port(service_port.target, protocol)

    def row(
        self, workload: WorkloadKey, gateway: _Gateway, port: int, protocol: str, full: bool
    ) -> Row | None:
        answers = [
            (a, n)
            for pod, n in self.shapes[workload]
            if (a := self.answer(pod, gateway, port, protocol, full)) is not None
        ]
        if not answers:
            return None
        # The row is about the pods that are granted or admitted (all of them when none is, as
        # `full` asks): a pod that is neither says nothing of this gateway, whatever its egress.
        present = [a for a, _ in answers if a.form or a.ingress] or [a for a, _ in answers]
        exposed = gateway.service is not None and gateway.service.port(port, protocol) is not None
        forms = {a.form for a in present if a.form}
        reachable = sum(n for a, n in answers if a.egress and a.ingress and exposed)
        return Row(
            namespace=workload.namespace,
            kind=workload.kind,
            name=workload.name,
            external_service=gateway.info.name,
            port=port,
            protocol=protocol,
            granted=bool(forms),
            grant_form=FORM_PER_GATEWAY
            if FORM_PER_GATEWAY in forms
            else (FORM_GATEWAY if forms else ""),
            policy_allows=any(a.egress and a.ingress for a in present),
            reachable=reachable > 0,
            direct=any(a.direct for a in present),
            egress_allows=any(a.egress for a in present),
            ingress_allows=any(a.ingress for a in present),
            pods=len(self.workloads[workload]),
            pods_reachable=reachable,
        )

    def workload_access(self, workload: WorkloadKey) -> WorkloadAccess:
        pods = self.workloads[workload]
        endpoints = [self.endpoint(p) for p in pods]
        direct = any(
            self.index.egress_some_port(e, Endpoint.external(ip))
            for e in endpoints
            for ip in self.probes
        )
        policies = sorted(
            {p.name for e in endpoints for p in self.index.selecting(e, Direction.EGRESS)}
        )
        grants: set[str] = set()
        for pod in pods:
            grants |= named_gateways(pod.labels, set(self.gateways))
        return WorkloadAccess(
            workload.namespace,
            workload.kind,
            workload.name,
            len(pods),
            direct,
            tuple(policies),
            tuple(sorted(grants)),
        )


def _workload_of(pod: Pod, links: Mapping[tuple[str, str, str], OwnerRef]) -> WorkloadKey:
    owner = pod.owner
    if owner is None or not owner.kind or owner.kind == "Node":
        return WorkloadKey(pod.namespace, "Pod", pod.name)
    if owner.kind in INTERMEDIATE_KINDS:
        parent = links.get((pod.namespace, owner.kind, owner.name))
        if parent is not None and parent.kind:
            return WorkloadKey(pod.namespace, parent.kind, parent.name)
    return WorkloadKey(pod.namespace, owner.kind, owner.name)


def named_gateways(labels: Mapping[str, str], existing: set[str]) -> set[str]:
    """Every gateway the grant labels name, existing or not (what the grant was meant for)."""
    out: set[str] = set()
    for key, value in labels.items():
        if key == c.GRANT_LABEL_GATEWAY:
            out.add("gateway" if value == c.GRANT_LABEL_VALUE and "gateway" in existing else value)
        elif key.startswith(c.GRANT_LABEL_PREFIX):
            out.add(key.removeprefix(c.GRANT_LABEL_PREFIX))
    return out


@dataclass
class Audit:
    """The audit of one snapshot: ``rows`` where a workload is granted or can reach a gateway,
    ``findings``, each workload's own facts, and any other question via ``row``/``reachable``."""

    snapshot: Snapshot
    rows: list[Row]
    findings: list[Finding]
    workloads: list[WorkloadAccess]
    probes: tuple[IPAddress, ...]
    _evaluator: _Evaluator = field(repr=False)

    def row(
        self,
        namespace: str,
        kind: str,
        name: str,
        external_service: str,
        port: int,
        protocol: str = "TCP",
    ) -> Row:
        """The row for any workload, gateway and port, computed if the audit did not list it.

        An unknown ExternalService, or a port its gateway does not expose, gives an unreachable
        row; an unknown workload raises LookupError.
        """
        key = WorkloadKey(namespace, kind, name)
        ev = self._evaluator
        if key not in ev.workloads:
            raise LookupError(f"no workload {key} (pods: {len(self.snapshot.pods)})")
        gateway = ev.gateways.get(external_service)
        row = ev.row(key, gateway, port, protocol, full=True) if gateway is not None else None
        if row is None:
            return Row(
                namespace=namespace,
                kind=kind,
                name=name,
                external_service=external_service,
                port=port,
                protocol=protocol,
                granted=False,
                grant_form="",
                policy_allows=False,
                reachable=False,
                direct=False,
                pods=len(ev.workloads[key]),
            )
        return row

    def reachable(
        self,
        namespace: str,
        kind: str,
        name: str,
        external_service: str,
        port: int,
        protocol: str = "TCP",
    ) -> bool:
        """Will a connection from this workload through the gateway of ``external_service`` on
        ``port``/``protocol`` be let through? False for ports the gateway does not expose."""
        return self.row(namespace, kind, name, external_service, port, protocol).reachable

    def workload(self, namespace: str, kind: str, name: str) -> WorkloadAccess:
        key = WorkloadKey(namespace, kind, name)
        for w in self.workloads:
            if w.key == key:
                return w
        raise LookupError(f"no workload {key}")

    @property
    def external_services(self) -> list[str]:
        return sorted(es.name for es in self.snapshot.external_services)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "findings": [f.to_dict() for f in self.findings],
            "workloads": [w.to_dict() for w in self.workloads],
        }


def audit(snapshot: Snapshot, probes: Sequence[IPAddress] = (PUBLIC_PROBE,)) -> Audit:
    """Every workload against every gateway and port; rows for the granted or reachable ones."""
    ev = _Evaluator(snapshot, probes)
    rows: list[Row] = []
    for key in sorted(ev.workloads):
        for name in sorted(ev.gateways):
            gateway = ev.gateways[name]
            for port, protocol in ev.ports(gateway):
                row = ev.row(key, gateway, port, protocol, full=False)
                if row is not None and (row.granted or row.reachable):
                    rows.append(row)
    workloads = [ev.workload_access(key) for key in sorted(ev.workloads)]
    findings = _findings(ev, rows, workloads)
    return Audit(snapshot, rows, findings, workloads, ev.probes, ev)


# -- findings -----------------------------------------------------------------------------------


def _ports(rows: Iterable[Row]) -> str:
    return ", ".join(f"{r.port}/{r.protocol}" for r in rows)


def _finding(
    code: Code,
    severity: Severity,
    subject: str,
    message: str,
    *,
    workload: WorkloadKey | None = None,
    namespace: str = "",
    external_service: str = "",
) -> Finding:
    return Finding(
        code.value,
        severity.value,
        subject,
        message,
        namespace=workload.namespace if workload else namespace,
        workload=f"{workload.kind}/{workload.name}" if workload else "",
        external_service=external_service,
    )


def _findings(ev: _Evaluator, rows: list[Row], workloads: list[WorkloadAccess]) -> list[Finding]:
    out: list[Finding] = []
    out += _label_findings(ev)
    by_pair: dict[tuple[WorkloadKey, str], list[Row]] = {}
    for row in rows:
        by_pair.setdefault((row.workload, row.external_service), []).append(row)
    gw_ns = ev.snapshot.gateway_namespace
    for (key, es), pair in sorted(by_pair.items()):
        granted = [r for r in pair if r.granted]
        gateway = ev.gateways[es]
        blocked = [r for r in granted if not r.policy_allows]
        if blocked:
            out.append(_blocked(ev, key, es, blocked))
        ungranted = [r for r in pair if r.reachable and not r.granted]
        if ungranted:
            admitted_by = ev.admitted_by(key, gateway, ungranted[0])
            out.append(
                _finding(
                    Code.UNGRANTED_ACCESS,
                    Severity.WARNING,
                    str(key),
                    f"reaches gateway {es} on {_ports(ungranted)} without a grant label: "
                    + (
                        f"NetworkPolicy {gw_ns}/{admitted_by} admits it"
                        if admitted_by
                        else f"no NetworkPolicy in namespace {gw_ns} protects the gateway pods"
                    ),
                    workload=key,
                    external_service=es,
                )
            )
        partial = [r for r in granted if r.reachable and r.pods_reachable < r.pods]
        if partial:
            r = partial[0]
            out.append(
                _finding(
                    Code.PARTIAL_ACCESS,
                    Severity.WARNING,
                    str(key),
                    f"only {r.pods_reachable} of its {r.pods} pods can reach gateway {es} on "
                    f"{_ports(partial)}: its pods differ in labels (a rollout in progress?)",
                    workload=key,
                    external_service=es,
                )
            )
    out += _namespace_findings(ev, rows, workloads)
    out += _gateway_findings(ev, rows)
    return sorted(
        out,
        key=lambda f: (SEVERITY_ORDER[Severity(f.severity)], f.code, f.subject, f.message),
    )


def _label_findings(ev: _Evaluator) -> list[Finding]:
    existing = set(ev.gateways)
    out: dict[tuple[str, str, str], Finding] = {}
    for key, pods in ev.workloads.items():
        for pod in pods:
            for label, value in pod.labels.items():
                finding = _label_finding(key, label, value, existing)
                if finding is not None:
                    out.setdefault((str(key), finding.code, label), finding)
    return list(out.values())


def _label_finding(key: WorkloadKey, label: str, value: str, existing: set[str]) -> Finding | None:
    if label == c.GRANT_LABEL_GATEWAY:
        if value == c.GRANT_LABEL_VALUE and "gateway" in existing:
            return None  # the per-gateway form for an ExternalService named "gateway"
        if value not in existing:
            return _finding(
                Code.UNKNOWN_GATEWAY,
                Severity.ERROR,
                str(key),
                f"label {label}: {value} names gateway {value!r}, which does not exist "
                "(no ExternalService of that name)",
                workload=key,
                external_service=value,
            )
        return _finding(
            Code.ALLOWED_GATEWAY_FORM,
            Severity.INFO,
            str(key),
            f"grants gateway {value} with {label}: {value}, which works but can name only one "
            f'gateway; prefer {c.grant_label(value)}: "true"',
            workload=key,
            external_service=value,
        )
    if not label.startswith(c.GRANT_LABEL_PREFIX):
        return None
    gateway = label.removeprefix(c.GRANT_LABEL_PREFIX)
    if gateway not in existing:
        return _finding(
            Code.UNKNOWN_GATEWAY,
            Severity.ERROR,
            str(key),
            f"label {label} names gateway {gateway!r}, which does not exist "
            "(no ExternalService of that name)",
            workload=key,
            external_service=gateway,
        )
    if value != c.GRANT_LABEL_VALUE:
        return _finding(
            Code.GRANT_VALUE_IGNORED,
            Severity.WARNING,
            str(key),
            f'label {label}: {value!r} grants nothing: the gateway admits only the value "true"',
            workload=key,
            external_service=gateway,
        )
    return None


def _blocked(ev: _Evaluator, key: WorkloadKey, es: str, blocked: list[Row]) -> Finding:
    gw_ns = ev.snapshot.gateway_namespace
    gateway = ev.gateways[es]
    reasons: list[str] = []
    if any(not r.egress_allows for r in blocked):
        pods = ev.workloads[key]
        policies = sorted(
            {p.name for pod in pods for p in ev.index.selecting(ev.endpoint(pod), Direction.EGRESS)}
        )
        reasons.append(
            f"the egress policies of namespace {key.namespace} ({', '.join(policies)}) do not "
            f"allow the gateway pods in namespace {gw_ns} (labels "
            f"{c.LABEL_GATEWAY}={es}): add an egress rule to them, e.g. namespaceSelector "
            f"{NAMESPACE_NAME_LABEL}: {gw_ns} with podSelector {c.LABEL_APP}: {c.APP_VALUE}"
        )
    if any(not r.ingress_allows for r in blocked):
        reasons.append(
            f"the ingress policies of the gateway pods in namespace {gw_ns} do not admit it on "
            "these ports"
        )
    if gateway.synthetic:
        reasons.append("the gateway has no pods: judged against the pod its Deployment makes")
    return _finding(
        Code.GRANT_BLOCKED,
        Severity.ERROR,
        str(key),
        f"granted gateway {es} but cannot reach it on {_ports(blocked)}: " + "; ".join(reasons),
        workload=key,
        external_service=es,
    )


def _namespace_findings(
    ev: _Evaluator, rows: list[Row], workloads: list[WorkloadAccess]
) -> list[Finding]:
    """Namespaces whose granted workloads could go around their gateways."""
    facts = {w.key: w for w in workloads}
    bypass: dict[str, set[WorkloadKey]] = {}
    for row in rows:
        if row.granted and (row.direct or facts[row.workload].direct_egress):
            bypass.setdefault(row.namespace, set()).add(row.workload)
    probe = ", ".join(str(ip) for ip in ev.probes)
    out: list[Finding] = []
    for namespace, keys in sorted(bypass.items()):
        names = ", ".join(f"{k.kind}/{k.name}" for k in sorted(keys))
        if all(not facts[k].egress_policies for k in keys):
            why = "no egress policy selects them"
        elif all(facts[k].direct_egress for k in keys):
            why = f"their egress policies allow public addresses ({probe})"
        elif not any(facts[k].direct_egress for k in keys):
            why = "their egress policies allow the destinations' own ipOverride addresses"
        else:
            why = (
                f"their egress policies allow public addresses ({probe}) or the "
                "destinations' own ipOverride addresses"
            )
        out.append(
            _finding(
                Code.NO_DEFAULT_DENY,
                Severity.WARNING,
                f"Namespace/{namespace}",
                f"granted workloads ({names}) can also reach their destinations directly: "
                f"{why}; the gateways can be bypassed. Add a default-deny egress policy "
                "(infra/examples/default-deny-egress)",
                namespace=namespace,
            )
        )
    return out


def _gateway_findings(ev: _Evaluator, rows: list[Row]) -> list[Finding]:
    out: list[Finding] = []
    reached = {r.external_service for r in rows if r.reachable}
    granted = {r.external_service for r in rows if r.granted}
    for name, gateway in sorted(ev.gateways.items()):
        subject = f"ExternalService/{name}"
        if gateway.service is None:
            out.append(
                _finding(
                    Code.GATEWAY_NOT_DEPLOYED,
                    Severity.WARNING,
                    subject,
                    f"has no gateway Service in namespace {ev.snapshot.gateway_namespace}: "
                    "nobody can reach it until it is reconciled (egressctl reconcile "
                    f"{name}; see its status conditions)",
                    external_service=name,
                )
            )
        elif gateway.synthetic:
            out.append(
                _finding(
                    Code.GATEWAY_WITHOUT_PODS,
                    Severity.INFO,
                    subject,
                    "has no gateway pods: access is judged against the pod its Deployment "
                    "would create",
                    external_service=name,
                )
            )
        if name not in reached:
            why = (
                "its granted workloads are all blocked (see grant-blocked)"
                if name in granted
                else "no workload carries its grant label"
            )
            out.append(
                _finding(
                    Code.UNREACHABLE_GATEWAY,
                    Severity.WARNING,
                    subject,
                    f"no workload can reach gateway {name}: {why}",
                    external_service=name,
                )
            )
    return out
