"""Deliver the rewrite rules to CoreDNS without ever losing one or damaging the Corefile.

Rules live in our own ConfigMap (no ownerReference: it is shared by every gateway), which the
cluster's CoreDNS mounts and imports. Each sync re-renders from the *full* live state and writes
with a resourceVersion precondition, reading the ConfigMap *before* listing the Services: any
write that lands between our read and our write makes ours fail with 409, and we start over
from fresh state. So concurrent reconciles never lose each other's rules.

CoreDNS's ``reload`` can miss the last of two quick changes for good: when it restarts for a
changed Corefile it parses the imported files once to start the new configuration and once
more to record the checksum it compares against from then on, so a file that changes between
those two reads is recorded as loaded but never served (coredns/caddy ``Restart``; reproduced in
tests/integration/test_corefile_coredns.py). Nothing changes afterwards, so it never heals on
its own. Therefore every burst of rule writes ends with a *settle*: the first sync that finds
the rules unchanged for ``SETTLE_AFTER_S`` adds a marker key (dns.render.SETTLE_KEY), one more
change of what CoreDNS imports, made when nothing else is changing. The next rules write drops
the marker again. The sweep runs a sync on its schedule, so DNS converges within a sweep
interval even when no ExternalService changes.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import constants as c
from core.errors import PermanentError, ReconcileError, TransientError
from core.hijack import HijackState
from core.kube import CONFIGMAP, ENDPOINT_SLICE, POD, SERVICE, Kube, Obj
from core.settings import Settings
from dns import corefile
from dns.render import SETTLE_KEY, Claim, Rendered, render, rules_only, settled

MAX_ATTEMPTS = 8
# Longer than a nudged delivery (about a second) plus CoreDNS's `reload 2s` and its jitter, so
# the settle lands after CoreDNS has reloaded for the last rules write.
SETTLE_AFTER_S = 10.0
# A nudge is a courtesy: a pod that cannot be nudged at once still refreshes on its own sync.
NUDGE_FINAL_STATUSES = frozenset({400, 403, 404, 409, 422})

log = logging.getLogger(__name__)


REASON_NOT_WIRED = "CoreDNSNotWired"


@dataclass
class DnsVerdicts:
    """Who holds a DNS claim, and whether CoreDNS reads our rules at all."""

    rendered: Rendered
    corefile_problem: str = ""
    corefile_added: str = ""

    def refusal(self, name: str) -> tuple[str, str] | None:
        """(reason, message) for a gateway whose hijack state is true but whose name is not."""
        refused = self.rendered.refused.get(name)
        if refused is not None:
            return refused
        if self.corefile_problem:
            return (
                REASON_NOT_WIRED,
                f"the rule is written but CoreDNS does not read it: {self.corefile_problem}",
            )
        return None


@dataclass
class DnsReport(DnsVerdicts):
    corefile_version: str = ""  # resourceVersion of our Corefile write, if we made one
    written: bool = False
    settled: bool = False  # this sync added the settle marker
    drift: list[str] = field(default_factory=list)
    nudged: list[str] = field(default_factory=list)
    nudge_problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": len(self.rendered.rules),
            "written": self.written,
            "settled": self.settled,
            "refused": {
                k: {"reason": r, "message": m}
                for k, (r, m) in sorted(self.rendered.refused.items())
            },
            "drift": self.drift,
            "corefile": self.corefile_problem or "ok",
            "nudged": self.nudged,
            **({"nudge_problem": self.nudge_problem} if self.nudge_problem else {}),
        }


def claims_from_services(services: list[Obj]) -> list[Claim]:
    """Claims of every gateway Service whose hijack state is ``true``."""
    out = []
    for svc in services:
        meta = svc.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(c.LABEL_HIJACK_DNS) != HijackState.TRUE.value or not labels.get(
            c.LABEL_GATEWAY
        ):
            continue
        annotations = meta.get("annotations") or {}
        dns_name = annotations.get(c.ANNOTATION_DNS_NAME)
        if not dns_name:
            continue
        claimed_at = annotations.get(c.ANNOTATION_CLAIMED_AT) or meta.get("creationTimestamp") or ""
        out.append(Claim(claimed_at=claimed_at, name=meta["name"], dns_name=dns_name))
    return out


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DnsDelivery:
    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], dt.datetime] = _utcnow,
        settle_after_s: float = SETTLE_AFTER_S,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.settle_after_s = settle_after_s

    def _services(self, kube: Kube) -> list[Obj]:
        items, _ = kube.list_all(
            SERVICE,
            self.settings.gateway_namespace,
            label_selector=f"{c.LABEL_HIJACK_DNS}={HijackState.TRUE.value}",
        )
        return items

    def preview(self, services: list[Obj]) -> Rendered:
        """What the rules would be for these Services (no I/O)."""
        return render(
            claims_from_services(services),
            self.settings.gateway_namespace,
            self.settings.cluster_domain,
        )

    def sync(self, kube: Kube) -> DnsReport:
        """Converge our DNS ConfigMap (and, if allowed, the Corefile import) to live state."""
        s = self.settings
        path = CONFIGMAP.path(s.dns_configmap_namespace, s.dns_configmap_name)
        for _ in range(MAX_ATTEMPTS):
            live = kube.get(CONFIGMAP, s.dns_configmap_name, s.dns_configmap_namespace)
            rendered = self.preview(self._services(kube))
            report = DnsReport(rendered)
            live_data = (live or {}).get("data") or {}
            if live is not None and rules_only(live_data) == rendered.data:
                self._check_corefile(kube, report, rendered)
                version = report.corefile_version
                if SETTLE_KEY not in live_data and self._quiet(live):
                    settle_version = _write(kube, "PUT", path, {**live, "data": settled(live_data)})
                    if settle_version:  # else another writer got there first: a later sync settles
                        report.settled = True
                        version = settle_version
                if version:
                    self._nudge(kube, report, version)
                return report
            if live is not None:
                report.drift.append(_describe_drift(rules_only(live_data), rendered.data))
            body: Obj = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": s.dns_configmap_name,
                    "namespace": s.dns_configmap_namespace,
                    "labels": {c.LABEL_APP: c.APP_VALUE},
                    "annotations": {c.ANNOTATION_DNS_RULES_WRITTEN_AT: self._now()},
                },
                "data": rendered.data,
            }
            if live is None:
                version = _write(kube, "POST", CONFIGMAP.path(s.dns_configmap_namespace), body)
            else:
                meta = live["metadata"]
                body["metadata"]["resourceVersion"] = meta["resourceVersion"]
                body["metadata"]["labels"] = {
                    **(meta.get("labels") or {}),
                    c.LABEL_APP: c.APP_VALUE,
                }
                body["metadata"]["annotations"] = {
                    **(meta.get("annotations") or {}),
                    c.ANNOTATION_DNS_RULES_WRITTEN_AT: self._now(),
                }
                version = _write(kube, "PUT", path, body)
            if not version:
                continue  # someone wrote in between: start over from fresh state
            report.written = True
            self._check_corefile(kube, report, rendered)
            self._nudge(kube, report, version)
            return report
        raise TransientError(f"DNS ConfigMap kept changing under us ({MAX_ATTEMPTS} attempts)")

    def _now(self) -> str:
        return self.clock().astimezone(dt.UTC).isoformat(timespec="microseconds")

    def _quiet(self, live: Obj) -> bool:
        """Whether the rules have not changed for settle_after_s (true when we cannot tell)."""
        annotations = live["metadata"].get("annotations") or {}
        try:
            written = dt.datetime.fromisoformat(annotations[c.ANNOTATION_DNS_RULES_WRITTEN_AT])
        except (KeyError, TypeError, ValueError):
            return True
        if written.tzinfo is None:
            return True
        return (self.clock() - written).total_seconds() >= self.settle_after_s

    def _check_corefile(self, kube: Kube, report: DnsReport, rendered: Rendered) -> None:
        if not rendered.rules and not self.settings.manage_coredns_import:
            return
        report.corefile_problem, report.corefile_added, report.corefile_version = (
            self.ensure_corefile(kube)
        )
        if report.corefile_added:
            report.drift.append(f"Corefile: added {report.corefile_added}")

    def ensure_corefile(self, kube: Kube) -> tuple[str, str, str]:
        """Make sure CoreDNS imports our rules; add the line once if allowed, else report it.

        Returns (problem, what was added, resourceVersion written): an empty problem means
        CoreDNS imports the rules.
        """
        s = self.settings
        import_line = f"import {s.coredns_import_path}"
        path = CONFIGMAP.path(s.dns_configmap_namespace, s.coredns_configmap_name)
        for _ in range(MAX_ATTEMPTS):
            cm = kube.get(CONFIGMAP, s.coredns_configmap_name, s.dns_configmap_namespace)
            text = ((cm or {}).get("data") or {}).get(s.corefile_key)
            if cm is None or text is None:
                return (
                    (
                        f"ConfigMap {s.dns_configmap_namespace}/{s.coredns_configmap_name} has "
                        f"no key {s.corefile_key}: cannot check that CoreDNS imports the rules"
                    ),
                    "",
                    "",
                )
            state = corefile.check(text, import_line, s.cluster_domain)
            if state.ok:
                return "", "", ""
            missing = " and ".join(
                what
                for what, present in ((import_line, state.has_import), ("reload", state.has_reload))
                if not present
            )
            if not s.manage_coredns_import:
                return f"the Corefile lacks {missing} (MANAGE_COREDNS_IMPORT is off)", "", ""
            try:
                updated = corefile.ensure_import(text, import_line, s.cluster_domain)
            except ValueError as exc:
                return str(exc), "", ""
            # PUT the whole live object (resourceVersion included) so nothing else changes.
            cm["data"][s.corefile_key] = updated
            version = _write(kube, "PUT", path, cm)
            if version:
                return "", missing, version
        raise TransientError("the CoreDNS ConfigMap kept changing under us")

    def _nudge(self, kube: Kube, report: DnsReport, version: str) -> None:
        report.nudged, report.nudge_problem = self.nudge(kube, version)

    def nudge(self, kube: Kube, version: str) -> tuple[list[str], str]:
        """Make the kubelet refresh the CoreDNS pods' ConfigMap volumes now.

        A kubelet refreshes a pod's ConfigMap volumes when it syncs the pod: periodically (about
        once a minute) or as soon as the pod object changes. Writing our version into one
        annotation of each pod behind the CoreDNS Service is such a change; CoreDNS's ``reload``
        then sees the new files. Failures are reported and logged, never raised: the write has
        happened, and DNS converges on the kubelet's own schedule anyway.

        Returns the pods nudged and a description of what failed ("" when nothing did).
        """
        s = self.settings
        if not s.nudge_coredns_pods or not version:
            return [], ""
        problems = []
        nudged = []
        try:
            slices, _ = kube.list_all(
                ENDPOINT_SLICE,
                s.dns_configmap_namespace,
                label_selector=f"{c.LABEL_SERVICE_NAME}={s.coredns_service_name}",
            )
        except ReconcileError as exc:
            slices = []
            problems.append(f"cannot list the EndpointSlices of {s.coredns_service_name}: {exc}")
        pods: dict[str, str] = {}
        for item in slices:
            for endpoint in item.get("endpoints") or []:
                ref = endpoint.get("targetRef") or {}
                if ref.get("kind") == "Pod" and ref.get("name"):
                    pods[ref["name"]] = ref.get("uid") or ""
        for name, uid in sorted(pods.items()):
            patch: Obj = {"metadata": {"annotations": {c.ANNOTATION_DNS_RULES_VERSION: version}}}
            if uid:
                patch["metadata"]["uid"] = uid  # a precondition: never nudge a replacement
            try:
                kube.request(
                    "PATCH",
                    POD.path(s.dns_configmap_namespace, name),
                    query=[("fieldManager", c.FIELD_MANAGER)],
                    body=patch,
                    content_type="application/merge-patch+json",
                    final_statuses=NUDGE_FINAL_STATUSES,
                )
                nudged.append(name)
            except ReconcileError as exc:
                if exc.status != 404:
                    problems.append(f"pod {name}: {exc}")
        problem = "; ".join(problems)
        if problem:
            log.warning("CoreDNS pods not nudged, DNS waits for the kubelet's sync: %s", problem)
        return nudged, problem


def _write(kube: Kube, method: str, path: str, body: Obj) -> str:
    """Create or replace under a precondition: the new resourceVersion, or "" when another
    writer got there first."""
    try:
        result = kube.request(method, path, body=body, final_statuses=frozenset({409}))
    except PermanentError as exc:
        if exc.status == 409:
            return ""
        raise
    return str(((result or {}).get("metadata") or {}).get("resourceVersion") or "-")


def _describe_drift(live: dict[str, str], desired: dict[str, str]) -> str:
    live_lines = {
        line
        for text in live.values()
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    want = {
        line
        for text in desired.values()
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    parts = []
    if want - live_lines:
        parts.append(f"{len(want - live_lines)} rule(s) added")
    if live_lines - want:
        parts.append(f"{len(live_lines - want)} rule(s) removed")
    if not parts:
        parts.append("keys rewritten")
    return "DNS ConfigMap: " + ", ".join(parts)
