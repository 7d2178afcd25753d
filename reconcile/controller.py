"""Converge one ExternalService, or all of them, from live state. Stateless and level-triggered.

Every call reads what the cluster holds now, renders what it should hold, and writes only the
difference, so duplicated, reordered or stale notices are harmless and two processes working on
the same object at once both end in the same state (server-side apply with one field manager,
``force`` taking back fields someone edited by hand, once: a writer that keeps rewriting them is
reported and left alone, see reconcile.fights).

Deletion never causes an outage: the finalizer keeps a deleted ExternalService while its DNS
rule is withdrawn and a grace period passes (recorded on the object, since a function cannot
sleep through it); a later notice or sweep then removes the gateway and releases the object.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from core import constants as c
from core.errors import PermanentError, ReconcileError, TransientError
from core.hijack import HijackState, next_hijack_state
from core.kube import (
    BY_KIND,
    DEPLOYMENT,
    EXTERNAL_SERVICE,
    GATEWAY_KINDS,
    PDB,
    SERVICE,
    Kube,
    Obj,
    field_conflicts,
    lean,
)
from core.settings import Settings
from core.spec import ExternalService, InvalidExternalService, parse_external_service
from dns.delivery import (
    REASON_UNAVAILABLE,
    DnsDelivery,
    DnsReport,
    DnsVerdicts,
    claims_from_services,
)
from dns.render import Claim, normalize_dns_name
from dns.render import render as render_dns
from gateway.render import render
from reconcile.drift import FieldDiff, diff, with_applied_hash
from reconcile.fights import Fight, TakeBack, applied_at, condition_message, encode, fights, memory

Clock = Callable[[], dt.datetime]
# Items per LIST page in a sweep: few requests (10,000 gateways: 5 pages per kind) while only
# one page is held whole at a time (bench.sweep measures both).
SWEEP_PAGE_SIZE = 2000
# Condition messages stay readable in `kubectl describe` (the API server's own limit is 32 KiB).
MAX_MESSAGE = 1024
NO_STATUS_SUBRESOURCE = (
    "ExternalService {name} exists but its status cannot be written (404): the installed "
    "ExternalService CRD has no status subresource, like the original egress-operator's CRD. "
    "Install this product's CRD, which keeps every stored ExternalService: `egressctl migrate` "
    "shows the steps and `egressctl migrate --apply` takes them (or `kubectl apply "
    "--server-side --force-conflicts -f infra/crd/externalservices.yaml`)"
)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _timestamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_timestamp(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return None


class Outcome(StrEnum):
    """How one reconcile ended: the ``outcome`` of its result, report and log line."""

    CONVERGED = "converged"  # writes were needed and made
    IN_SYNC = "in-sync"  # nothing to write
    INVALID = "invalid"  # spec refused; condition written, gateway untouched
    CONFLICT = "conflict"  # a foreign object holds one of our names
    NOT_FOUND = "not-found"
    DELETING = "deleting"  # DNS withdrawn, waiting out the grace period
    DELETED = "deleted"
    CONTESTED = "contested"  # another field manager keeps rewriting our fields (reconcile.fights)


class Action(StrEnum):
    """What a reconcile did (or, dry, would do) to one object."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    kind: str
    name: str
    namespace: str | None
    fields: tuple[FieldDiff, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "kind": self.kind,
            "name": self.name,
            "namespace": self.namespace,
            "fields": [f.to_dict() for f in self.fields],
        }


@dataclass
class Result:
    name: str
    outcome: Outcome
    changes: list[Change] = field(default_factory=list)
    hijack_state: str | None = None
    requeue_after_s: float | None = None
    message: str = ""
    fights: list[Fight] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "outcome": self.outcome,
            "changes": [ch.to_dict() for ch in self.changes],
        }
        if self.fights:
            out["fights"] = [f.to_dict() for f in self.fights]
        if self.hijack_state is not None:
            out["hijackState"] = self.hijack_state
        if self.requeue_after_s is not None:
            out["requeueAfterSeconds"] = round(self.requeue_after_s, 1)
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class SweepReport:
    results: list[Result] = field(default_factory=list)
    pruned: list[Change] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    dns: DnsReport | None = None
    # `egressctl access` findings, when SWEEP_ACCESS_AUDIT is on (None when it is off).
    access: list[dict[str, Any]] | None = None
    # A shard's sweep (deliver=False): the Corefile import line its DNS prediction added.
    corefile_added: str = ""

    @property
    def drift(self) -> list[Change]:
        return [ch for r in self.results for ch in r.changes] + self.pruned

    @property
    def fights(self) -> list[Fight]:
        return [f for r in self.results for f in r.fights]

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        return {
            "externalServices": len(self.results),
            "outcomes": counts,
            "drift": [ch.to_dict() for ch in self.drift],
            "results": [
                r.to_dict() for r in self.results if r.changes or r.outcome != Outcome.IN_SYNC
            ],
            "errors": self.errors,
            "fights": [f.to_dict() for f in self.fights],
            "dns": self.dns.to_dict() if self.dns is not None else None,
            **({"access": self.access} if self.access is not None else {}),
        }


@dataclass
class Observed:
    """Live state of one gateway: its ExternalService and our children by kind."""

    external_service: Obj | None
    children: dict[str, Obj] = field(default_factory=dict)
    foreign: dict[str, Obj] = field(default_factory=dict)
    # Computed once per reconcile (or sweep), so the sweep's DNS prediction and the Service it
    # then applies agree.
    claimed_at: str = ""


def _pack(obj: Obj) -> bytes:
    """A listed object as a sweep holds it until its turn: compressed JSON, about a
    twentieth of the parsed dict's memory (a sweep holds every gateway at once)."""
    return zlib.compress(json.dumps(lean(obj), separators=(",", ":")).encode(), 1)


def _unpack(packed: bytes) -> Obj:
    obj: Obj = json.loads(zlib.decompress(packed))
    return obj


@dataclass(slots=True)
class _Listed:
    """One gateway as a sweep listed it, packed (``_pack``) until it is reconciled."""

    external_service: bytes
    deleting: bool
    children: dict[str, bytes] = field(default_factory=dict)
    foreign: dict[str, bytes] = field(default_factory=dict)
    claimed_at: str = ""

    def observed(self) -> Observed:
        return Observed(
            _unpack(self.external_service),
            {kind: _unpack(obj) for kind, obj in self.children.items()},
            {kind: _unpack(obj) for kind, obj in self.foreign.items()},
            self.claimed_at,
        )


def _unpacked(listed: dict[str, _Listed]) -> Iterator[tuple[str, Observed]]:
    """Each listed gateway unpacked in turn (one at a time in memory); a claim time the
    consumer computed is kept for the gateway's reconcile."""
    for name, gateway in listed.items():
        observed = gateway.observed()
        yield name, observed
        gateway.claimed_at = observed.claimed_at


def _ours(obj: Obj, name: str) -> bool:
    return (obj.get("metadata", {}).get("labels") or {}).get(c.LABEL_GATEWAY) == name


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        *,
        clock: Clock = utcnow,
        dns: DnsDelivery | None = None,
        force_conflicts: bool = False,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.dns = dns
        # Take fields back even from a manager that keeps rewriting them (see reconcile.fights):
        # what an operator asks for once the other writer is stopped.
        self.force_conflicts = force_conflicts

    # -- observation -----------------------------------------------------------------------

    def observe(self, name: str) -> Observed:
        es = self.kube.get(EXTERNAL_SERVICE, name)
        observed = Observed(es)
        if es is None:
            return observed
        for resource in GATEWAY_KINDS:
            live = self.kube.get(resource, name, self.settings.gateway_namespace)
            if live is not None:
                live.setdefault("apiVersion", resource.api_version)
                live.setdefault("kind", resource.kind)
                target = observed.children if _ours(live, name) else observed.foreign
                target[resource.kind] = live
        return observed

    # -- one ExternalService ---------------------------------------------------------------

    def reconcile(
        self, name: str, observed: Observed | None = None, dns_verdicts: DnsVerdicts | None = None
    ) -> Result:
        """Converge one ExternalService.

        ``observed`` and ``dns_verdicts`` come from a sweep, which has listed everything and
        delivers DNS once at its end; a single reconcile reads and delivers for itself.
        """
        obs = observed if observed is not None else self.observe(name)
        es_obj = obs.external_service
        if es_obj is None:
            return Result(name, Outcome.NOT_FOUND, message="no such ExternalService")
        if es_obj.get("metadata", {}).get("deletionTimestamp"):
            return self._finalize(name, es_obj, obs)
        try:
            es = parse_external_service(es_obj, self.settings.ceilings)
        except InvalidExternalService as exc:
            return self._invalid(name, es_obj, exc)
        if obs.foreign:
            kinds = ", ".join(sorted(obs.foreign))
            message = (
                f"{kinds} named {name!r} in namespace {self.settings.gateway_namespace} "
                "exist(s) without our labels; refusing to take them over"
            )
            self._write_status(
                es_obj, self._not_ready_status(es_obj, "NameConflict", message, dns_too=True)
            )
            return Result(name, Outcome.CONFLICT, message=message)
        return self._converge(es, es_obj, obs, dns_verdicts)

    def _hijack_state(
        self, es: ExternalService, obs: Observed
    ) -> tuple[HijackState | None, HijackState, int]:
        """(previous, next) hijack state and the ready replicas, from live objects."""
        live_service = obs.children.get(SERVICE.kind)
        previous = HijackState.parse(
            ((live_service or {}).get("metadata") or {}).get("labels", {}).get(c.LABEL_HIJACK_DNS)
            if live_service
            else None
        )
        ready_replicas = _ready_replicas(obs.children.get(DEPLOYMENT.kind))
        return (
            previous,
            next_hijack_state(es.spec.hijack_dns, ready_replicas >= 1, previous),
            ready_replicas,
        )

    def _claimed_at(
        self,
        es: ExternalService,
        obs: Observed,
        previous: HijackState | None,
        state: HijackState,
    ) -> str:
        """When this gateway's claim on its dnsName began: kept while the hijack state stays
        ``true`` for the same name, new when it turns ``true`` or the name changes, none
        otherwise. The oldest claim holds a contested name, so an old ExternalService that
        edits its dnsName to a name another gateway serves cannot take it over."""
        if state is not HijackState.TRUE:
            return ""
        if obs.claimed_at:
            return obs.claimed_at
        service = obs.children.get(SERVICE.kind) or {}
        annotations = (service.get("metadata") or {}).get("annotations") or {}
        kept = annotations.get(c.ANNOTATION_CLAIMED_AT, "")
        same_name = normalize_dns_name(
            annotations.get(c.ANNOTATION_DNS_NAME, "")
        ) == normalize_dns_name(es.spec.dns_name)
        if kept and same_name and previous is HijackState.TRUE:
            obs.claimed_at = kept
        else:
            obs.claimed_at = self.clock().astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return obs.claimed_at

    def _converge(
        self, es: ExternalService, es_obj: Obj, obs: Observed, dns_verdicts: DnsVerdicts | None
    ) -> Result:
        changes: list[Change] = []
        if c.FINALIZER not in (es_obj["metadata"].get("finalizers") or []):
            self.kube.apply(
                {
                    "apiVersion": c.API_VERSION,
                    "kind": c.KIND,
                    "metadata": {"name": es.name, "finalizers": [c.FINALIZER]},
                }
            )
        live_service = obs.children.get(SERVICE.kind)
        previous, state, ready_replicas = self._hijack_state(es, obs)
        claimed_at = self._claimed_at(es, obs, previous, state)
        desired = [with_applied_hash(obj) for obj in render(es, self.settings, state, claimed_at)]
        applied_service = live_service
        found: list[Fight] = []
        taken_back: dict[str, TakeBack] = {}
        for obj in desired:
            kind = obj["kind"]
            live = obs.children.get(kind)
            fields = diff(obj, live)
            if not fields:
                continue
            try:
                result = self._apply_child(es_obj, obj, live, found, taken_back)
            except PermanentError as exc:
                self._refused_status(es_obj, kind, exc)
                raise
            if result is None:  # contested: left as the other writer keeps it
                continue
            if kind == SERVICE.kind:
                applied_service = result
            changes.append(
                Change(
                    Action.CREATE if live is None else Action.UPDATE,
                    kind,
                    es.name,
                    self.settings.gateway_namespace,
                    tuple(fields) if live is not None else (),
                )
            )
        desired_kinds = {obj["kind"] for obj in desired}
        for kind, live in obs.children.items():
            if kind not in desired_kinds:
                changes.append(self._delete_child(BY_KIND[kind].kind, live))
        refusal: tuple[str, str] | None = None
        if dns_verdicts is not None:
            refusal = dns_verdicts.refusal(es.name)
        elif self.dns is not None and (es.spec.hijack_dns or previous is HijackState.TRUE):
            refusal = self.dns.sync(self.kube).refusal(es.name)
        if taken_back:
            self._remember_take_back(es_obj, taken_back)
        cluster_ip = ((applied_service or {}).get("spec") or {}).get("clusterIP")
        status = self._ready_status(es_obj, state, ready_replicas, cluster_ip, refusal)
        if found:
            message = condition_message(es.name, found)[:MAX_MESSAGE]
            status["conditions"] += self._conditions(
                es_obj, [("Conflict", "True", "FieldManagerConflict", message)]
            )
        self._write_status(es_obj, status)
        outcome = Outcome.CONVERGED if changes else Outcome.IN_SYNC
        if found:
            outcome = Outcome.CONTESTED
        return Result(es.name, outcome, changes, hijack_state=state.value, fights=found)

    def _apply_child(
        self,
        es_obj: Obj,
        obj: Obj,
        live: Obj | None,
        found: list[Fight],
        taken_back: dict[str, TakeBack],
    ) -> Obj | None:
        """Apply one gateway object; None when another manager keeps rewriting it.

        Without force first: a 409 names whoever owns fields we set (reconcile.fights). Those
        are taken back by force, unless the same manager already rewrote them after our last
        take-back: then the object is left alone and the fight reported."""
        if live is None:
            return self.kube.apply(obj)
        try:
            return self.kube.apply(obj, force=False)
        except PermanentError as exc:
            if exc.status != 409:
                raise
            conflicts = field_conflicts(exc)
            if not conflicts:
                raise TransientError(str(exc), exc.status) from exc
        kind = obj["kind"]
        contested = fights(kind, live, conflicts, memory(es_obj).get(kind))
        if contested and not self.force_conflicts:
            found.extend(contested)
            return None
        result = self.kube.apply(obj)
        taken_back[kind] = TakeBack(
            tuple(sorted(conflicts)), applied_at(result) or _timestamp(self.clock())
        )
        return result

    def _remember_take_back(self, es_obj: Obj, taken_back: dict[str, TakeBack]) -> None:
        """Record on the ExternalService whom we took fields back from, and when."""
        entries = {**memory(es_obj), **taken_back}
        self.kube.merge_patch(
            EXTERNAL_SERVICE,
            es_obj["metadata"]["name"],
            {"metadata": {"annotations": {c.ANNOTATION_TAKEN_BACK: encode(entries)}}},
        )

    def _delete_child(self, kind: str, live: Obj) -> Change:
        meta = live["metadata"]
        self.kube.delete(
            BY_KIND[kind], meta["name"], meta.get("namespace"), uid=meta.get("uid", "")
        )
        return Change(Action.DELETE, kind, meta["name"], meta.get("namespace"))

    def _invalid(self, name: str, es_obj: Obj, exc: InvalidExternalService) -> Result:
        message = "; ".join(str(e) for e in exc.errors)
        previous = es_obj.get("status") or {}
        status = {
            **{
                k: v
                for k, v in previous.items()
                if k in ("clusterIP", "readyReplicas", "hijackState")
            },
            "observedGeneration": _generation(es_obj),
            "conditions": self._conditions(
                es_obj,
                [
                    ("Valid", "False", "InvalidSpec", message),
                    (
                        "Ready",
                        _condition_status(es_obj, "Ready") or "False",
                        "InvalidSpec",
                        "spec is invalid; the last good gateway, if any, is left running untouched",
                    ),
                    (
                        "DnsHijacked",
                        _condition_status(es_obj, "DnsHijacked") or "False",
                        "InvalidSpec",
                        "spec is invalid; DNS is left as it was",
                    ),
                ],
            ),
        }
        self._write_status(es_obj, status)
        return Result(name, Outcome.INVALID, message=message)

    # -- deletion --------------------------------------------------------------------------

    def _finalize(self, name: str, es_obj: Obj, obs: Observed) -> Result:
        meta = es_obj["metadata"]
        if c.FINALIZER not in (meta.get("finalizers") or []):
            return Result(name, Outcome.DELETING, message="waiting for other finalizers")
        changes: list[Change] = []
        service = obs.children.get(SERVICE.kind)
        if (
            service is not None
            and service["metadata"].get("labels", {}).get(c.LABEL_HIJACK_DNS) != "false"
        ):
            self.kube.merge_patch(
                SERVICE,
                name,
                {"metadata": {"labels": {c.LABEL_HIJACK_DNS: HijackState.FALSE.value}}},
                self.settings.gateway_namespace,
            )
            changes.append(
                Change(Action.UPDATE, SERVICE.kind, name, self.settings.gateway_namespace)
            )
            if self.dns is not None:
                self.dns.sync(self.kube)
        now = self.clock()
        deadline = _parse_timestamp(
            (meta.get("annotations") or {}).get(c.ANNOTATION_DELETE_AFTER, "")
        )
        if deadline is None:
            deadline = now + dt.timedelta(seconds=self.settings.delete_grace_s)
            if self.settings.delete_grace_s > 0:
                self.kube.merge_patch(
                    EXTERNAL_SERVICE,
                    name,
                    {
                        "metadata": {
                            "annotations": {c.ANNOTATION_DELETE_AFTER: _timestamp(deadline)}
                        }
                    },
                )
        if now < deadline:
            remaining = (deadline - now).total_seconds()
            return Result(
                name,
                Outcome.DELETING,
                changes,
                requeue_after_s=remaining,
                message=f"DNS withdrawn; gateway removed after {_timestamp(deadline)}",
            )
        for kind, live in obs.children.items():
            changes.append(self._delete_child(kind, live))
        self._release_finalizer(name, meta)
        return Result(name, Outcome.DELETED, changes)

    def _release_finalizer(self, name: str, meta: Obj) -> None:
        remaining = [f for f in meta.get("finalizers") or [] if f != c.FINALIZER]
        patch = [
            {"op": "test", "path": "/metadata/finalizers", "value": meta.get("finalizers") or []},
            {"op": "replace", "path": "/metadata/finalizers", "value": remaining},
        ]
        self.kube.json_patch(EXTERNAL_SERVICE, name, patch)

    # -- status ----------------------------------------------------------------------------

    def _conditions(self, es_obj: Obj, wanted: Iterable[tuple[str, str, str, str]]) -> list[Obj]:
        previous = {
            cond.get("type"): cond for cond in (es_obj.get("status") or {}).get("conditions") or []
        }
        now = _timestamp(self.clock())
        out: list[Obj] = []
        for ctype, status, reason, message in wanted:
            old = previous.get(ctype) or {}
            changed = old.get("status") != status
            out.append(
                {
                    "type": ctype,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now
                    if changed or "lastTransitionTime" not in old
                    else old["lastTransitionTime"],
                    "observedGeneration": _generation(es_obj),
                }
            )
        return out

    def _ready_status(
        self,
        es_obj: Obj,
        state: HijackState,
        ready: int,
        cluster_ip: str | None,
        refusal: tuple[str, str] | None,
    ) -> Obj:
        if ready >= 1:
            ready_cond = ("Ready", "True", "GatewayReady", f"{ready} gateway pod(s) ready")
        else:
            ready_cond = ("Ready", "False", "WaitingForPods", "no gateway pod is ready yet")
        # CLUSTER_DNS=none is said at once, not only once a pod is ready.
        if refusal is not None and (
            state is HijackState.TRUE
            or (state is HijackState.WAITING_FOR_PODS and refusal[0] == REASON_UNAVAILABLE)
        ):
            dns_cond = ("DnsHijacked", "False", refusal[0], refusal[1])
        elif state is HijackState.TRUE:
            dns_cond = (
                "DnsHijacked",
                "True",
                "Hijacked",
                "cluster DNS answers dnsName with the gateway",
            )
        elif state is HijackState.WAITING_FOR_PODS:
            dns_cond = (
                "DnsHijacked",
                "False",
                "WaitingForPods",
                "DNS is rewritten once a gateway pod is ready",
            )
        else:
            dns_cond = ("DnsHijacked", "False", "HijackDisabled", "spec.hijackDns is false")
        status: Obj = {
            "observedGeneration": _generation(es_obj),
            "conditions": self._conditions(
                es_obj, [("Valid", "True", "Valid", "spec is valid"), ready_cond, dns_cond]
            ),
            "readyReplicas": ready,
            "hijackState": state.value,
        }
        if cluster_ip:
            status["clusterIP"] = cluster_ip
        return status

    def _refused_status(self, es_obj: Obj, kind: str, exc: PermanentError) -> None:
        """The API server refused one of the gateway's objects for good (admission, quota,
        validation): say so on the ExternalService, so that ``kubectl get`` tells the truth.
        Whatever already runs is left as it is."""
        reason = {403: "Forbidden", 409: "Conflict", 422: "Invalid"}.get(exc.status or 0, "Error")
        message = f"the API server refused the gateway's {kind}: {exc}"[:MAX_MESSAGE]
        status = self._not_ready_status(es_obj, f"{kind}{reason}", message, dns_too=False)
        with contextlib.suppress(ReconcileError):  # the refusal is what the caller reports
            self._write_status(es_obj, status)

    def _not_ready_status(self, es_obj: Obj, reason: str, message: str, *, dns_too: bool) -> Obj:
        """Valid spec, but the gateway cannot converge: Ready=False saying why, and DnsHijacked
        either the same (``dns_too``) or left as it was."""
        kept = (es_obj.get("status") or {}).get("conditions") or []
        dns = (
            [("DnsHijacked", "False", reason, message)]
            if dns_too
            else [
                (cd["type"], cd["status"], cd["reason"], cd["message"])
                for cd in kept
                if cd.get("type") == "DnsHijacked"
            ]
        )
        return {
            **(es_obj.get("status") or {}),
            "observedGeneration": _generation(es_obj),
            "conditions": self._conditions(
                es_obj,
                [
                    ("Valid", "True", "Valid", "spec is valid"),
                    ("Ready", "False", reason, message),
                    *dns,
                ],
            ),
        }

    def _write_status(self, es_obj: Obj, status: Obj) -> None:
        if _status_equal(es_obj.get("status") or {}, status):
            return
        name = es_obj["metadata"]["name"]
        try:
            self.kube.merge_patch(EXTERNAL_SERVICE, name, {"status": status}, subresource="status")
        except PermanentError as exc:
            # A 404 for an object that exists: its CRD serves no /status (the original
            # operator's CRD). Say so, rather than "not found" for every object.
            if exc.status == 404 and self.kube.get(EXTERNAL_SERVICE, name) is not None:
                raise PermanentError(NO_STATUS_SUBRESOURCE.format(name=name), 404) from exc
            raise

    # -- everything ------------------------------------------------------------------------

    def sweep(
        self, *, only: Callable[[str], bool] | None = None, deliver: bool = True
    ) -> SweepReport:
        """Reconcile every ExternalService from one paginated LIST per kind, then prune orphans.

        A sweep in shards (``functions.handlers``) passes ``only``, which names its part: it
        reconciles those ExternalServices and prunes the orphans whose gateway name ``only``
        accepts, yet lists and predicts DNS claims over everything, so that a contested dnsName
        is judged alike in every shard. ``deliver=False`` leaves DNS delivery and the access
        audit to ``finish_sweep``, run once by the shard that completes the sweep.

        Nothing is read per object: the LISTs of the gateway namespace (not by label) also
        show any object that holds a gateway's name without our labels. Pages are
        ``SWEEP_PAGE_SIZE`` items and each is packed as it arrives (``_pack``; the objects that
        are not ours dropped), so a sweep holds one page at a time, not the whole LIST."""
        listed: dict[str, _Listed] = {}

        def external(es: Obj) -> None:
            meta = es["metadata"]
            listed[meta["name"]] = _Listed(_pack(es), bool(meta.get("deletionTimestamp")))

        self.kube.list_all(EXTERNAL_SERVICE, keep=external, page_size=SWEEP_PAGE_SIZE)
        orphans: list[Obj] = []
        for resource in GATEWAY_KINDS:
            self.kube.list_all(
                resource,
                self.settings.gateway_namespace,
                keep=functools.partial(self._sort_listed, resource.kind, listed, orphans),
                page_size=SWEEP_PAGE_SIZE,
            )
        verdicts = self._predict_dns(_unpacked(listed)) if self.dns is not None else None
        report = SweepReport()

        def one(name: str) -> Result:
            # Unpacked for its turn, and let go with it.
            return self.reconcile(name, listed.pop(name).observed(), verdicts)

        with ThreadPoolExecutor(max_workers=self.settings.sweep_concurrency) as pool:
            mine = sorted(listed) if only is None else sorted(filter(only, listed))
            futures = {name: pool.submit(one, name) for name in mine}
            for name, future in futures.items():
                try:
                    report.results.append(future.result())
                except Exception as exc:
                    report.errors.append({"name": name, "error": str(exc)})
        gone: dict[str, bool] = {}
        for item in orphans:
            # Listed without an ExternalService: perhaps only created after our LIST of them.
            # Prune only when its ExternalService is known to be gone.
            gateway = item["metadata"]["labels"][c.LABEL_GATEWAY]
            if only is not None and not only(gateway):
                continue  # another shard's
            if gateway not in gone:
                gone[gateway] = self.kube.get(EXTERNAL_SERVICE, gateway) is None
            if gone[gateway]:
                report.pruned.append(self._delete_child(item["kind"], item))
        if not deliver:
            report.corefile_added = verdicts.corefile_added if verdicts is not None else ""
            return report
        if self.dns is not None:
            report.dns = self.dns.sync(self.kube)
            if verdicts is not None and verdicts.corefile_added:
                report.dns.drift.append(f"Corefile: added {verdicts.corefile_added}")
        if self.settings.sweep_access_audit:
            self._audit_access(report)
        return report

    def finish_sweep(self) -> SweepReport:
        """The end of a sweep done in shards, once every shard has reconciled its part: DNS
        delivered (from live Services, as a whole sweep delivers it) and the access audit."""
        report = SweepReport()
        if self.dns is not None:
            report.dns = self.dns.sync(self.kube)
        if self.settings.sweep_access_audit:
            self._audit_access(report)
        return report

    def _audit_access(self, report: SweepReport) -> None:
        """The access audit's findings, from its own LISTs; a failure is the report's error,
        never the sweep's (its reconciles are done)."""
        from access.model import audit, snapshot_from_kube  # only sweeps that audit pay for it

        try:
            findings = audit(snapshot_from_kube(self.kube, self.settings)).findings
        except ReconcileError as exc:
            hint = (
                " (bind the reconciler to the egress-auditor roles: "
                "infra/rbac/reconciler-access-audit)"
                if exc.status == 403
                else ""
            )
            report.errors.append({"name": "access-audit", "error": f"{exc}{hint}"})
            return
        report.access = [finding.to_dict() for finding in findings]

    def _sort_listed(
        self, kind: str, listed: dict[str, _Listed], orphans: list[Obj], item: Obj
    ) -> None:
        """File one listed object of the gateway namespace: a child of its gateway, an orphan
        (our labels, no ExternalService listed), or foreign (a gateway's name without our
        labels: never taken over). Anything else is not ours and is dropped.

        Returns None always: the sweep keeps what it needs here, not in the LIST's items.
        """
        meta = item["metadata"]
        gateway = (meta.get("labels") or {}).get(c.LABEL_GATEWAY)
        if gateway is not None:
            target = listed.get(gateway)
            if target is None:
                orphans.append(lean(item))
                return
            if meta["name"] == gateway:
                target.children[kind] = _pack(item)
                return
        named = listed.get(meta["name"])
        if named is None or named.deleting:
            return
        if kind == PDB.kind and not self.settings.enable_pdb:
            return  # not a kind this gateway has: no conflict
        named.foreign[kind] = _pack(item)

    def _predict_dns(self, gateways: Iterable[tuple[str, Observed]]) -> DnsVerdicts:
        """Which gateways will hold their DNS claim once this sweep has converged them."""
        claims: list[Claim] = []
        for name, obs in gateways:
            es_obj = obs.external_service
            if es_obj is None or es_obj["metadata"].get("deletionTimestamp"):
                continue
            try:
                es = parse_external_service(es_obj, self.settings.ceilings)
            except InvalidExternalService:
                # Left untouched: its live Service keeps whatever claim it had.
                service = obs.children.get(SERVICE.kind)
                claims.extend(claims_from_services([service] if service else []))
                continue
            previous, state, _ = self._hijack_state(es, obs)
            if state is HijackState.TRUE:
                claims.append(
                    Claim(self._claimed_at(es, obs, previous, state), name, es.spec.dns_name)
                )
        if self.dns is None:
            s = self.settings
            return DnsVerdicts(render_dns(claims, s.gateway_namespace, s.cluster_domain))
        # Rendered as delivery spreads them: capacity is per ConfigMap.
        return self.dns.verdicts(self.kube, self.dns.render(claims))


def _ready_replicas(deployment: Obj | None) -> int:
    if not deployment:
        return 0
    value = (deployment.get("status") or {}).get("readyReplicas") or 0
    return int(value)


def _generation(obj: Obj) -> int:
    return int(obj.get("metadata", {}).get("generation") or 0)


def _condition_status(es_obj: Obj, ctype: str) -> str | None:
    for cond in (es_obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return str(cond.get("status"))
    return None


def _status_equal(live: Obj, desired: Obj) -> bool:
    for key, value in desired.items():
        if key == "conditions":
            live_conds = {cd.get("type"): cd for cd in live.get("conditions") or []}
            if set(live_conds) != {cond["type"] for cond in value}:
                return False  # a condition to add or to drop (Conflict comes and goes)
            for cond in value:
                old = live_conds.get(cond["type"])
                if old is None or any(old.get(k) != v for k, v in cond.items()):
                    return False
        elif live.get(key) != value:
            return False
    return True
