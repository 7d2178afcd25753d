"""Every ExternalService at once: one paginated LIST per kind, each gateway converged from what
was listed, orphans pruned, DNS delivered once."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from core import constants as c
from core.errors import ReconcileError
from core.hijack import HijackState
from core.kube import (
    EXTERNAL_SERVICE,
    GATEWAY_KINDS,
    PDB,
    SERVICE,
    Obj,
    lean,
)
from core.spec import InvalidExternalService, parse_external_service
from dns.delivery import (
    DnsVerdicts,
    claims_from_services,
)
from dns.render import Claim
from dns.render import render as render_dns
from reconcile.base import Observed
from reconcile.finalize import Finalizing
from reconcile.observe import Listed, pack, unpacked
from reconcile.results import Result, SweepReport

# Items per LIST page in a sweep: few requests (10,000 gateways: 5 pages per kind) while only
# one page is held whole at a time (bench.sweep measures both).
SWEEP_PAGE_SIZE = 2000


class Sweeping(Finalizing):
    def sweep(
        self, *, only: Callable[[str], bool] | None = None, deliver: bool = True
    ) -> SweepReport:
        """Reconcile every ExternalService from one paginated LIST per kind, then prune orphans.

        A sweep in shards (``functions.shards``) passes ``only``, which names its part: it
        reconciles those ExternalServices and prunes the orphans whose gateway name ``only``
        accepts, yet lists and predicts DNS claims over everything, so that a contested dnsName
        is judged alike in every shard. ``deliver=False`` leaves DNS delivery and the access
        audit to ``finish_sweep``, run once by the shard that completes the sweep.

        Nothing is read per object: the LISTs of the gateway namespace (not by label) also
        show any object that holds a gateway's name without our labels. Pages are
        ``SWEEP_PAGE_SIZE`` items and each is packed as it arrives (``_pack``; the objects that
        are not ours dropped), so a sweep holds one page at a time, not the whole LIST."""
        listed: dict[str, Listed] = {}

        def external(es: Obj) -> None:
            meta = es["metadata"]
            listed[meta["name"]] = Listed(pack(es), bool(meta.get("deletionTimestamp")))

        self.kube.list_all(EXTERNAL_SERVICE, keep=external, page_size=SWEEP_PAGE_SIZE)
        orphans: list[Obj] = []
        for resource in GATEWAY_KINDS:
            self.kube.list_all(
                resource,
                self.settings.gateway_namespace,
                keep=functools.partial(self._sort_listed, resource.kind, listed, orphans),
                page_size=SWEEP_PAGE_SIZE,
            )
        verdicts = self._predict_dns(unpacked(listed)) if self.dns is not None else None
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
        self, kind: str, listed: dict[str, Listed], orphans: list[Obj], item: Obj
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
                target.children[kind] = pack(item)
                return
        named = listed.get(meta["name"])
        if named is None or named.deleting:
            return
        if kind == PDB.kind and not self.settings.enable_pdb:
            return  # not a kind this gateway has: no conflict
        named.foreign[kind] = pack(item)

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
