"""CLUSTER_DNS=none (GKE Autopilot, GKE's kube-dns or Cloud DNS): the reconciler runs as an
identity with no grant at all in kube-system, bound exactly as infra/overlays/gke-autopilot binds
the functions' identity, and still converges gateways.

Proved on the local cluster: real gateway pods become Ready, the Service and the NetworkPolicy
exist, an ExternalService asking for hijackDns is told that DNS hijacking is not available
here, sweeps prune and report, deletion waits out its grace and cleans up; every request is
recorded, none goes to kube-system, none is refused, and what they need is exactly what the
overlay grants (no more, no less).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from core import constants as c
from core.kube import CONFIGMAP, EXTERNAL_SERVICE, POD, SERVICE, Kube, api_client_from_kubeconfig
from core.settings import CLUSTER_DNS_NONE, Settings
from dns.delivery import REASON_UNAVAILABLE
from reconcile.app import build_reconciler
from tests.conftest import DevStack
from tests.integration.helpers import (
    GATEWAY_NS,
    apply_orphan,
    children,
    create_es,
    dev_settings,
    eventually,
    external_service,
    purge,
    set_pods_ready,
    update_spec,
)
from tests.integration.rbac_audit import (
    REPO,
    RecordingApiClient,
    Subject,
    compare,
    grants,
    kustomize,
    needed_by,
)

pytestmark = pytest.mark.cluster

OVERLAY = REPO / "infra" / "overlays" / "gke-autopilot"
GKE_VALUES = {"PROJECT_ID": "my-project", "EXPORTER_IMAGE": "registry.invalid/egress-exporter:1"}
GKE_RECONCILER = Subject("User", "egress-reconciler@my-project.iam.gserviceaccount.com")
# The dev stack's certificate user standing in for the functions' Google service account.
IDENTITY = "egress-reconciler-nodns"
SUFFIX = "-nodns"
DNS_NAMESPACE = "kube-system"


def _bindings_for_local_identity(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The overlay's reconciler roles and bindings, renamed (so that the dev overlay's own stay
    untouched) and bound to the local certificate user instead of the Google service account."""
    bindings = [
        o
        for o in objects
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(GKE_RECONCILER.matches(s) for s in o.get("subjects") or [])
    ]
    wanted = {
        (b["roleRef"]["kind"], b["metadata"].get("namespace", ""), b["roleRef"]["name"])
        for b in bindings
    }
    roles = [
        o
        for o in objects
        if (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) in wanted
    ]
    out = []
    for obj in [*roles, *bindings]:
        obj = yaml.safe_load(yaml.safe_dump(obj))  # a deep copy
        obj["metadata"]["name"] += SUFFIX
        if "roleRef" in obj:
            obj["roleRef"]["name"] += SUFFIX
            obj["subjects"] = [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": IDENTITY}
            ]
        out.append(obj)
    return out


@pytest.fixture(scope="module")
def overlay_objects() -> list[dict[str, Any]]:
    return kustomize(OVERLAY, GKE_VALUES)


@pytest.fixture(scope="module")
def as_nodns(dev_stack: DevStack, overlay_objects: list[dict[str, Any]]) -> Kube:
    """The reconciler's identity as infra/overlays/gke-autopilot binds it: nothing in
    kube-system. Applied idempotently (fixed names), left in place for the next run."""
    local = _bindings_for_local_identity(overlay_objects)
    assert {o["kind"] for o in local} == {
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    }
    assert all(o["metadata"].get("namespace", GATEWAY_NS) == GATEWAY_NS for o in local)
    res = subprocess.run(
        ["kubectl", f"--kubeconfig={dev_stack.kubeconfig}", "apply", "--server-side",
         "--force-conflicts", "--field-manager=test-cluster-dns-none", "-f", "-"],
        input=yaml.safe_dump_all(local), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    kube = Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig(IDENTITY)))

    def authorised() -> bool:
        try:
            kube.list_all(EXTERNAL_SERVICE)
            kube.list_all(SERVICE, GATEWAY_NS)
        except Exception:
            return False
        return True

    eventually(authorised, 30, f"RBAC to admit {IDENTITY}")
    return kube


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def _kube_system_state(admin: Kube, settings: Settings) -> dict[str, Any]:
    """What the reconciler would change in kube-system if it touched it: the rules ConfigMap, the
    Corefile, and the CoreDNS pods' nudge annotation."""
    rules = admin.get(CONFIGMAP, settings.dns_configmap_name, DNS_NAMESPACE)
    corefile = admin.get(CONFIGMAP, settings.coredns_configmap_name, DNS_NAMESPACE)
    pods, _ = admin.list_all(POD, DNS_NAMESPACE, label_selector="k8s-app=kube-dns")
    return {
        "rules": (rules or {}).get("data"),
        "corefile": (corefile or {}).get("data"),
        "nudged": sorted(
            (p["metadata"]["name"], (p["metadata"].get("annotations") or {}).get(
                c.ANNOTATION_DNS_RULES_VERSION, ""))
            for p in pods
        ),
    }  # fmt: skip


def _condition(admin: Kube, name: str, kind: str) -> dict[str, Any]:
    es = admin.get(EXTERNAL_SERVICE, name)
    assert es is not None
    found: dict[str, Any] = next(cd for cd in es["status"]["conditions"] if cd["type"] == kind)
    return found


@pytest.fixture
def names(admin: Kube) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for name in created:
        purge(admin, name)


def test_without_cluster_dns_gateways_work_with_no_grant_in_kube_system(
    dev_stack: DevStack,
    admin: Kube,
    as_nodns: Kube,
    overlay_objects: list[dict[str, Any]],
    names: list[str],
    unique: str,
) -> None:
    api = RecordingApiClient(api_client_from_kubeconfig(dev_stack.identity_kubeconfig(IDENTITY)))
    kube = Kube(api)
    clock = Clock()
    settings = dev_settings(cluster_dns=CLUSTER_DNS_NONE, delete_grace_s=60, enable_pdb=True)
    reconciler = build_reconciler(kube, settings, clock=clock)
    before = _kube_system_state(admin, settings)
    hijacked, plain = f"nodns-{unique}", f"nodns-plain-{unique}"
    names += [hijacked, plain]
    small = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}
    create_es(
        admin,
        external_service(
            hijacked, hijackDns=True, dnsName=f"{hijacked}.example.com", resources=small
        ),
    )
    create_es(admin, external_service(plain, resources=small))

    # Create: every gateway object, and at once the condition saying DNS is not hijacked here.
    for name in (hijacked, plain):
        assert reconciler.reconcile(name).outcome == "converged"
        assert {
            "ConfigMap",
            "Deployment",
            "Service",
            "NetworkPolicy",
            "PodDisruptionBudget",
        } <= set(children(admin, name)), name
    waiting = _condition(admin, hijacked, "DnsHijacked")
    assert (waiting["status"], waiting["reason"]) == ("False", REASON_UNAVAILABLE), waiting

    # Ready: real Envoy pods pass their readiness probe; the gateway is Ready, DNS still not.
    for name in (hijacked, plain):
        set_pods_ready(admin, name, True)
    result = reconciler.reconcile(hijacked)
    assert result.hijack_state == "true", result
    assert _condition(admin, hijacked, "Ready")["status"] == "True"
    cond = _condition(admin, hijacked, "DnsHijacked")
    assert (cond["status"], cond["reason"]) == ("False", REASON_UNAVAILABLE), cond
    assert "not available in this cluster" in cond["message"]
    assert f"{hijacked}.{GATEWAY_NS}.svc.cluster.local" in cond["message"], "where clients go"
    reconciler.reconcile(plain)
    assert _condition(admin, plain, "Ready")["status"] == "True"
    assert _condition(admin, plain, "DnsHijacked")["reason"] == "HijackDisabled"
    policy = children(admin, hijacked)["NetworkPolicy"]
    [rule] = policy["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {443}
    assert any(
        (peer.get("podSelector") or {}).get("matchLabels")
        == {f"egress.monzo.com/allowed-{hijacked}": "true"}
        for peer in rule["from"]
    ), rule

    # Update, then a sweep (PDBs switched off: pruned) with an orphan: pruned, DNS unavailable.
    update_spec(admin, hijacked, {"ports": [{"port": 443}, {"port": 8443}]})
    assert reconciler.reconcile(hijacked).outcome == "converged"
    orphan = f"orphan-{unique}"
    apply_orphan(admin, orphan)
    sweeper = build_reconciler(kube, dataclasses.replace(settings, enable_pdb=False), clock=clock)
    report = sweeper.sweep()
    assert report.errors == [], report.errors
    assert any(ch.name == orphan for ch in report.pruned), report.to_dict()
    assert report.dns is not None and report.to_dict()["dns"]["unavailable"]
    assert "PodDisruptionBudget" not in children(admin, hijacked)
    cond = _condition(admin, hijacked, "DnsHijacked")
    assert (cond["status"], cond["reason"]) == ("False", REASON_UNAVAILABLE), "the sweep agrees"

    # Delete: grace recorded, then the gateway deleted and the finalizer released.
    admin.delete(EXTERNAL_SERVICE, hijacked)
    assert reconciler.reconcile(hijacked).outcome == "deleting"
    clock.now += dt.timedelta(seconds=61)
    assert reconciler.reconcile(hijacked).outcome == "deleted"
    eventually(lambda: admin.get(EXTERNAL_SERVICE, hijacked) is None, 30, f"{hijacked} to go")
    assert children(admin, hijacked) == {}

    # Nothing in kube-system was asked for, refused, or changed.
    assert [r.path for r in api.requests if f"/namespaces/{DNS_NAMESPACE}/" in r.path] == []
    asked = needed_by(api.requests)
    after = _kube_system_state(admin, settings)
    assert after == before

    # And the overlay grants exactly what these requests need.
    needed = {
        dataclasses.replace(a, name=a.name.replace(plain, "<plain>").replace(hijacked, "<es>"))
        for a in asked
    }
    granted = grants(overlay_objects, GKE_RECONCILER)
    assert [g for g in granted if g.scope == DNS_NAMESPACE] == []
    problems = compare(needed, granted)
    assert not problems, "overlay gke-autopilot, reconciler:\n  " + "\n  ".join(problems)
