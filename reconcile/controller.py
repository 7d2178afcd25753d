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

from core.spec import InvalidExternalService, parse_external_service
from dns.delivery import (
    DnsVerdicts,
)
from reconcile.base import Observed
from reconcile.results import Outcome, Result
from reconcile.sweep import Sweeping


class Reconciler(Sweeping):
    """One ExternalService (``reconcile``) or all of them (``sweep``), from live state."""

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
