"""Changes to a working gateway under continuous traffic, shared by the zero-outage test and the
data-path benchmark: each change runs as the product would run it (the reconciler converging
from live state), and every request a client pod sent meanwhile is accounted to its phase.

Phases, in order, on one gateway with one pod (the worst case for a roll):
- ``add-port``: a second port is declared (new listener, so the pods roll);
- ``roll``: an Envoy setting changes (``envoyLogLevel``; the pods roll);
- ``hand-edit``: someone edits a field of the gateway's Deployment that the reconciler owns
  (the pod template's config hash), which rolls the pods; (fields others add are theirs and
  stay, as with ``kubectl rollout restart``);
- ``sweep-repair``: a sweep finds the drift and puts the field back (the pods roll again);
- ``delete``: the ExternalService is deleted; DNS is withdrawn first, the gateway goes after
  the grace period, and the client ends up talking to the real address.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import constants as c
from core.kube import DEPLOYMENT, EXTERNAL_SERVICE, POD, SERVICE, Kube
from reconcile.controller import Reconciler
from reconcile.results import Outcome, Result
from tests.integration.helpers import (
    GATEWAY_NS,
    ContinuousClient,
    Sample,
    await_dns,
    boot_clock,
    create_es,
    eventually,
    external_service,
    gateway_pods,
    kubectl,
    run_pod,
    serve_offline_name,
    sh,
    update_spec,
)

HASH = c.ANNOTATION_CONFIG_HASH
CLIENT = "changes-client"
PHASES = ("add-port", "roll", "hand-edit", "sweep-repair", "delete")


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    @property
    def failed(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]


@dataclass
class ChangesRun:
    client_ip: str
    phases: list[Phase]
    # On the boot clock: when the gateway's objects started to go (the grace period was over).
    gateway_deleted_at: float = 0.0

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def through_gateway(self, sample: Sample) -> bool:
        return sample.ok and sample.peer != self.client_ip

    def summary(self) -> str:
        return ", ".join(
            f"{p.name} {len(p.failed)}/{len(p.samples)} failed "
            f"({len(p.samples) / max(p.end - p.start, 1e-9):.0f} req/s)"
            for p in self.phases
        )


def _rolled_out(admin: Kube, name: str) -> bool:
    """The Deployment's rollout is complete and no old pod is still terminating."""
    dep = admin.get(DEPLOYMENT, name, GATEWAY_NS)
    if dep is None:
        return False
    status = dep.get("status") or {}
    want = dep["spec"].get("replicas", 1)
    if status.get("observedGeneration") != dep["metadata"]["generation"] or not all(
        status.get(k) == want for k in ("updatedReplicas", "readyReplicas", "replicas")
    ):
        return False
    items, _ = admin.list_all(POD, GATEWAY_NS, f"{c.LABEL_GATEWAY}={name}")
    return bool(len(items) == want)


def run_changes(
    k8s: Any,
    admin: Kube,
    reconciler: Reconciler,
    env: dict[str, str],
    namespace: str,
    name: str,
    say: Callable[[str], None] = lambda _: None,
) -> ChangesRun:
    """Create gateway ``name`` and a client in ``namespace`` (no egress policy of its own), then
    run every phase under continuous traffic. Callers purge the gateway if this fails."""
    tcp_port = int(env["EGRESS_DEV_UPSTREAM_TCP_PORT"])
    udp_port = int(env["EGRESS_DEV_UPSTREAM_UDP_PORT"])
    dns_name = serve_offline_name(env, f"{name}.offline.test")
    client = run_pod(
        k8s,
        namespace,
        CLIENT,
        env["EGRESS_DEV_CLIENT_IMAGE"],
        ["sleep", "3600"],
        labels={c.grant_label(name): c.GRANT_LABEL_VALUE},
    )
    client_ip = str(client["status"]["pod_ip"])
    ports: list[dict[str, Any]] = [{"port": tcp_port}]
    create_es(
        admin,
        external_service(name, dnsName=dns_name, hijackDns=True, ports=ports, minReplicas=1),
    )
    eventually(lambda: reconciler.reconcile(name).hijack_state == "true", 180, f"{name} ready")
    service = admin.get(SERVICE, name, GATEWAY_NS)
    assert service is not None
    cluster_ip = service["spec"]["clusterIP"]
    await_dns(
        lambda: cluster_ip in sh(namespace, CLIENT, f"nslookup {dns_name}").stdout,
        admin,
        "the client to resolve the name to the gateway",
    )
    run = ChangesRun(client_ip, [])
    traffic = ContinuousClient(namespace, CLIENT, dns_name, tcp_port)
    # The changes are to a working gateway: its first answer comes before the first change.
    eventually(traffic.answered, 60, "the first answer through the gateway")

    def phase(label: str, change: Callable[[], object], done: Callable[[Result], bool]) -> None:
        current = Phase(label, boot_clock())
        change()
        eventually(lambda: done(reconciler.reconcile(name)), 240, f"{label} to settle")
        current.end = boot_clock()
        say(f"{label}: settled in {current.end - current.start:.1f} s")
        run.phases.append(current)

    try:
        phase(
            "add-port",
            lambda: update_spec(
                admin, name, {"ports": [*ports, {"port": udp_port, "protocol": "UDP"}]}
            ),
            lambda _: _rolled_out(admin, name),
        )
        phase(
            "roll",
            lambda: update_spec(admin, name, {"envoyLogLevel": "warning"}),
            lambda _: _rolled_out(admin, name),
        )

        def hash_now() -> str | None:
            dep = admin.get(DEPLOYMENT, name, GATEWAY_NS) or {}
            annotations = dep["spec"]["template"]["metadata"].get("annotations") or {}
            return annotations.get(HASH)

        def edit() -> None:
            admin.request(
                "PATCH",
                DEPLOYMENT.path(GATEWAY_NS, name),
                query=[("fieldManager", "kubectl-edit")],
                body={"spec": {"template": {"metadata": {"annotations": {HASH: "by-hand"}}}}},
                content_type="application/merge-patch+json",
            )

        # Only the hand edit's roll here: no reconcile until the sweep (it would repair at once).
        current = Phase("hand-edit", boot_clock())
        edit()
        eventually(lambda: _rolled_out(admin, name), 240, "the hand edit's roll")
        current.end = boot_clock()
        run.phases.append(current)
        phase(
            "sweep-repair",
            lambda: reconciler.sweep(),
            lambda _: hash_now() not in (None, "by-hand") and _rolled_out(admin, name),
        )

        def deleted(result: Result) -> bool:
            if result.outcome == Outcome.DELETED and not run.gateway_deleted_at:
                run.gateway_deleted_at = boot_clock()
            return bool(run.gateway_deleted_at) and not gateway_pods(admin, name)

        phase("delete", lambda: admin.delete(EXTERNAL_SERVICE, name), deleted)
        time.sleep(2)  # not a wait for anything: two more seconds of traffic, all direct
        run.phases[-1].end = boot_clock()
    finally:
        samples = traffic.stop()
    for p in run.phases:
        p.samples = [s for s in samples if p.start <= s.at < p.end]
    kubectl("delete", "pod", "-n", namespace, CLIENT, "--wait=false")
    return run
