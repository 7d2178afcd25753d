"""Converging one valid ExternalService: render what it should have, apply only what differs,
take fields back from other writers once (reconcile.fights), write the status."""

from __future__ import annotations

import datetime as dt

from core import constants as c
from core.errors import PermanentError, TransientError
from core.hijack import HijackState, next_hijack_state
from core.kube import (
    BY_KIND,
    DEPLOYMENT,
    EXTERNAL_SERVICE,
    SERVICE,
    Obj,
    field_conflicts,
)
from core.spec import ExternalService, InvalidExternalService
from dns.delivery import (
    DnsVerdicts,
)
from dns.render import normalize_dns_name
from gateway.render import render
from reconcile.base import MAX_MESSAGE, Observed, timestamp
from reconcile.drift import diff, with_applied_hash
from reconcile.fights import Fight, TakeBack, applied_at, condition_message, encode, fights, memory
from reconcile.results import Action, Change, Outcome, Result
from reconcile.status import Statuses, condition_status, generation


class Converging(Statuses):
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
            tuple(sorted(conflicts)), applied_at(result) or timestamp(self.clock())
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
            "observedGeneration": generation(es_obj),
            "conditions": self._conditions(
                es_obj,
                [
                    ("Valid", "False", "InvalidSpec", message),
                    (
                        "Ready",
                        condition_status(es_obj, "Ready") or "False",
                        "InvalidSpec",
                        "spec is invalid; the last good gateway, if any, is left running untouched",
                    ),
                    (
                        "DnsHijacked",
                        condition_status(es_obj, "DnsHijacked") or "False",
                        "InvalidSpec",
                        "spec is invalid; DNS is left as it was",
                    ),
                ],
            ),
        }
        self._write_status(es_obj, status)
        return Result(name, Outcome.INVALID, message=message)


def _ready_replicas(deployment: Obj | None) -> int:
    if not deployment:
        return 0
    value = (deployment.get("status") or {}).get("readyReplicas") or 0
    return int(value)
