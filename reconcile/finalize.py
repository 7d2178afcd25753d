"""Deleting an ExternalService without an outage: DNS withdrawn first, the gateway kept for a
grace period recorded on the object (a function cannot sleep through it), then removed and the
finalizer released."""

from __future__ import annotations

import datetime as dt

from core import constants as c
from core.hijack import HijackState
from core.kube import (
    EXTERNAL_SERVICE,
    SERVICE,
    Obj,
)
from reconcile.base import Observed, parse_timestamp, timestamp
from reconcile.converge import Converging
from reconcile.results import Action, Change, Outcome, Result


class Finalizing(Converging):
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
        deadline = parse_timestamp(
            (meta.get("annotations") or {}).get(c.ANNOTATION_DELETE_AFTER, "")
        )
        if deadline is None:
            deadline = now + dt.timedelta(seconds=self.settings.delete_grace_s)
            if self.settings.delete_grace_s > 0:
                self.kube.merge_patch(
                    EXTERNAL_SERVICE,
                    name,
                    {"metadata": {"annotations": {c.ANNOTATION_DELETE_AFTER: timestamp(deadline)}}},
                )
        if now < deadline:
            remaining = (deadline - now).total_seconds()
            return Result(
                name,
                Outcome.DELETING,
                changes,
                requeue_after_s=remaining,
                message=f"DNS withdrawn; gateway removed after {timestamp(deadline)}",
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
