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

Beyond one ConfigMap (about 9,000 names) the rules are spread over up to DNS_CONFIGMAP_SHARDS
ConfigMaps, ``<name>``, ``<name>-1``, ... (dns.render says which rule goes where), all optional
sources of one projected volume in the CoreDNS pods, so the same glob imports them all and a
shard coming into use changes nothing in CoreDNS. The first ConfigMap is the commit point:
every sync reads *all* of them before listing the Services, and every rules write writes the
first one too, last (or first, when rules move into it from the others, so that no rule is ever
absent from all of them at once), each with its own resourceVersion precondition. So any two
syncs that both write share at least one precondition: one of them fails with 409 and starts
over from fresh state, as with one ConfigMap. The first one also carries the
rules-written-at annotation, the settle marker and the version the pods are nudged with; a
write of it with unchanged data is a change of nothing CoreDNS reads.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import constants as c
from core.errors import ReconcileError, TransientError
from core.hijack import HijackState
from core.kube import CONFIGMAP, ENDPOINT_SLICE, POD, SERVICE, Kube, Obj
from core.settings import Settings
from dns import corefile
from dns.render import (
    MAX_CONFIGMAP_BYTES,
    SETTLE_KEY,
    Claim,
    Rendered,
    render,
    rules_only,
    settled,
)

MAX_ATTEMPTS = 8
# Longer than a nudged delivery (about a second) plus CoreDNS's `reload 2s` and its jitter, so
# the settle lands after CoreDNS has reloaded for the last rules write.
SETTLE_AFTER_S = 10.0
# A nudge is a courtesy: a pod that cannot be nudged at once still refreshes on its own sync.
NUDGE_FINAL_STATUSES = frozenset({400, 403, 404, 409, 422})

log = logging.getLogger(__name__)


REASON_NOT_WIRED = "CoreDNSNotWired"
# CLUSTER_DNS=none: the reconciler configures no cluster DNS (and may touch nothing where it lives).
REASON_UNAVAILABLE = "DnsHijackUnavailable"
UNAVAILABLE_MESSAGE = (
    "DNS hijacking is not available in this cluster (CLUSTER_DNS=none: no CoreDNS the "
    "reconciler may configure); the gateway, its Service and its NetworkPolicy work without it"
)


@dataclass
class DnsVerdicts:
    """Who holds a DNS claim, and whether CoreDNS reads our rules at all."""

    rendered: Rendered
    corefile_problem: str = ""
    corefile_added: str = ""
    # CLUSTER_DNS=none: every claim is refused, saying so, and where clients find the gateway
    # ("<namespace>.svc.<cluster domain>", which the gateway's name completes).
    unavailable_in: str = ""

    def refusal(self, name: str) -> tuple[str, str] | None:
        """(reason, message) for a gateway whose hijack state is true but whose name is not."""
        if self.unavailable_in:
            return (
                REASON_UNAVAILABLE,
                f"{UNAVAILABLE_MESSAGE}: clients call {name}.{self.unavailable_in} instead",
            )
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
            "corefile": self.corefile_problem or ("not used" if self.unavailable_in else "ok"),
            **({"unavailable": UNAVAILABLE_MESSAGE} if self.unavailable_in else {}),
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
        max_configmap_bytes: int = MAX_CONFIGMAP_BYTES,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.settle_after_s = settle_after_s
        # Each ConfigMap's budget; smaller only in tests that need several without 9,000 names.
        self.max_configmap_bytes = max_configmap_bytes

    def _services(self, kube: Kube) -> list[Obj]:
        items, _ = kube.list_all(
            SERVICE,
            self.settings.gateway_namespace,
            label_selector=f"{c.LABEL_HIJACK_DNS}={HijackState.TRUE.value}",
        )
        return items

    def preview(self, services: list[Obj]) -> Rendered:
        """What the rules would be for these Services (no I/O)."""
        return self.render(claims_from_services(services))

    def render(self, claims: list[Claim]) -> Rendered:
        """What the rules would be for these claims, spread as delivery writes them (no I/O)."""
        s = self.settings
        return render(
            claims,
            s.gateway_namespace,
            s.cluster_domain,
            s.dns_configmap_shards,
            self.max_configmap_bytes,
        )

    def _unavailable_in(self) -> str:
        """Where gateway Services answer, when CLUSTER_DNS=none ("" when hijacking works)."""
        s = self.settings
        if s.hijack_available:
            return ""
        return f"{s.gateway_namespace}.svc.{s.cluster_domain.rstrip('.')}"

    def verdicts(self, kube: Kube, rendered: Rendered) -> DnsVerdicts:
        """Who will hold a claim once ``rendered`` is delivered, and whether CoreDNS reads the
        rules (adding the import line if allowed, and nudging after such a write)."""
        if not self.settings.hijack_available:
            return DnsVerdicts(rendered, unavailable_in=self._unavailable_in())
        problem = added = ""
        if rendered.rules or self.settings.manage_coredns_import:
            problem, added, version = self.ensure_corefile(kube)
            self.nudge(kube, version)
        return DnsVerdicts(rendered, problem, added)

    def sync(self, kube: Kube) -> DnsReport:
        """Converge our DNS ConfigMap (and, if allowed, the Corefile import) to live state.

        With CLUSTER_DNS=none it sends no request at all: every claim is refused as unavailable.
        """
        s = self.settings
        if not s.hijack_available:
            return DnsReport(Rendered(), unavailable_in=self._unavailable_in())
        ns, names = s.dns_configmap_namespace, s.dns_configmap_names
        for _ in range(MAX_ATTEMPTS):
            # Every ConfigMap is read before the Services are listed (see the module docstring).
            lives = [kube.get(CONFIGMAP, name, ns) for name in names]
            live = lives[0]
            rendered = self.preview(self._services(kube))
            report = DnsReport(rendered)
            live_data = (live or {}).get("data") or {}
            live_rules = [rules_only((obj or {}).get("data") or {}) for obj in lives]
            if live is not None and live_rules == rendered.shards:
                self._check_corefile(kube, report, rendered)
                version = report.corefile_version
                if SETTLE_KEY not in live_data and self._quiet(live):
                    settle_version = _write(kube, {**live, "data": settled(live_data)})
                    if settle_version:  # else another writer got there first: a later sync settles
                        report.settled = True
                        version = settle_version
                if version:
                    self._nudge(kube, report, version)
                return report
            if any(obj is not None for obj in lives):
                merged = {k: v for data in live_rules for k, v in data.items()}
                report.drift.append(_describe_drift(merged, rendered.data))
            version = self._write_rules(kube, lives, live_rules, rendered.shards)
            if not version:
                continue  # someone wrote in between: start over from fresh state
            report.written = True
            self._check_corefile(kube, report, rendered)
            self._nudge(kube, report, version)
            return report
        raise TransientError(f"DNS ConfigMaps kept changing under us ({MAX_ATTEMPTS} attempts)")

    def _write_rules(
        self,
        kube: Kube,
        lives: list[Obj | None],
        live_rules: list[dict[str, str]],
        desired: list[dict[str, str]],
    ) -> str:
        """Write every ConfigMap whose rules changed, and the first one in any case, each under
        its own precondition. The first one's new resourceVersion, or "" when another writer got
        to one of them first (some may be written then: the caller starts over)."""
        names = self.settings.dns_configmap_names
        others = [
            i
            for i in range(1, len(names))
            if live_rules[i] != desired[i] and (lives[i] is not None or desired[i])
        ]
        # Rules moving into the first ConfigMap from the others are added there before they
        # are removed there; otherwise the others go first and the first one commits.
        into_first = _rule_lines(desired[0]) - _rule_lines(live_rules[0])
        first_first = bool(into_first & {r for data in live_rules[1:] for r in _rule_lines(data)})
        version = ""
        if first_first:
            version = self._write_first(kube, lives[0], desired[0])
            if not version:
                return ""
        for i in others:
            if not self._write_other(kube, names[i], lives[i], desired[i]):
                return ""
        if not first_first:
            version = self._write_first(kube, lives[0], desired[0])
        return version

    def _write_first(self, kube: Kube, live: Obj | None, data: dict[str, str]) -> str:
        """The first ConfigMap: its rules (without the settle marker), stamped with the time."""
        s = self.settings
        body: Obj = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": s.dns_configmap_name,
                "namespace": s.dns_configmap_namespace,
                "labels": {c.LABEL_APP: c.APP_VALUE},
                "annotations": {c.ANNOTATION_DNS_RULES_WRITTEN_AT: self._now()},
            },
            "data": data,
        }
        if live is None:
            return _write(kube, body, create=True)
        meta = live["metadata"]
        body["metadata"]["resourceVersion"] = meta["resourceVersion"]
        body["metadata"]["labels"] = {**(meta.get("labels") or {}), c.LABEL_APP: c.APP_VALUE}
        body["metadata"]["annotations"] = {
            **(meta.get("annotations") or {}),
            c.ANNOTATION_DNS_RULES_WRITTEN_AT: self._now(),
        }
        return _write(kube, body)

    def _write_other(self, kube: Kube, name: str, live: Obj | None, data: dict[str, str]) -> str:
        """Another ConfigMap: only its rules (emptied, never deleted, when it holds none)."""
        ns = self.settings.dns_configmap_namespace
        if live is None:
            body: Obj = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": ns, "labels": {c.LABEL_APP: c.APP_VALUE}},
                "data": data,
            }
            return _write(kube, body, create=True)
        return _write(kube, {**live, "data": data})

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
        if not s.hijack_available:
            return "", "", ""
        import_line = f"import {s.coredns_import_path}"
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
            version = _write(kube, cm)
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
        if not s.hijack_available or not s.nudge_coredns_pods or not version:
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
                kube.merge_patch(
                    POD,
                    name,
                    patch,
                    s.dns_configmap_namespace,
                    field_manager=c.FIELD_MANAGER,
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


def _write(kube: Kube, body: Obj, *, create: bool = False) -> str:
    """Create, or replace under the precondition of the body's resourceVersion: the new
    resourceVersion, or "" when another writer got there first (409)."""
    result = kube.create(CONFIGMAP, body) if create else kube.replace(CONFIGMAP, body)
    if result is None:
        return ""
    return str((result.get("metadata") or {}).get("resourceVersion") or "-")


def _rule_lines(data: dict[str, str]) -> set[str]:
    return {line for text in data.values() for line in text.splitlines() if line and line[0] != "#"}


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
