"""Switching a cluster from Monzo's original egress-operator to this product, and back.

``plan_migration`` reads the cluster and says what ``apply_migration`` would do; both do I/O
only through :class:`core.kube.Kube`. The migration, in order:

1. **The original controller must be stopped.** While its manager Deployment has replicas, or
   one of its leader-election locks is fresh, the two controllers rewrite each other's fields on
   every pass (it patches with field manager ``manager``; we apply with
   ``egress-gateway-reconciler``) and the gateway pods roll each time. The migration refuses.
2. **The CRD** (``externalservices.egress.monzo.com``): the original's kubebuilder CRD has no
   status subresource, so this product's status writes answer 404. It is replaced in place with
   ours (a replace, then an apply by our deploy field manager, who alone owns it afterwards).
   Updating a CRD never rewrites stored objects: every ExternalService keeps its UID, spec and
   resourceVersion (objects our stricter schema would refuse are listed; they keep working and
   get ``Valid=False``).
3. **Gateway objects are adopted in place**, never recreated: the fields the original's field
   manager owns are handed to ours, then one sweep applies what we render and thereby removes
   the original's leftovers (its root ``ENVOY_UID``, ...). Same objects, same UIDs, same Service
   ClusterIPs (so DNS answers do not change); the Deployment's pod template changes once: **one
   rolling restart per gateway** (25 % surge, 25 s preStop). The Service's port is renamed (the
   original left it unnamed), which would leave it without endpoints for a moment: a temporary
   EndpointSlice under the new name bridges that. No request fails (measured in
   tests/integration/test_migration.py).
4. **Cluster DNS**: the steps from the custom CoreDNS image (the ``egressoperator`` plugin) to
   stock CoreDNS reading our rules ConfigMap, in an order that never stops answering.
5. **Settings**: the original manager's environment and flags, mapped to ours.

``plan_uninstall``/``apply_uninstall`` are the way back: with our control loop stopped, every
ExternalService loses our finalizer and annotations, so deletions complete without us and the
original operator (or nothing) takes over.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import constants as c
from core.errors import PermanentError
from core.hijack import HijackState, next_hijack_state
from core.kube import (
    CONFIGMAP,
    DEPLOYMENT,
    ENDPOINT_SLICE,
    EXTERNAL_SERVICE,
    GATEWAY_KINDS,
    SERVICE,
    Kube,
    Obj,
    Resource,
)
from core.settings import Settings, SettingsError
from core.spec import InvalidExternalService, parse_external_service
from dns.corefile import check as check_corefile
from dns.corefile import tokenize
from gateway.render import render
from reconcile.drift import diff

CRD = Resource(
    "apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", False
)
LEASE = Resource("coordination.k8s.io/v1", "Lease", "leases")
CRD_NAME = f"{c.PLURAL}.{c.GROUP}"

# The original operator as its kustomize config deploys it (config/default: namespace
# egress-operator-system, name prefix egress-operator-; config/manager: Deployment
# controller-manager labelled control-plane=controller-manager, --enable-leader-election).
ORIGINAL_NAMESPACE = "egress-operator-system"
ORIGINAL_DEPLOYMENT = "egress-operator-controller-manager"
ORIGINAL_DEPLOYMENT_LABEL = "control-plane=controller-manager"
# Its main.go sets no LeaderElectionID: controller-runtime releases that defaulted it used this
# name. Any lock whose holder is one of the manager's pods (controller-runtime's identity is
# "<pod name>_<uuid>") counts too, whatever its name.
ORIGINAL_LOCK_NAMES = ("controller-leader-election-helper",)
# controller-runtime releases before leases kept the lock in a ConfigMap annotation.
LEADER_ANNOTATION = "control-plane.alpha.kubernetes.io/leader"
# Its client patches without a field manager: the API server names it after the binary.
ORIGINAL_MANAGERS = ("manager",)
# What the API server calls whoever wrote an object before its first server-side apply, when
# the object had no field management yet.
BEFORE_FIRST_APPLY = "before-first-apply"
# Who owns our CRD after the migration: the field manager cloudbuild.yaml deploys infra/ with.
CRD_FIELD_MANAGER = "egress-gateways-deploy"
# The exporter Deployment (infra/exporter): while it runs, our functions reconcile.
EXPORTER_DEPLOYMENT = "egress-exporter"

# The original's settings: environment variables it read (same names here) and flags.
SAME_NAME_SETTINGS = (
    "ENVOY_IMAGE",
    "TAINT_TOLERATION_KEY",
    "TAINT_TOLERATION_VALUE",
    "NODE_SELECTOR_KEY",
    "NODE_SELECTOR_VALUE",
    "ENABLE_POD_TOPOLOGY_SPREAD",
    "POD_TOPOLOGY_ZONE_MAX_SKEW",
    "POD_TOPOLOGY_ZONE_MAX_SKEW_KEY",
    "POD_TOPOLOGY_ZONE_WHEN_UNSATISFIABLE",
    "POD_TOPOLOGY_HOSTNAME_MAX_SKEW",
    "POD_TOPOLOGY_HOSTNAME_MAX_SKEW_KEY",
    "POD_TOPOLOGY_HOSTNAME_WHEN_UNSATISFIABLE",
    "ENABLE_SERVICE_TOPOLOGY_MODE",
)
PDB_FLAG = "--enable-pod-disruption-budgets"
IGNORED_FLAGS = ("--enable-leader-election", "--metrics-addr", "--metrics-bind-address")

Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse_time(text: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class MigrationRefused(Exception):
    """The cluster is not in a state the step may act on; the message says why and what to do."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


# -- 1. the original controller ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaderLock:
    kind: str  # Lease or ConfigMap
    name: str
    holder: str
    renewed: str
    duration_s: int
    remaining_s: float | None  # until it expires; None when its times are unreadable

    @property
    def fresh(self) -> bool:
        return bool(self.holder) and (self.remaining_s is None or self.remaining_s > 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "holder": self.holder,
            "renewTime": self.renewed,
            "leaseDurationSeconds": self.duration_s,
            "fresh": self.fresh,
        }


@dataclass(frozen=True, slots=True)
class ManagerDeployment:
    name: str
    replicas: int
    ready: int
    pods: int  # status.replicas: pods that exist, terminating ones included

    @property
    def running(self) -> bool:
        return self.replicas > 0 or self.ready > 0 or self.pods > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "replicas": self.replicas,
            "readyReplicas": self.ready,
            "pods": self.pods,
        }


@dataclass
class OriginalController:
    namespace: str
    deployments: list[ManagerDeployment] = field(default_factory=list)
    locks: list[LeaderLock] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return any(d.running for d in self.deployments) or any(lk.fresh for lk in self.locks)

    def blockers(self) -> list[str]:
        out = []
        for d in self.deployments:
            if d.running:
                out.append(
                    f"the original operator runs: Deployment {self.namespace}/{d.name} has "
                    f"{d.ready} ready of {d.replicas} replica(s) ({d.pods} pod(s)). Both "
                    "controllers would rewrite every gateway object and roll its pods on each "
                    f"pass. Stop it: kubectl -n {self.namespace} scale deployment {d.name} "
                    "--replicas=0"
                )
        for lk in self.locks:
            if lk.fresh:
                left = (
                    f"; it expires in {lk.remaining_s:.0f}s" if lk.remaining_s is not None else ""
                )
                out.append(
                    f"the original operator's leader-election {lk.kind} {self.namespace}/"
                    f"{lk.name} is held by {lk.holder!r} (renewed {lk.renewed or 'at an unknown'}"
                    f" time, {lk.duration_s}s lease){left}: a manager still runs somewhere, or "
                    "has just stopped. Stop every manager and wait for the lock to expire"
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "running": self.running,
            "deployments": [d.to_dict() for d in self.deployments],
            "leaderLocks": [lk.to_dict() for lk in self.locks],
        }


def _deployment_state(obj: Obj) -> ManagerDeployment:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    replicas = spec.get("replicas")
    return ManagerDeployment(
        obj["metadata"]["name"],
        1 if replicas is None else int(replicas),
        int(status.get("readyReplicas") or 0),
        int(status.get("replicas") or 0),
    )


def lock_from_record(kind: str, name: str, record: Obj, now: dt.datetime) -> LeaderLock:
    """A leader-election lock from a Lease's spec or a ConfigMap lock's JSON record (both carry
    holderIdentity, leaseDurationSeconds and renewTime)."""
    holder = str(record.get("holderIdentity") or "")
    duration = int(record.get("leaseDurationSeconds") or 0)
    renewed = str(record.get("renewTime") or record.get("acquireTime") or "")
    when = _parse_time(renewed)
    remaining = (
        None if when is None else (when + dt.timedelta(seconds=duration) - now).total_seconds()
    )
    return LeaderLock(kind, name, holder, renewed, duration, remaining)


def is_original_lock(
    name: str, holder: str, deployments: list[str], lock_names: tuple[str, ...]
) -> bool:
    return name in lock_names or any(holder.startswith(f"{d}-") for d in deployments)


def detect_original(
    kube: Kube,
    namespace: str = ORIGINAL_NAMESPACE,
    deployment: str = ORIGINAL_DEPLOYMENT,
    lock_names: tuple[str, ...] = ORIGINAL_LOCK_NAMES,
    now: dt.datetime | None = None,
) -> OriginalController:
    """The original operator's manager Deployment(s) and leader-election locks, if any."""
    now = now or _utcnow()
    out = OriginalController(namespace)
    found: dict[str, Obj] = {}
    named = kube.get(DEPLOYMENT, deployment, namespace)
    if named is not None:
        found[deployment] = named
    labelled, _ = kube.list_all(DEPLOYMENT, namespace, label_selector=ORIGINAL_DEPLOYMENT_LABEL)
    for item in labelled:
        found.setdefault(item["metadata"]["name"], item)
    for name in sorted(found):
        out.deployments.append(_deployment_state(found[name]))
    if named is not None:
        containers = named["spec"]["template"]["spec"].get("containers") or []
        manager = next((ct for ct in containers if ct.get("name") == "manager"), None)
        manager = manager or (containers[0] if containers else {})
        out.env = {
            str(e["name"]): str(e.get("value", ""))
            for e in manager.get("env") or []
            if "name" in e and "valueFrom" not in e
        }
        out.args = [
            str(a) for a in (manager.get("command") or [])[1:] + (manager.get("args") or [])
        ]
    names = sorted(found) or [deployment]
    leases, _ = kube.list_all(LEASE, namespace)
    for lease in leases:
        spec = lease.get("spec") or {}
        lock = lock_from_record("Lease", lease["metadata"]["name"], spec, now)
        if is_original_lock(lock.name, lock.holder, names, lock_names):
            out.locks.append(lock)
    for name in lock_names:
        cm = kube.get(CONFIGMAP, name, namespace)
        raw = ((cm or {}).get("metadata") or {}).get("annotations", {}).get(LEADER_ANNOTATION)
        if raw:
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"holderIdentity": "unreadable record"}
            out.locks.append(lock_from_record("ConfigMap", name, record, now))
    return out


# -- 2. the CRD --------------------------------------------------------------------------------


@dataclass
class CrdState:
    name: str
    present: bool
    status_subresource: bool
    # Fields of our manifest that the live CRD does not hold (first few).
    differences: list[str] = field(default_factory=list)
    managers: list[str] = field(default_factory=list)
    controller_gen: str = ""

    @property
    def flavour(self) -> str:
        if not self.present:
            return "missing"
        if not self.differences:
            return "ours"
        if not self.status_subresource:
            return "original"
        return "outdated"

    def describe(self) -> str:
        return {
            "missing": f"CRD {self.name} is not installed: it is created from our manifest",
            "ours": f"CRD {self.name} is already this product's: nothing to do",
            "original": (
                f"CRD {self.name} is the original operator's (no status subresource"
                + (f", controller-gen {self.controller_gen}" if self.controller_gen else "")
                + "): this product cannot write status under it (every status write answers "
                "404). It is replaced in place by ours (infra/crd/externalservices.yaml); "
                "stored ExternalServices are not rewritten"
            ),
            "outdated": (
                f"CRD {self.name} differs from our manifest ({', '.join(self.differences)}): "
                "it is updated in place; stored ExternalServices are not rewritten"
            ),
        }[self.flavour]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "flavour": self.flavour,
            "statusSubresource": self.status_subresource,
            "differences": self.differences,
            "managers": self.managers,
        }


def _served_version(crd: Obj) -> Obj:
    for version in (crd.get("spec") or {}).get("versions") or []:
        if version.get("name") == c.VERSION:
            return dict(version)
    return {}


def inspect_crd(kube: Kube, manifest: Obj) -> CrdState:
    name = manifest["metadata"]["name"]
    live = kube.get(CRD, name)
    if live is None:
        return CrdState(name, False, False, ["(missing)"])
    differences = [f.path for f in diff({"spec": manifest["spec"]}, {"spec": live["spec"]})]
    return CrdState(
        name,
        True,
        "status" in (_served_version(live).get("subresources") or {}),
        differences[:5] + ([f"and {len(differences) - 5} more"] if len(differences) > 5 else []),
        sorted({str(e.get("manager")) for e in live["metadata"].get("managedFields") or []}),
        (live["metadata"].get("annotations") or {}).get(
            "controller-gen.kubebuilder.io/version", ""
        ),
    )


def take_over_fields(
    kube: Kube,
    resource: Resource,
    name: str,
    namespace: str | None,
    field_manager: str,
    from_managers: Callable[[Obj], bool],
    now: dt.datetime | None = None,
) -> list[str]:
    """Hand the fields of other field managers to ``field_manager``'s apply entry.

    Server-side apply removes a field the applier owned and no longer applies, but leaves
    fields other managers own. Handing those managers' fields to ours first means the next
    apply of what we render removes everything only they had set. Entries of another API
    version, or of a subresource (status), are not handed over: the former are dropped (the
    fields stay, owned by nobody), the latter kept. Returns the managers taken over from.
    """
    for _ in range(5):
        live = kube.get(resource, name, namespace)
        if live is None:
            return []
        entries = live["metadata"].get("managedFields") or []
        ours: Obj | None = None
        keep: list[Obj] = []
        taken: list[Obj] = []
        for entry in entries:
            if entry.get("subresource"):
                keep.append(entry)
            elif entry.get("manager") == field_manager and entry.get("operation") == "Apply":
                ours = copy.deepcopy(entry)
            elif from_managers(entry):
                taken.append(entry)
            else:
                keep.append(entry)
        if not taken:
            return []
        if ours is None:
            ours = {
                "manager": field_manager,
                "operation": "Apply",
                "apiVersion": resource.api_version,
                "time": _stamp(now or _utcnow()),
                "fieldsType": "FieldsV1",
                "fieldsV1": {},
            }
        for entry in taken:
            if entry.get("apiVersion") == ours["apiVersion"]:
                ours["fieldsV1"] = _union(ours.get("fieldsV1") or {}, entry.get("fieldsV1") or {})
        patch = {
            "metadata": {
                "resourceVersion": live["metadata"]["resourceVersion"],
                "managedFields": [ours, *keep],
            }
        }
        try:
            _patch_at_version(kube, resource, name, namespace, patch)
        except PermanentError as exc:
            if exc.status == 409:  # changed meanwhile: read again
                continue
            raise
        return sorted({str(e.get("manager")) for e in taken})
    raise PermanentError(f"{resource.kind} {name}: kept changing while its fields were taken over")


def _patch_at_version(
    kube: Kube, resource: Resource, name: str, namespace: str | None, patch: Obj
) -> None:
    """A merge patch carrying the resourceVersion it was computed from: a 409 means the object
    changed meanwhile (raised as PermanentError with status 409, for the caller to read again)."""
    kube.merge_patch(resource, name, patch, namespace, final_statuses=frozenset({409}))


def _union(a: Obj, b: Obj) -> Obj:
    out = copy.deepcopy(a)
    for key, value in b.items():
        out[key] = _union(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def replace_crd(
    kube: Kube, manifest: Obj, field_manager: str = CRD_FIELD_MANAGER, timeout_s: float = 60
) -> None:
    """Make the live CRD exactly our manifest, in place (never deleted: deleting a CRD deletes
    every object of it), owned by ``field_manager`` alone, and wait until it is served.

    A replace (PUT) makes the content exact whoever owned what; a forced apply then gives
    ``field_manager`` every field of the manifest; dropping the other managers' entries leaves
    later applies by the same deploy free of conflicts."""
    name = manifest["metadata"]["name"]
    for _ in range(10):  # the CRD controller writes its status right after every change
        live = kube.get(CRD, name)
        if live is None:
            break
        body = {
            **manifest,
            "metadata": {
                **manifest["metadata"],
                "resourceVersion": live["metadata"]["resourceVersion"],
            },
        }
        if kube.replace(CRD, body, field_manager=field_manager) is not None:
            break
    else:
        raise PermanentError(f"CRD {name} kept changing while it was replaced")
    kube.apply(manifest, field_manager=field_manager, resource=CRD)
    keep_only_applier(kube, CRD, name, None, field_manager)
    deadline = time.monotonic() + timeout_s
    while True:
        live = kube.get(CRD, name) or {}
        conditions = {
            cd.get("type"): cd.get("status")
            for cd in (live.get("status") or {}).get("conditions") or []
        }
        if conditions.get("Established") == "True" and _status_served(kube):
            return
        if time.monotonic() > deadline:
            raise PermanentError(
                f"CRD {name} was not served with its status subresource in {timeout_s:.0f}s"
            )
        time.sleep(0.5)


def keep_only_applier(
    kube: Kube, resource: Resource, name: str, namespace: str | None, field_manager: str
) -> None:
    """Drop every managedFields entry of the main resource except ``field_manager``'s apply."""
    for _ in range(10):
        live = kube.get(resource, name, namespace)
        if live is None:
            return
        entries = live["metadata"].get("managedFields") or []
        kept = [
            e
            for e in entries
            if e.get("subresource")
            or (e.get("manager") == field_manager and e.get("operation") == "Apply")
        ]
        if len(kept) == len(entries):
            return
        patch = {
            "metadata": {
                "resourceVersion": live["metadata"]["resourceVersion"],
                "managedFields": kept,
            }
        }
        try:
            _patch_at_version(kube, resource, name, namespace, patch)
            return
        except PermanentError as exc:
            if exc.status != 409:
                raise
    raise PermanentError(f"{resource.kind} {name}: kept changing while its owners were set")


def _status_served(kube: Kube) -> bool:
    """Whether ExternalServices' /status answers (a dry-run no-op write to one of them)."""
    items, _ = kube.list_all(EXTERNAL_SERVICE)
    if not items:
        return True
    probe = kube.with_dry_run(True)
    try:
        probe.merge_patch(EXTERNAL_SERVICE, items[0]["metadata"]["name"], {}, subresource="status")
    except PermanentError as exc:
        if exc.status == 404:
            return False
        raise
    return True


# -- 3. stored objects and their gateways -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    name: str
    uid: str
    resource_version: str
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uid": self.uid,
            "resourceVersion": self.resource_version,
            "problems": list(self.problems),
        }


@dataclass(frozen=True, slots=True)
class Adoption:
    """One gateway object to adopt: who owns it now, and whether we change its fields."""

    kind: str
    name: str
    uid: str
    original_managers: tuple[str, ...]
    changes: int  # fields of ours it does not hold yet
    rolls: bool = False  # a Deployment whose pod template changes
    renamed_ports: dict[str, str] = field(default_factory=dict)  # a Service's, old -> new

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "originalManagers": list(self.original_managers),
            "fieldChanges": self.changes,
            "rollingRestart": self.rolls,
            "renamedPorts": self.renamed_ports,
        }


def stored_objects(kube: Kube, settings: Settings) -> list[Stored]:
    items, _ = kube.list_all(EXTERNAL_SERVICE)
    out = []
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        meta = item["metadata"]
        try:
            parse_external_service(item, settings.ceilings)
            problems: tuple[str, ...] = ()
        except InvalidExternalService as exc:
            problems = tuple(str(e) for e in exc.errors)
        out.append(Stored(meta["name"], meta["uid"], meta["resourceVersion"], problems))
    return out


def _gateway_children(kube: Kube, settings: Settings) -> dict[str, dict[str, Obj]]:
    out: dict[str, dict[str, Obj]] = {}
    for resource in GATEWAY_KINDS:
        items, _ = kube.list_all(resource, settings.gateway_namespace, c.LABEL_GATEWAY)
        for item in items:
            gateway = item["metadata"]["labels"][c.LABEL_GATEWAY]
            if item["metadata"]["name"] == gateway:
                out.setdefault(gateway, {})[resource.kind] = item
    return out


def _managers(obj: Obj, managers: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(
        sorted(
            {
                str(e.get("manager"))
                for e in obj["metadata"].get("managedFields") or []
                if e.get("manager") in managers and not e.get("subresource")
            }
        )
    )


def _desired(settings: Settings, item: Obj, live: dict[str, Obj]) -> dict[str, Obj]:
    """What a reconcile renders for one ExternalService given its live gateway, by kind (empty
    for an invalid spec, whose gateway is left alone)."""
    try:
        es = parse_external_service(item, settings.ceilings)
    except InvalidExternalService:
        return {}
    service = live.get(SERVICE.kind)
    previous = HijackState.parse(
        ((service or {}).get("metadata") or {}).get("labels", {}).get(c.LABEL_HIJACK_DNS)
        if service
        else None
    )
    ready = int(((live.get(DEPLOYMENT.kind) or {}).get("status") or {}).get("readyReplicas") or 0)
    state = next_hijack_state(es.spec.hijack_dns, ready >= 1, previous)
    claimed = (
        ((service or {}).get("metadata") or {})
        .get("annotations", {})
        .get(c.ANNOTATION_CLAIMED_AT, "2000-01-01T00:00:00.000000Z")
    )
    return {obj["kind"]: obj for obj in render(es, settings, state, claimed)}


def port_renames(live_service: Obj | None, desired_service: Obj | None) -> dict[str, str]:
    """Service port names that change (old -> new), matched by port and protocol. The original
    left a single port unnamed; we name every port ``<name>-<tcp|udp>-<port>``."""
    if not live_service or not desired_service:
        return {}
    live = {
        (p.get("port"), p.get("protocol", "TCP")): p.get("name", "")
        for p in (live_service.get("spec") or {}).get("ports") or []
    }
    out = {}
    for port in desired_service["spec"]["ports"]:
        old = live.get((port["port"], port.get("protocol", "TCP")))
        if old is not None and old != port.get("name", ""):
            out[old] = port.get("name", "")
    return out


def plan_adoptions(
    kube: Kube, settings: Settings, managers: tuple[str, ...] = ORIGINAL_MANAGERS
) -> dict[str, list[Adoption]]:
    """Per ExternalService, its live gateway objects and what adopting them changes."""
    items, _ = kube.list_all(EXTERNAL_SERVICE)
    children = _gateway_children(kube, settings)
    out: dict[str, list[Adoption]] = {}
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        name = item["metadata"]["name"]
        live = children.get(name) or {}
        if not live:
            continue
        desired = _desired(settings, item, live)
        adoptions = []
        for kind in sorted(live):
            obj = live[kind]
            original = _managers(obj, (*managers, BEFORE_FIRST_APPLY))
            fields = diff(desired[kind], obj) if kind in desired else []
            rolls = kind == DEPLOYMENT.kind and (
                any(f.path.startswith("spec.template") for f in fields)
                or bool(original)  # its leftovers in the pod template go too
            )
            renamed = port_renames(obj, desired.get(kind)) if kind == SERVICE.kind else {}
            adoptions.append(
                Adoption(kind, name, obj["metadata"]["uid"], original, len(fields), rolls, renamed)
            )
        out[name] = adoptions
    return out


# Service port renames (the original's unnamed port becomes <name>-tcp-<port>) would leave the
# renamed port without endpoints until the EndpointSlice controller relabels its slice, and
# kube-proxy refuses new connections meanwhile (measured: ~0.1 s). A temporary EndpointSlice with
# the new port name and the current endpoints bridges that gap.
BRIDGE_MANAGED_BY = "egressctl-migrate"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"


def bridge_port_renames(
    kube: Kube, namespace: str, service: str, renames: dict[str, str]
) -> list[str]:
    """Create EndpointSlices carrying ``service``'s endpoints under the new port names."""
    slices, _ = kube.list_all(ENDPOINT_SLICE, namespace, f"{c.LABEL_SERVICE_NAME}={service}")
    created = []
    for i, item in enumerate(
        s
        for s in slices
        if (s["metadata"].get("labels") or {}).get(LABEL_MANAGED_BY) != BRIDGE_MANAGED_BY
    ):
        ports = [
            {**p, "name": renames[p.get("name", "")]}
            for p in item.get("ports") or []
            if p.get("name", "") in renames
        ]
        if not ports or not item.get("endpoints"):
            continue
        name = f"{service}-migrate-{i}"
        kube.create(
            ENDPOINT_SLICE,
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {
                        c.LABEL_SERVICE_NAME: service,
                        LABEL_MANAGED_BY: BRIDGE_MANAGED_BY,
                    },
                },
                "addressType": item["addressType"],
                "ports": ports,
                "endpoints": item["endpoints"],
            },
        )
        created.append(name)
    return created


def unbridge(
    kube: Kube, namespace: str, service: str, names: list[str], timeout_s: float = 30
) -> None:
    """Once the controller's slices carry the Service's port names, remove the bridges."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = kube.get(SERVICE, service, namespace)
        wanted = {p.get("name", "") for p in ((live or {}).get("spec") or {}).get("ports") or []}
        slices, _ = kube.list_all(ENDPOINT_SLICE, namespace, f"{c.LABEL_SERVICE_NAME}={service}")
        theirs = [
            s
            for s in slices
            if (s["metadata"].get("labels") or {}).get(LABEL_MANAGED_BY) != BRIDGE_MANAGED_BY
        ]
        if theirs and all(
            {p.get("name", "") for p in s.get("ports") or []} <= wanted for s in theirs
        ):
            break
        time.sleep(0.2)
    for name in names:
        kube.delete(ENDPOINT_SLICE, name, namespace)


def leftover_bridges(kube: Kube, namespace: str) -> list[Obj]:
    items, _ = kube.list_all(ENDPOINT_SLICE, namespace, f"{LABEL_MANAGED_BY}={BRIDGE_MANAGED_BY}")
    return items


# -- 4. cluster DNS ----------------------------------------------------------------------------


@dataclass
class CoreDnsState:
    deployment: str = ""
    image: str = ""
    mounts_rules: bool = False
    corefile_found: bool = False
    plugin_line: str = ""  # the original's `egressoperator ...` directive, if still there
    has_import: bool = False
    has_reload: bool = False
    rules: int = 0
    hijacked: list[str] = field(default_factory=list)  # dnsNames of Services labelled true

    @property
    def stock_image(self) -> bool:
        return "coredns/coredns" in self.image

    def steps(self, settings: Settings) -> list[tuple[bool, str]]:
        """(done, step) in the order that keeps hijacked names answering throughout."""
        ns = settings.dns_configmap_namespace
        deploy = self.deployment or "coredns"
        return [
            (
                self.mounts_rules,
                f"mount our rules ConfigMap {ns}/{settings.dns_configmap_name} into CoreDNS: "
                f"kubectl -n {ns} patch deployment {deploy} --patch-file "
                "infra/coredns/deployment-patch.yaml",
            ),
            (
                self.has_import and self.has_reload,
                f"add `import {settings.coredns_import_path}` and `reload 2s` to the Corefile's "
                f"{settings.cluster_domain} block ({ns}/{settings.coredns_configmap_name}, "
                "infra/coredns/Corefile.snippet), keeping the `egressoperator` line for now "
                "(or set MANAGE_COREDNS_IMPORT=true and let the reconciler add them)",
            ),
            (
                self.rules >= len(self.hijacked),
                f"let our rules answer: after `egressctl migrate --apply` the sweep has written "
                f"one rule per hijacked name ({self.rules} rule(s) for {len(self.hijacked)} "
                "name(s) now); check that `dig @<cluster DNS> <dnsName>` answers the gateway "
                "ClusterIP",
            ),
            (
                not self.plugin_line,
                "remove the `egressoperator ...` line from the Corefile"
                + (f" (now: {self.plugin_line!r})" if self.plugin_line else "")
                + ": both answer the same ClusterIP, so nothing changes for clients; stock "
                "CoreDNS would refuse a Corefile that still has it",
            ),
            (
                self.stock_image,
                f"set stock CoreDNS back: kubectl -n {ns} set image deployment/{deploy} "
                "coredns=<your distribution's CoreDNS image, e.g. "
                f"registry.k8s.io/coredns/coredns:v1.12.1> (now: {self.image or 'unknown'}); "
                "the Deployment rolls its pods one by one, then delete the custom image",
            ),
        ]

    def to_dict(self, settings: Settings) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "image": self.image,
            "mountsRules": self.mounts_rules,
            "pluginLine": self.plugin_line,
            "hasImport": self.has_import,
            "hasReload": self.has_reload,
            "rules": self.rules,
            "hijackedNames": self.hijacked,
            "steps": [{"done": done, "step": text} for done, text in self.steps(settings)],
        }


def plugin_directive(corefile: str) -> str:
    """The original's ``egressoperator ...`` line in a Corefile, or ''."""
    try:
        tokens = tokenize(corefile)
    except ValueError:
        return ""
    lines = corefile.split("\n")
    previous_line = 0
    for token in tokens:
        first_on_line = token.line != previous_line
        previous_line = token.last_line
        if first_on_line and not token.quoted and token.text == "egressoperator":
            return lines[token.line - 1].strip()
    return ""


def inspect_coredns(kube: Kube, settings: Settings) -> CoreDnsState:
    ns = settings.dns_configmap_namespace
    state = CoreDnsState()
    deployment = kube.get(DEPLOYMENT, "coredns", ns)
    if deployment is None:
        items, _ = kube.list_all(DEPLOYMENT, ns, label_selector="k8s-app=kube-dns")
        deployment = items[0] if items else None
    if deployment is not None:
        pod = deployment["spec"]["template"]["spec"]
        state.deployment = deployment["metadata"]["name"]
        containers = pod.get("containers") or []
        coredns = next((ct for ct in containers if ct.get("name") == "coredns"), None)
        state.image = str((coredns or (containers[0] if containers else {})).get("image", ""))
        # As one configMap volume (earlier versions) or one source of a projected volume.
        state.mounts_rules = any(
            settings.dns_configmap_name
            in {
                (v.get("configMap") or {}).get("name"),
                *(
                    (source.get("configMap") or {}).get("name")
                    for source in (v.get("projected") or {}).get("sources") or []
                ),
            }
            for v in pod.get("volumes") or []
        )
    corefile_cm = kube.get(CONFIGMAP, settings.coredns_configmap_name, ns)
    corefile = ((corefile_cm or {}).get("data") or {}).get(settings.corefile_key, "")
    if corefile:
        state.corefile_found = True
        state.plugin_line = plugin_directive(corefile)
        verdict = check_corefile(
            corefile, f"import {settings.coredns_import_path}", settings.cluster_domain
        )
        state.has_import, state.has_reload = verdict.has_import, verdict.has_reload
    state.rules = _rules_in(kube, settings)
    services, _ = kube.list_all(
        SERVICE, settings.gateway_namespace, f"{c.LABEL_HIJACK_DNS}={HijackState.TRUE.value}"
    )
    state.hijacked = sorted(
        (s["metadata"].get("annotations") or {}).get(c.ANNOTATION_DNS_NAME, "") for s in services
    )
    return state


# -- 5. settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SettingMapping:
    original: str
    value: str
    ours: str
    our_value: str
    note: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "original": self.original,
            "value": self.value,
            "ours": self.ours,
            "ourValue": self.our_value,
            "note": self.note,
        }


def map_settings(env: dict[str, str], args: list[str]) -> tuple[list[SettingMapping], list[str]]:
    """The original manager's environment and flags as our settings, and what our settings
    parser says about the result (empty: they start)."""
    out: list[SettingMapping] = []
    ours: dict[str, str] = {}
    for name in SAME_NAME_SETTINGS:
        if name not in env:
            continue
        value = env[name]
        note = ""
        if name == "ENVOY_IMAGE":
            note = (
                "the original's Envoy 1.16 cannot run this product's bootstrap: leave "
                "ENVOY_IMAGE unset for the pinned default, or give a current release whose "
                "image runs as uid 101"
            )
            out.append(SettingMapping(name, value, name, "(unset)", note))
            continue
        ours[name] = value
        out.append(SettingMapping(name, value, name, value))
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag == PDB_FLAG and value.lower() not in ("false", "0"):
            ours["ENABLE_PDB"] = "true"
            out.append(SettingMapping(arg, "", "ENABLE_PDB", "true"))
        elif flag in IGNORED_FLAGS:
            out.append(
                SettingMapping(arg, "", "-", "", "not needed: no long-running controller here")
            )
        elif flag.startswith("-"):
            out.append(SettingMapping(arg, "", "?", "", "not a flag this product knows"))
    for name in sorted(set(env) - set(SAME_NAME_SETTINGS)):
        out.append(SettingMapping(name, env[name], "?", "", "not read by this product"))
    out.append(
        SettingMapping(
            "(namespace egress-operator-system)",
            "",
            "GATEWAY_NAMESPACE",
            "egress-operator-system",
            "the default: gateways stay where they are",
        )
    )
    try:
        Settings.from_env(ours)
        problems: list[str] = []
    except SettingsError as exc:
        problems = [str(exc)]
    return out, problems


# -- the plan and its application ---------------------------------------------------------------


@dataclass
class MigrationPlan:
    original: OriginalController
    crd: CrdState
    stored: list[Stored]
    adoptions: dict[str, list[Adoption]]
    coredns: CoreDnsState
    settings_map: list[SettingMapping]
    settings_problems: list[str]
    settings: Settings

    @property
    def blockers(self) -> list[str]:
        return self.original.blockers()

    @property
    def rolls(self) -> list[str]:
        return [name for name, items in self.adoptions.items() if any(a.rolls for a in items)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "blockers": self.blockers,
            "original": self.original.to_dict(),
            "crd": self.crd.to_dict(),
            "storedExternalServices": [s.to_dict() for s in self.stored],
            "adoptions": {
                name: [a.to_dict() for a in items] for name, items in self.adoptions.items()
            },
            "rollingRestarts": self.rolls,
            "coredns": self.coredns.to_dict(self.settings),
            "settings": [m.to_dict() for m in self.settings_map],
            "settingsProblems": self.settings_problems,
        }

    def lines(self) -> list[str]:
        out = []
        state = "RUNNING: the migration is refused" if self.original.running else "stopped"
        out.append(f"1. the original operator (namespace {self.original.namespace}): {state}")
        for d in self.original.deployments:
            out.append(
                f"   Deployment {d.name}: {d.ready} ready of {d.replicas} replica(s), "
                f"{d.pods} pod(s)"
            )
        for lk in self.original.locks:
            out.append(
                f"   {lk.kind} {lk.name}: holder {lk.holder or '(none)'}, renewed "
                f"{lk.renewed or '-'}, {'FRESH' if lk.fresh else 'expired'}"
            )
        if not self.original.deployments and not self.original.locks:
            out.append("   no manager Deployment and no leader-election lock found")
        out.append(f"2. {self.crd.describe()}")
        invalid = [s for s in self.stored if s.problems]
        out.append(
            f"3. {len(self.stored)} stored ExternalService(s) kept as they are (same UID, spec "
            f"and resourceVersion); {len(invalid)} invalid for this product (Valid=False, "
            "their gateways left running untouched until fixed)"
        )
        for s in invalid:
            out.append(f"   ! {s.name}: {'; '.join(s.problems)}")
        objects = sum(len(items) for items in self.adoptions.values())
        original = sum(1 for items in self.adoptions.values() for a in items if a.original_managers)
        out.append(
            f"4. {objects} gateway object(s) of {len(self.adoptions)} gateway(s) adopted in place "
            f"(same UIDs and ClusterIPs; {original} written by the original's field manager "
            f"hand their fields over); one rolling restart per gateway whose pod template "
            f"changes: {len(self.rolls)} ({', '.join(self.rolls) or 'none'})"
        )
        for name, items in self.adoptions.items():
            parts = [
                f"{a.kind}{' (rolls once)' if a.rolls else ''}"
                + "".join(
                    f" (port {old or '(unnamed)'} renamed {new}: bridged, no connection refused)"
                    for old, new in a.renamed_ports.items()
                )
                + (f" [{', '.join(a.original_managers)}]" if a.original_managers else "")
                for a in items
            ]
            out.append(f"   {name}: {', '.join(parts)}")
        out.append("5. cluster DNS, from the custom CoreDNS image to stock CoreDNS with our rules:")
        for i, (done, step) in enumerate(self.coredns.steps(self.settings), 1):
            out.append(f"   {'[x]' if done else '[ ]'} {i}. {step}")
        out.append("6. settings (set ours on the functions: cloudbuild.yaml's functions-env step):")
        for m in self.settings_map:
            value = f"={m.value}" if m.value else ""
            target = f"{m.ours}={m.our_value}" if m.our_value else m.ours
            out.append(f"   {m.original}{value} -> {target}" + (f"  ({m.note})" if m.note else ""))
        for problem in self.settings_problems:
            out.append(f"   ! {problem}")
        return out


def plan_migration(
    kube: Kube,
    settings: Settings,
    crd_manifest: Obj,
    *,
    namespace: str = ORIGINAL_NAMESPACE,
    deployment: str = ORIGINAL_DEPLOYMENT,
    lock_names: tuple[str, ...] = ORIGINAL_LOCK_NAMES,
    managers: tuple[str, ...] = ORIGINAL_MANAGERS,
    now: dt.datetime | None = None,
) -> MigrationPlan:
    original = detect_original(kube, namespace, deployment, lock_names, now)
    settings_map, problems = map_settings(original.env, original.args)
    return MigrationPlan(
        original=original,
        crd=inspect_crd(kube, crd_manifest),
        stored=stored_objects(kube, settings),
        adoptions=plan_adoptions(kube, settings, managers),
        coredns=inspect_coredns(kube, settings),
        settings_map=settings_map,
        settings_problems=problems,
        settings=settings,
    )


@dataclass
class MigrationReport:
    crd_replaced: bool
    kept: int  # stored ExternalServices with the same UID and resourceVersion afterwards
    changed: list[str]  # ... whose UID or resourceVersion changed (someone wrote meanwhile)
    taken_over: dict[str, list[str]]  # "Kind name" -> managers whose fields were handed to us
    same_uid: int  # gateway objects adopted with their UID
    recreated: list[str]  # gateway objects whose UID changed (none expected)
    rolled: list[str]  # gateways whose Deployment pod template changed: one rolling restart
    sweep: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "crdReplaced": self.crd_replaced,
            "storedKept": self.kept,
            "storedChanged": self.changed,
            "takenOver": self.taken_over,
            "gatewayObjectsSameUid": self.same_uid,
            "gatewayObjectsRecreated": self.recreated,
            "rollingRestarts": self.rolled,
            "sweep": self.sweep,
        }

    def lines(self) -> list[str]:
        return [
            "CRD: " + ("replaced in place by ours" if self.crd_replaced else "already ours"),
            f"stored ExternalServices: {self.kept} kept untouched (same UID and resourceVersion)"
            + (f"; changed meanwhile: {', '.join(self.changed)}" if self.changed else ""),
            f"gateway objects: {self.same_uid} adopted with their UID"
            + (f"; recreated: {', '.join(self.recreated)}" if self.recreated else "")
            + f"; fields handed over from the original on {len(self.taken_over)}",
            f"rolling restarts: {len(self.rolled)} (one per gateway: "
            f"{', '.join(self.rolled) or 'none'})",
            f"sweep: {self.sweep.get('outcomes')}, {len(self.sweep.get('errors') or [])} error(s), "
            f"{len(self.sweep.get('fights') or [])} fight(s)",
        ]


def apply_migration(
    kube: Kube,
    settings: Settings,
    crd_manifest: Obj,
    sweep: Callable[[], Any],
    *,
    namespace: str = ORIGINAL_NAMESPACE,
    deployment: str = ORIGINAL_DEPLOYMENT,
    lock_names: tuple[str, ...] = ORIGINAL_LOCK_NAMES,
    managers: tuple[str, ...] = ORIGINAL_MANAGERS,
    crd_field_manager: str = CRD_FIELD_MANAGER,
    clock: Clock = _utcnow,
) -> MigrationReport:
    """Check again that the original is stopped, replace the CRD, hand the original's fields
    over and sweep once (``sweep`` returns a SweepReport: the caller builds the reconciler)."""
    original = detect_original(kube, namespace, deployment, lock_names, clock())
    if original.running:
        raise MigrationRefused(original.blockers())
    crd = inspect_crd(kube, crd_manifest)
    before = {s.name: s for s in stored_objects(kube, settings)}
    children_before = _gateway_children(kube, settings)
    replaced = crd.flavour != "ours"
    if replaced:
        replace_crd(kube, crd_manifest, crd_field_manager)
    after = {s.name: s for s in stored_objects(kube, settings)}
    changed = sorted(
        name
        for name, s in before.items()
        if name not in after
        or (after[name].uid, after[name].resource_version) != (s.uid, s.resource_version)
    )
    taken_over: dict[str, list[str]] = {}
    # Objects last written before field management (Kubernetes < 1.18) have no entries: an
    # apply of nothing makes the API server record their fields as "before-first-apply".
    from_managers = (*managers, BEFORE_FIRST_APPLY)
    for gateway, kinds in sorted(children_before.items()):
        for kind, obj in sorted(kinds.items()):
            resource = next(r for r in GATEWAY_KINDS if r.kind == kind)
            if not obj["metadata"].get("managedFields"):
                kube.apply(
                    {
                        "apiVersion": resource.api_version,
                        "kind": kind,
                        "metadata": {"name": gateway, "namespace": settings.gateway_namespace},
                    }
                )
            elif not _managers(obj, from_managers):
                continue
            got = take_over_fields(
                kube,
                resource,
                gateway,
                settings.gateway_namespace,
                c.FIELD_MANAGER,
                lambda e: e.get("manager") in from_managers,
                clock(),
            )
            if got:
                taken_over[f"{kind} {gateway}"] = got
    ns = settings.gateway_namespace
    for leftover in leftover_bridges(kube, ns):  # from an interrupted run
        kube.delete(ENDPOINT_SLICE, leftover["metadata"]["name"], ns)
    items = {i["metadata"]["name"]: i for i in kube.list_all(EXTERNAL_SERVICE)[0]}
    bridges: dict[str, list[str]] = {}
    for gateway, kinds in sorted(children_before.items()):
        if gateway not in items or SERVICE.kind not in kinds:
            continue
        desired = _desired(settings, items[gateway], kinds)
        renames = port_renames(kinds[SERVICE.kind], desired.get(SERVICE.kind))
        if renames:
            bridges[gateway] = bridge_port_renames(kube, ns, gateway, renames)
    try:
        report = sweep()
    finally:
        for gateway, names in bridges.items():
            unbridge(kube, ns, gateway, names)
    children_after = _gateway_children(kube, settings)
    same = 0
    recreated = []
    for gateway, kinds in children_before.items():
        for kind, obj in kinds.items():
            now_obj = (children_after.get(gateway) or {}).get(kind)
            if now_obj is not None and now_obj["metadata"]["uid"] == obj["metadata"]["uid"]:
                same += 1
            else:
                recreated.append(f"{kind} {gateway}")
    rolled = sorted(
        gateway
        for gateway, kinds in children_before.items()
        if DEPLOYMENT.kind in kinds
        and (children_after.get(gateway) or {}).get(DEPLOYMENT.kind) is not None
        and kinds[DEPLOYMENT.kind]["spec"]["template"]
        != children_after[gateway][DEPLOYMENT.kind]["spec"]["template"]
    )
    return MigrationReport(
        replaced,
        len(before) - len(changed),
        changed,
        taken_over,
        same,
        sorted(recreated),
        rolled,
        report.to_dict(),
    )


# -- the way back ------------------------------------------------------------------------------


OUR_ANNOTATIONS = (c.ANNOTATION_DELETE_AFTER, c.ANNOTATION_TAKEN_BACK)


@dataclass(frozen=True, slots=True)
class Release:
    name: str
    deleting: bool
    finalizer: bool
    annotations: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "deleting": self.deleting,
            "finalizer": self.finalizer,
            "annotations": list(self.annotations),
        }


@dataclass
class UninstallPlan:
    releases: list[Release]
    untouched: int
    exporter: ManagerDeployment | None
    dns_rules: int
    dns_configmap: str

    @property
    def blockers(self) -> list[str]:
        if self.exporter is not None and self.exporter.running:
            return [
                f"our exporter runs (Deployment {self.exporter.name}: {self.exporter.ready} "
                f"ready of {self.exporter.replicas}): with the functions it would add the "
                "finalizer back at once. Stop the control loop first: pause the Cloud "
                "Scheduler job egress-sweep, delete the functions (or stop `make run`), and "
                f"kubectl -n <gateway namespace> scale deployment {self.exporter.name} "
                "--replicas=0"
            ]
        return []

    def to_dict(self) -> dict[str, Any]:
        return {
            "blockers": self.blockers,
            "releases": [r.to_dict() for r in self.releases],
            "untouched": self.untouched,
            "dnsRules": self.dns_rules,
            "dnsConfigMap": self.dns_configmap,
        }

    def lines(self, clear_dns: bool) -> list[str]:
        out = [
            f"{len(self.releases)} ExternalService(s) carry our finalizer or annotations; "
            f"{self.untouched} carry none"
        ]
        for r in self.releases:
            what = ([c.FINALIZER] if r.finalizer else []) + list(r.annotations)
            state = " (deleted: stays Terminating until released)" if r.deleting else ""
            out.append(f"  - {r.name}{state}: release {', '.join(what)}")
        out.append(
            "gateway objects, the CRD, the status of each ExternalService and the gateway "
            "namespace stay: the original operator adopts the gateways by patching them (one "
            "rolling restart each), and a deleted ExternalService's gateway goes with it "
            "(owner references)"
        )
        if clear_dns:
            out.append(
                f"our DNS rules ConfigMap {self.dns_configmap}: its {self.dns_rules} rule(s) "
                "are removed (hijacked names then answer from the original's CoreDNS plugin, "
                "or with their real addresses)"
            )
        else:
            out.append(
                f"our DNS rules ConfigMap {self.dns_configmap} keeps its {self.dns_rules} "
                "rule(s), which nobody updates any more: once the original's CoreDNS plugin "
                "answers (or if nothing should), run again with --clear-dns"
            )
        return out


def plan_uninstall(
    kube: Kube, settings: Settings, exporter: str = EXPORTER_DEPLOYMENT
) -> UninstallPlan:
    items, _ = kube.list_all(EXTERNAL_SERVICE)
    releases = []
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        meta = item["metadata"]
        finalizer = c.FINALIZER in (meta.get("finalizers") or [])
        annotations = tuple(a for a in OUR_ANNOTATIONS if a in (meta.get("annotations") or {}))
        if finalizer or annotations:
            releases.append(
                Release(meta["name"], bool(meta.get("deletionTimestamp")), finalizer, annotations)
            )
    live_exporter = kube.get(DEPLOYMENT, exporter, settings.gateway_namespace)
    return UninstallPlan(
        releases,
        len(items) - len(releases),
        _deployment_state(live_exporter) if live_exporter is not None else None,
        _rules_in(kube, settings),
        f"{settings.dns_configmap_namespace}/{settings.dns_configmap_name}",
    )


def _rules_in(kube: Kube, settings: Settings) -> int:
    """Rewrite rules in all of our rules ConfigMaps (the settle marker counts as one)."""
    total = 0
    for name in settings.dns_configmap_names:
        live = kube.get(CONFIGMAP, name, settings.dns_configmap_namespace)
        total += sum(text.count("rewrite ") for text in ((live or {}).get("data") or {}).values())
    return total


def release(kube: Kube, name: str) -> bool:
    """Remove our finalizer and annotations from one ExternalService, atomically (a JSON patch
    that tests the finalizers it replaces). False if there was nothing to remove."""
    for _ in range(5):
        live = kube.get(EXTERNAL_SERVICE, name)
        if live is None:
            return False
        meta = live["metadata"]
        finalizers = meta.get("finalizers") or []
        annotations = meta.get("annotations") or {}
        ops: list[Obj] = []
        if c.FINALIZER in finalizers:
            ops += [
                {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
                {
                    "op": "replace",
                    "path": "/metadata/finalizers",
                    "value": [f for f in finalizers if f != c.FINALIZER],
                },
            ]
        for key in OUR_ANNOTATIONS:
            if key in annotations:
                ops.append(
                    {"op": "remove", "path": "/metadata/annotations/" + key.replace("/", "~1")}
                )
        if not ops:
            return False
        try:
            kube.json_patch(EXTERNAL_SERVICE, name, ops, final_statuses=frozenset({409, 422}))
            return True
        except PermanentError as exc:
            if exc.status in (409, 422):  # the finalizers changed meanwhile (test failed)
                continue
            if exc.status == 404:
                return False
            raise
    raise PermanentError(f"ExternalService {name}: kept changing while being released")


def apply_uninstall(
    kube: Kube, settings: Settings, *, clear_dns: bool = False, exporter: str = EXPORTER_DEPLOYMENT
) -> dict[str, Any]:
    plan = plan_uninstall(kube, settings, exporter)
    if plan.blockers:
        raise MigrationRefused(plan.blockers)
    released = [r.name for r in plan.releases if release(kube, r.name)]
    cleared = 0
    if clear_dns:
        ns = settings.dns_configmap_namespace
        for name in settings.dns_configmap_names:
            live = kube.get(CONFIGMAP, name, ns)
            data = (live or {}).get("data") or {}
            if data:
                kube.merge_patch(CONFIGMAP, name, {"data": dict.fromkeys(data)}, ns)
        cleared = plan.dns_rules
    gone = [
        r.name for r in plan.releases if r.deleting and kube.get(EXTERNAL_SERVICE, r.name) is None
    ]
    return {"released": released, "deletedOnRelease": gone, "dnsRulesCleared": cleared}
