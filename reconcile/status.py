"""The ExternalService's status: conditions that say what the gateway is doing and why, written
only when they change."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from core.errors import PermanentError, ReconcileError
from core.hijack import HijackState
from core.kube import (
    EXTERNAL_SERVICE,
    Obj,
)
from dns.delivery import (
    REASON_UNAVAILABLE,
)
from reconcile.base import MAX_MESSAGE, timestamp
from reconcile.observe import Observing

NO_STATUS_SUBRESOURCE = (
    "ExternalService {name} exists but its status cannot be written (404): the installed "
    "ExternalService CRD has no status subresource, like the original egress-operator's CRD. "
    "Install this product's CRD, which keeps every stored ExternalService: `egressctl migrate` "
    "shows the steps and `egressctl migrate --apply` takes them (or `kubectl apply "
    "--server-side --force-conflicts -f infra/crd/externalservices.yaml`)"
)


class Statuses(Observing):
    def _conditions(self, es_obj: Obj, wanted: Iterable[tuple[str, str, str, str]]) -> list[Obj]:
        previous = {
            cond.get("type"): cond for cond in (es_obj.get("status") or {}).get("conditions") or []
        }
        now = timestamp(self.clock())
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
                    "observedGeneration": generation(es_obj),
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
            "observedGeneration": generation(es_obj),
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
            "observedGeneration": generation(es_obj),
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
        if status_equal(es_obj.get("status") or {}, status):
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


def generation(obj: Obj) -> int:
    return int(obj.get("metadata", {}).get("generation") or 0)


def condition_status(es_obj: Obj, ctype: str) -> str | None:
    for cond in (es_obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return str(cond.get("status"))
    return None


def status_equal(live: Obj, desired: Obj) -> bool:
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
