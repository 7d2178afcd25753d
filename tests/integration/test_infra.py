"""infra/: every overlay builds and is accepted by a real API server, and the RBAC is exactly
what the code uses.

The RBAC half records every request of the reconciler's scenarios (create, update, DNS hijack
with delivery and Corefile import management, deletion with finalizer and grace, sweep with
pruning, status) and of the exporter's list-then-watch, each run as its own RBAC identity, and
compares the derived accesses with the grants of each overlay (see rbac_audit.py). The
reconciler's scenarios run twice, with MANAGE_COREDNS_IMPORT on and off, and each overlay is
held to the run its own pipeline's setting allows: the Corefile write is granted exactly where
the setting is on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from core import constants as c
from core.kube import (
    CONFIGMAP,
    DEPLOYMENT,
    EXTERNAL_SERVICE,
    Kube,
    api_client_from_kubeconfig,
)
from core.kubehttp import KubeHttp
from core.notice import Notice
from core.settings import Settings
from exporter.settings import ExporterSettings
from exporter.watch import Exporter
from reconcile.app import build_reconciler
from tests.conftest import DevStack
from tests.integration.helpers import (
    GATEWAY_NS,
    apply_orphan,
    children,
    create_es,
    create_hijacked_service,
    dev_settings,
    eventually,
    external_service,
    purge,
    set_pods_ready,
    update_spec,
)
from tests.integration.rbac_audit import (
    REPO,
    Access,
    RecordingApiClient,
    Subject,
    compare,
    grants,
    kustomize,
    needed_by,
)

INFRA = REPO / "infra"
OVERLAYS = ("dev", "gke", "kind", "gke-autopilot")
# Overlays whose reconciler configures cluster DNS (CLUSTER_DNS=coredns); gke-autopilot's runs
# with CLUSTER_DNS=none and is held to that run in test_cluster_dns_none.py.
WITH_CLUSTER_DNS = ("dev", "gke", "kind")
# What the guide substitutes into the GKE overlays.
GKE_VALUES = {"PROJECT_ID": "my-project", "EXPORTER_IMAGE": "registry.invalid/egress-exporter:1"}
PLACEHOLDERS = {"dev": {}, "gke": GKE_VALUES, "kind": {}, "gke-autopilot": GKE_VALUES}

RECONCILER = {
    "dev": Subject("User", "egress-reconciler"),
    "gke": Subject("User", "egress-reconciler@my-project.iam.gserviceaccount.com"),
    "kind": Subject("ServiceAccount", "egress-reconciler", GATEWAY_NS),
}
EXPORTER = {
    "dev": Subject("User", "egress-exporter"),
    "gke": Subject("ServiceAccount", "egress-exporter", GATEWAY_NS),
    "kind": Subject("ServiceAccount", "egress-exporter", GATEWAY_NS),
}
# The read-only access audit (`egressctl access`). Locally its certificate user
# `egress-auditor` is in the group the base binds.
AUDITOR = {
    "dev": Subject("Group", "egress-auditors"),
    "gke": Subject("User", "egress-auditor@my-project.iam.gserviceaccount.com"),
    "kind": Subject("ServiceAccount", "egress-auditor", GATEWAY_NS),
}
# gke-autopilot is gke without cluster DNS: the same identities.
for _identities in (RECONCILER, EXPORTER, AUDITOR):
    _identities["gke-autopilot"] = _identities["gke"]
SETTINGS = Settings()  # names and paths only: the product's defaults
FIXED_NAMES = frozenset({*SETTINGS.dns_configmap_names, SETTINGS.coredns_configmap_name})
# The component that grants the Corefile write, for overlays whose pipeline runs with
# MANAGE_COREDNS_IMPORT=true.
MANAGE_IMPORT_COMPONENT = INFRA / "rbac" / "manage-coredns-import"
# The one access MANAGE_COREDNS_IMPORT adds: rewriting CoreDNS's Corefile, by name.
COREFILE_WRITE = Access("update", "", "configmaps", "kube-system", SETTINGS.coredns_configmap_name)


def _cloudbuild_manages_import() -> bool:
    build = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    return str(build["substitutions"]["_MANAGE_COREDNS_IMPORT"]) == "true"


# Whether each overlay's reconciler runs with MANAGE_COREDNS_IMPORT=true, as whatever deploys it
# sets it: dev, the cluster tests (this file, test_dns.py); kind, egressctl/kind_pipeline.py
# (--manage-coredns-import, on by default; test_kind_script.py checks it); gke, the default of
# cloudbuild.yaml's _MANAGE_COREDNS_IMPORT (docs/operations.md: add the component with it).
MANAGES_COREDNS_IMPORT = {
    "dev": True,
    "kind": True,
    "gke": _cloudbuild_manages_import(),
    "gke-autopilot": False,
}


def _kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True, check=False
    )


def _dry_run_apply(stack: DevStack, objects: list[dict[str, Any]], *extra: str) -> None:
    res = _kubectl(
        f"--kubeconfig={stack.kubeconfig}",
        "apply",
        "--server-side",
        "--dry-run=server",
        "--force-conflicts",
        "--field-manager=infra-test",
        *extra,
        "-f",
        "-",
        stdin=yaml.safe_dump_all(objects),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("(server dry run)") == len(objects), res.stdout


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_only_its_documented_placeholders(overlay: str) -> None:
    raw = _kubectl("kustomize", str(INFRA / "overlays" / overlay))
    assert raw.returncode == 0, raw.stderr
    gke = overlay.startswith("gke")
    for placeholder in GKE_VALUES:
        assert (placeholder in raw.stdout) == gke, placeholder
    objects = kustomize(INFRA / "overlays" / overlay, PLACEHOLDERS[overlay])
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("CustomResourceDefinition", "externalservices.egress.monzo.com") in kinds
    assert ("Namespace", GATEWAY_NS) in kinds
    assert ("ClusterRole", "egress-reconciler") in kinds
    assert ("Deployment", "egress-exporter") in kinds if gke else True
    assert ("ClusterRole", "egress-auditor") in kinds
    # Every binding names exactly this overlay's identities and nothing else.
    identities = {"reconciler": RECONCILER, "exporter": EXPORTER, "auditor": AUDITOR}
    for obj in objects:
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            [who] = [v for k, v in identities.items() if k in obj["roleRef"]["name"]]
            subjects = obj["subjects"]
            assert any(who[overlay].matches(s) for s in subjects), obj
            if overlay != "dev":
                assert len(subjects) == 1, f"{obj['metadata']['name']}: {subjects}"
    if overlay not in WITH_CLUSTER_DNS:
        # Nothing at all in kube-system (GKE Autopilot refuses it), and no nudge to confine.
        assert [o for o in objects if o["metadata"].get("namespace") == "kube-system"] == []
        assert not [o for o in objects if o["kind"].startswith("ValidatingAdmissionPolicy")]
        return
    # The CoreDNS nudge policy confines the same reconciler identity the bindings name.
    (policy,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == f'request.userInfo.username == "{_username(overlay)}"'


def _username(overlay: str) -> str:
    who = RECONCILER[overlay]
    if who.kind == "ServiceAccount":
        return f"system:serviceaccount:{who.namespace}:{who.name}"
    return who.name


def test_gke_overlay_wires_workload_identity_and_the_image() -> None:
    objects = kustomize(INFRA / "overlays" / "gke", GKE_VALUES)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    sa = by_kind[("ServiceAccount", "egress-exporter")]
    assert sa["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "egress-exporter@my-project.iam.gserviceaccount.com"
    }
    pod = by_kind[("Deployment", "egress-exporter")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "egress-exporter"
    container = pod["containers"][0]
    assert container["image"] == GKE_VALUES["EXPORTER_IMAGE"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GOOGLE_CLOUD_PROJECT"] == "my-project"
    assert env["GATEWAY_NAMESPACE"] == GATEWAY_NS


def _with_components(overlay: str, where: Path, *components: Path) -> list[dict[str, Any]]:
    """An overlay as a user would extend it: their own kustomization with our Components."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(INFRA / "overlays" / overlay, where)],
                "components": [os.path.relpath(c, where) for c in components],
            }
        )
    )
    return kustomize(where, PLACEHOLDERS[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_corefile_write_is_granted_only_where_import_management_is_on(
    overlay: str, tmp_path: Path
) -> None:
    reconciler = RECONCILER[overlay]
    granted = grants(kustomize(INFRA / "overlays" / overlay, PLACEHOLDERS[overlay]), reconciler)
    if overlay not in WITH_CLUSTER_DNS:
        assert [g for g in granted if g.scope == "kube-system"] == []
        return
    writes = sorted((g.scope, g.name) for g in granted if g.covers(COREFILE_WRITE))
    # Reading the Corefile (to report a missing import line) is granted everywhere.
    assert any(g.covers(dataclasses.replace(COREFILE_WRITE, verb="get")) for g in granted)
    if MANAGES_COREDNS_IMPORT[overlay]:
        assert writes == [("kube-system", SETTINGS.coredns_configmap_name)]
        return
    assert writes == []
    # The documented way to turn it on there: the component, added to the overlay as it is,
    # grants exactly the write to the overlay's own reconciler identity.
    extended = _with_components(overlay, tmp_path, MANAGE_IMPORT_COMPONENT)
    added = grants(extended, reconciler) - granted
    assert {(g.verb, g.resource, g.scope, g.name) for g in added} == {
        ("update", "configmaps", "kube-system", SETTINGS.coredns_configmap_name)
    }


@pytest.mark.cluster
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_applies_with_a_server_side_dry_run(dev_stack: DevStack, overlay: str) -> None:
    _dry_run_apply(dev_stack, kustomize(INFRA / "overlays" / overlay, PLACEHOLDERS[overlay]))


# A CoreDNS Deployment as kubeadm and kind install it (abridged to what the patch touches).
COREDNS_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      containers:
        - name: coredns
          image: coredns/coredns:1.12.0
          args: [-conf, /etc/coredns/Corefile]
          volumeMounts:
            - {name: config-volume, mountPath: /etc/coredns, readOnly: true}
      volumes:
        - name: config-volume
          configMap: {name: coredns, items: [{key: Corefile, path: Corefile}]}
"""


@pytest.mark.cluster
def test_coredns_component_mounts_the_rules_and_is_accepted(
    dev_stack: DevStack, tmp_path: Path
) -> None:
    (tmp_path / "coredns.yaml").write_text(COREDNS_DEPLOYMENT)
    # As a user would: their own kustomization of CoreDNS, with our Component (relative path).
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["coredns.yaml"],
                "components": [os.path.relpath(INFRA / "coredns", tmp_path)],
            }
        )
    )
    [deployment] = kustomize(tmp_path)
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == {"config-volume", "egress-gateways"}
    # Every ConfigMap the rules may spread over, each optional, in one directory.
    assert volumes["egress-gateways"] == {
        "name": "egress-gateways",
        "projected": {
            "sources": [
                {"configMap": {"name": name, "optional": True}}
                for name in SETTINGS.dns_configmap_names
            ]
        },
    }
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["egress-gateways"]["mountPath"] == str(Path(SETTINGS.coredns_import_path).parent)
    assert "subPath" not in mounts["egress-gateways"]
    assert mounts["config-volume"]["mountPath"] == "/etc/coredns"
    snippet = (INFRA / "coredns" / "Corefile.snippet").read_text()
    assert f"import {SETTINGS.coredns_import_path}" in snippet and "reload" in snippet
    _dry_run_apply(dev_stack, [deployment])


@pytest.mark.cluster
def test_default_deny_egress_example_is_accepted(dev_stack: DevStack, namespace: str) -> None:
    [policy] = kustomize(INFRA / "examples" / "default-deny-egress")
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert policy["spec"]["podSelector"] == {}
    _dry_run_apply(dev_stack, [policy], "-n", namespace)


# --------------------------------------------------------------------------- RBAC derivation


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def admin(dev_stack: DevStack) -> Kube:
    return Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))


@pytest.fixture
def corefile(admin: Kube) -> Iterator[dict[str, Any]]:
    """The stack's Corefile, restored afterwards whatever the test did to it."""
    live = admin.get(CONFIGMAP, SETTINGS.coredns_configmap_name, "kube-system")
    assert live is not None
    yield live
    admin.merge_patch(
        CONFIGMAP, SETTINGS.coredns_configmap_name, {"data": live["data"]}, "kube-system"
    )


def _reconciler_scenarios(
    dev_stack: DevStack, admin: Kube, corefile: dict[str, Any], name: str, manage_import: bool
) -> RecordingApiClient:
    api = RecordingApiClient(
        api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler"))
    )
    kube = Kube(api)
    clock = Clock()
    settings = dev_settings(
        delete_grace_s=60,
        enable_pdb=True,
        manage_coredns_import=manage_import,
        coredns_import_path=dev_stack.env["COREDNS_IMPORT_PATH"],
    )
    reconciler = build_reconciler(kube, settings, clock=clock)
    import_line = f"import {settings.coredns_import_path}"

    # Create: every gateway object is created by server-side apply; finalizer; status; and,
    # with our DNS ConfigMap missing, its creation (POST).
    admin.delete(CONFIGMAP, settings.dns_configmap_name, settings.dns_configmap_namespace)
    create_es(admin, external_service(name, hijackDns=True, dnsName=f"{name}.example.com"))
    first = reconciler.reconcile(name)
    assert first.outcome == "converged", first
    assert set(children(admin, name)) >= {"Deployment", "Service", "PodDisruptionBudget"}
    # Hijack: pods ready, Service label true, rules delivered (PUT) and the missing Corefile
    # import line added (PUT of kube-system/coredns) when allowed, else only reported.
    stripped = corefile["data"][settings.corefile_key].replace(f"    {import_line}\n", "")
    assert stripped != corefile["data"][settings.corefile_key]
    admin.merge_patch(
        CONFIGMAP,
        settings.coredns_configmap_name,
        {"data": {settings.corefile_key: stripped}},
        "kube-system",
    )
    set_pods_ready(admin, name, True)
    hijacked = reconciler.reconcile(name)
    assert hijacked.hijack_state == "true", hijacked
    dns = admin.get(CONFIGMAP, settings.dns_configmap_name, settings.dns_configmap_namespace)
    assert dns is not None and f"{name}.example.com" in "".join(dns["data"].values())
    live_corefile = admin.get(CONFIGMAP, settings.coredns_configmap_name, "kube-system")
    assert live_corefile is not None
    if manage_import:
        assert live_corefile["data"][settings.corefile_key].count(import_line) == 1
    else:
        assert live_corefile["data"][settings.corefile_key] == stripped, "not allowed: written"
        # Put the line back at once: the stack's CoreDNS serves other tests meanwhile.
        admin.merge_patch(
            CONFIGMAP, settings.coredns_configmap_name, {"data": corefile["data"]}, "kube-system"
        )
    # Update: a spec change re-applies existing objects.
    update_spec(admin, name, {"ports": [{"port": 443}, {"port": 8443}]})
    assert reconciler.reconcile(name).outcome == "converged"
    # Sweep: one LIST per kind, an orphan pruned, the PDB pruned once ENABLE_PDB is off.
    orphan = f"orphan-{name}"
    apply_orphan(admin, orphan)
    sweeper = build_reconciler(kube, dataclasses.replace(settings, enable_pdb=False), clock=clock)
    report = sweeper.sweep()
    assert any(ch.name == orphan for ch in report.pruned), report.to_dict()
    assert admin.get(CONFIGMAP, orphan, GATEWAY_NS) is None
    assert "PodDisruptionBudget" not in children(admin, name)
    _spread_and_gather(admin, kube, settings, name)
    # Delete: DNS withdrawn first (Service label patched, rules rewritten), grace recorded,
    # then the gateway deleted and the finalizer released.
    admin.delete(EXTERNAL_SERVICE, name)
    waiting = reconciler.reconcile(name)
    assert waiting.outcome == "deleting", waiting
    clock.now += dt.timedelta(seconds=61)
    gone = reconciler.reconcile(name)
    assert gone.outcome == "deleted", gone
    eventually(lambda: admin.get(EXTERNAL_SERVICE, name) is None, 30, f"{name} to go")
    assert children(admin, name) == {}
    return api


def _spread_and_gather(admin: Kube, kube: Kube, settings: Settings, name: str) -> None:
    """Beyond one ConfigMap: rules spread over every one of them (a small budget stands in for
    9,000 names), then back into the first; each is created, read, written and emptied."""
    from core.kube import SERVICE
    from dns.delivery import DnsDelivery
    from dns.render import rules_only, shard_of

    shards = settings.dns_configmap_shards
    wanted: dict[int, list[str]] = {i: [] for i in range(1, shards)}
    k = 0
    while any(len(v) < 2 for v in wanted.values()):
        dns_name = f"{name}-sh{k}.example.com"
        if len(wanted[shard_of(dns_name, shards)]) < 2:
            wanted[shard_of(dns_name, shards)].append(dns_name)
        k += 1
    services = [f"{name}-sh{i}" for i in range(sum(len(v) for v in wanted.values()))]
    dns_names = [n for v in wanted.values() for n in v]
    for svc, dns_name in zip(services, dns_names, strict=True):
        create_hijacked_service(admin, svc, dns_name)
    ns = settings.dns_configmap_namespace
    try:
        # A budget one byte short of what the rules need in one ConfigMap: they spread.
        one = DnsDelivery(settings).sync(kube).rendered.data
        budget = sum(map(len, one.values())) - 1
        assert DnsDelivery(settings, max_configmap_bytes=budget).sync(kube).written
        for dns_name in dns_names:
            holder = settings.dns_configmap_names[shard_of(dns_name, shards)]
            cm = admin.get(CONFIGMAP, holder, ns)
            assert cm is not None and dns_name in "".join(cm["data"].values()), holder
    finally:
        for svc in services:
            admin.delete(SERVICE, svc, GATEWAY_NS)
    DnsDelivery(settings).sync(kube)  # (a concurrent sync may have gathered them already)
    for other in settings.dns_configmap_names[1:]:
        cm = admin.get(CONFIGMAP, other, ns)
        assert cm is not None and rules_only(cm.get("data") or {}) == {}, other


def _needed_by_reconciler(
    dev_stack: DevStack, admin: Kube, corefile: dict[str, Any], name: str, manage_import: bool
) -> set[Access]:
    """The accesses of the reconciler's scenarios, with ``name`` replaced by ``<es>`` so that
    runs under different names compare."""
    try:
        api = _reconciler_scenarios(dev_stack, admin, corefile, name, manage_import)
    finally:
        purge(admin, name)
    needed = needed_by(api.requests)
    # Sanity: the scenarios did reach every path that needs its own grant.
    expected_samples = {
        Access("create", "", "configmaps", "kube-system", ""),
        Access("get", "", "configmaps", "kube-system", SETTINGS.coredns_configmap_name),
        Access("update", "", "configmaps", "kube-system", SETTINGS.dns_configmap_name),
        Access("update", "", "configmaps", "kube-system", SETTINGS.dns_configmap_names[-1]),
        Access("get", "", "configmaps", "kube-system", SETTINGS.dns_configmap_names[-1]),
        Access("patch", c.GROUP, "externalservices/status", "", name),
        Access("update", c.GROUP, "externalservices/finalizers", "", name),
        Access("delete", "policy", "poddisruptionbudgets", GATEWAY_NS, name),
        Access("list", "apps", "deployments", GATEWAY_NS, ""),
        Access("list", "discovery.k8s.io", "endpointslices", "kube-system", ""),
    }
    assert expected_samples <= needed, sorted(expected_samples - needed)
    assert any(a.verb == "patch" and a.resource == "pods" for a in needed), "no CoreDNS nudge"
    assert (COREFILE_WRITE in needed) == manage_import
    return {dataclasses.replace(a, name=a.name.replace(name, "<es>")) for a in needed}


@pytest.mark.cluster
def test_reconciler_rbac_is_exactly_what_its_requests_need(
    dev_stack: DevStack, admin: Kube, corefile: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    needed = {
        manage_import: _needed_by_reconciler(
            dev_stack, admin, corefile, f"rbac-{label}-{unique}", manage_import
        )
        for manage_import, label in ((True, "on"), (False, "off"))
    }
    # MANAGE_COREDNS_IMPORT changes exactly one access: the Corefile write.
    assert needed[True] - needed[False] == {COREFILE_WRITE}, sorted(needed[True] ^ needed[False])
    assert needed[False] <= needed[True], sorted(needed[False] - needed[True])
    for overlay in WITH_CLUSTER_DNS:
        objects = kustomize(INFRA / "overlays" / overlay, PLACEHOLDERS[overlay])
        problems = compare(
            needed[MANAGES_COREDNS_IMPORT[overlay]],
            grants(objects, RECONCILER[overlay]),
            FIXED_NAMES,
        )
        assert not problems, f"overlay {overlay}, reconciler:\n  " + "\n  ".join(problems)
    # The checker holds both ways: gke with the Corefile write but without the setting is
    # broader than needed, and gke with the setting needs the write, which the component
    # (the documented way to turn it on there) adds and nothing else.
    gke = grants(kustomize(INFRA / "overlays" / "gke", GKE_VALUES), RECONCILER["gke"])
    gke_managing = grants(
        _with_components("gke", tmp_path / "gke-managing", MANAGE_IMPORT_COMPONENT),
        RECONCILER["gke"],
    )
    [broader] = compare(needed[False], gke_managing, FIXED_NAMES)
    assert broader.startswith("unused: update core/configmaps") and "name=coredns" in broader
    [missing] = compare(needed[True], gke, FIXED_NAMES)
    assert missing == f"missing: {COREFILE_WRITE}"
    assert compare(needed[True], gke_managing, FIXED_NAMES) == []


# --------------------------------------------------------------------------- CoreDNS nudge


def _patch_pod_as_reconciler(
    dev_stack: DevStack, name: str, patch: dict[str, Any], namespace: str = "kube-system"
) -> tuple[int, str]:
    """(HTTP status, message) of a merge patch sent as the reconciler's identity."""
    from core.errors import ReconcileError
    from core.kube import POD

    kube = Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler")))
    try:
        kube.request(
            "PATCH",
            POD.path(namespace, name),
            body=patch,
            content_type="application/merge-patch+json",
            final_statuses=frozenset({400, 403, 404, 409, 422}),
        )
    except ReconcileError as exc:
        return exc.status or 0, str(exc)
    return 200, ""


@pytest.mark.cluster
def test_the_reconciler_may_only_nudge_coredns_pods(dev_stack: DevStack, admin: Kube) -> None:
    """RBAC lets the reconciler patch pods in kube-system; the admission policy narrows that to
    one annotation on CoreDNS pods. Every other change is refused by the real API server."""
    from core.kube import POD

    pods, _ = admin.list_all(POD, "kube-system", label_selector="k8s-app=kube-dns")
    assert pods, "the dev stack runs CoreDNS as a pod"
    coredns = pods[0]["metadata"]["name"]
    key = c.ANNOTATION_DNS_RULES_VERSION
    assert _patch_pod_as_reconciler(
        dev_stack, coredns, {"metadata": {"annotations": {key: "t1"}}}
    ) == (200, "")
    live = admin.get(POD, coredns, "kube-system")
    assert live is not None and live["metadata"]["annotations"][key] == "t1"
    refused = {
        "a label": {"metadata": {"labels": {"k8s-app": "not-dns"}}},
        "a label with the annotation": {
            "metadata": {"annotations": {key: "t2"}, "labels": {"extra": "x"}}
        },
        "another annotation": {"metadata": {"annotations": {"example.com/x": "1"}}},
        "the spec": {"spec": {"activeDeadlineSeconds": 5}},
        "finalizers": {"metadata": {"finalizers": ["example.com/hold"]}},
    }
    for what, patch in refused.items():
        status, message = _patch_pod_as_reconciler(dev_stack, coredns, patch)
        assert status == 422 and "egress-reconciler-coredns-nudge" in message, (what, message)
    after = admin.get(POD, coredns, "kube-system")
    assert after is not None
    assert after["metadata"]["labels"] == live["metadata"]["labels"]
    assert after["metadata"]["annotations"] == live["metadata"]["annotations"]
    assert after["spec"] == live["spec"]
    # A pod in kube-system that is not CoreDNS cannot even be annotated.
    other = f"not-coredns-{os.getpid()}"
    admin.request(
        "POST",
        POD.path("kube-system"),
        body={
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": other, "labels": {"app": "other"}},
            "spec": {
                "nodeSelector": {"example.com/no-such-node": "true"},
                "containers": [{"name": "c", "image": "egress-dev.local/pause:1"}],
            },
        },
    )
    try:
        status, message = _patch_pod_as_reconciler(
            dev_stack, other, {"metadata": {"annotations": {key: "t3"}}}
        )
        assert status == 422 and "CoreDNS pods" in message, message
    finally:
        admin.delete(POD, other, "kube-system")
    # Outside kube-system RBAC alone refuses.
    status, _ = _patch_pod_as_reconciler(dev_stack, "any", {}, namespace=GATEWAY_NS)
    assert status == 403


class FakePublisher:
    def __init__(self) -> None:
        self.notices: list[Notice] = []

    def publish(self, notice: Notice) -> None:
        self.notices.append(notice)

    def flush(self, timeout_s: float) -> bool:
        return True


@pytest.mark.cluster
def test_exporter_rbac_is_exactly_what_its_requests_need(dev_stack: DevStack) -> None:
    # The exporter's own transport (core.kubehttp), as it runs.
    api = RecordingApiClient(
        KubeHttp.from_kubeconfig(dev_stack.identity_kubeconfig("egress-exporter"))
    )
    exporter = Exporter(
        Kube(api), FakePublisher(), ExporterSettings(project="rbac-test", watch_timeout_s=1)
    )
    threads = [
        threading.Thread(target=exporter.watch_loop, args=(key,), daemon=True)
        for key in exporter.watches
    ]
    for thread in threads:
        thread.start()
    try:

        def watched_both() -> bool:
            watches = [r for r in api.requests if dict(r.query).get("watch") == "true"]
            paths = {r.path for r in watches if r.status == 200}
            return exporter.ready and paths == {
                EXTERNAL_SERVICE.path(),
                DEPLOYMENT.path(GATEWAY_NS),
            }

        eventually(watched_both, 30, "the exporter to list and watch both kinds")
    finally:
        exporter.stop()
        for thread in threads:
            thread.join(timeout=10)
    needed = needed_by(api.requests)
    assert {a.verb for a in needed} == {"list", "watch"}
    for overlay in OVERLAYS:
        objects = kustomize(INFRA / "overlays" / overlay, PLACEHOLDERS[overlay])
        problems = compare(needed, grants(objects, EXPORTER[overlay]))
        assert not problems, f"overlay {overlay}, exporter:\n  " + "\n  ".join(problems)


@pytest.mark.cluster
def test_auditor_rbac_is_exactly_what_its_requests_need(dev_stack: DevStack, admin: Kube) -> None:
    """`egressctl access` as the auditor, with pods owned by a ReplicaSet and by a Job in the
    cluster (so that both owner lists are sent), compared with each overlay's grants."""
    from access.model import audit, snapshot_from_kube
    from core.kube import JOB, NAMESPACE, POD

    namespace = f"rbac-audit-{os.getpid()}-{dt.datetime.now().strftime('%H%M%S%f')}"
    pod_spec = {
        "nodeSelector": {"egress.monzo.com/test-no-such-node": "true"},
        "restartPolicy": "Never",
        "containers": [{"name": "c", "image": "egress-dev.local/pause:1"}],
    }
    admin.request(
        "POST",
        NAMESPACE.path(),
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
    )
    try:
        admin.request(
            "POST",
            DEPLOYMENT.path(namespace),
            body={
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "web"},
                "spec": {
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {**pod_spec, "restartPolicy": "Always"},
                    },
                },
            },
        )
        admin.request(
            "POST",
            JOB.path(namespace),
            body={"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
                  "spec": {"template": {"spec": pod_spec}}},
        )  # fmt: skip
        eventually(lambda: len(admin.list_all(POD, namespace)[0]) == 2, 60, "both pods")
        api = RecordingApiClient(
            api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-auditor"))
        )
        audit(snapshot_from_kube(Kube(api), SETTINGS))
    finally:
        admin.delete(NAMESPACE, namespace)
    needed = needed_by(api.requests)
    assert {a.verb for a in needed} == {"list"}
    assert Access("list", "apps", "replicasets", "", "") in needed
    assert Access("list", "batch", "jobs", "", "") in needed
    assert Access("list", "", "services", GATEWAY_NS, "") in needed
    for overlay in OVERLAYS:
        objects = kustomize(INFRA / "overlays" / overlay, PLACEHOLDERS[overlay])
        problems = compare(needed, grants(objects, AUDITOR[overlay]))
        assert not problems, f"overlay {overlay}, auditor:\n  " + "\n  ".join(problems)
        # And nothing of the audit's reads goes to the reconciler.
        reconciler = grants(objects, RECONCILER[overlay])
        assert not [
            a
            for a in needed
            if a.resource in ("pods", "namespaces", "replicasets", "jobs")
            and any(g.covers(a) for g in reconciler)
        ]


def test_the_comparison_fails_on_missing_and_broader_grants() -> None:
    """The checker itself: a missing verb, an unused verb, a namespaced kind granted
    cluster-wide and a fixed name granted without resourceNames are each reported."""
    from tests.integration.rbac_audit import Grant

    needed = {
        Access("get", "", "configmaps", "kube-system", "coredns"),
        Access("list", "apps", "deployments", GATEWAY_NS, ""),
        Access("patch", "apps", "deployments", GATEWAY_NS, "gw"),
    }
    exact = {
        Grant("get", "", "configmaps", "kube-system", "coredns"),
        Grant("list", "apps", "deployments", GATEWAY_NS, "*"),
        Grant("patch", "apps", "deployments", GATEWAY_NS, "*"),
    }
    assert compare(needed, exact, frozenset({"coredns"})) == []
    missing = exact - {Grant("patch", "apps", "deployments", GATEWAY_NS, "*")}
    assert [p.split(":")[0] for p in compare(needed, missing)] == ["missing"]
    unused = exact | {Grant("watch", "apps", "deployments", GATEWAY_NS, "*")}
    assert [p.split(":")[0] for p in compare(needed, unused)] == ["unused"]
    wide = (exact - {Grant("list", "apps", "deployments", GATEWAY_NS, "*")}) | {
        Grant("list", "apps", "deployments", "*", "*")
    }
    assert [p.split(":")[0] for p in compare(needed, wide)] == [
        "cluster-wide but only used in namespaces"
    ]
    unnamed = (exact - {Grant("get", "", "configmaps", "kube-system", "coredns")}) | {
        Grant("get", "", "configmaps", "kube-system", "*")
    }
    problems = compare(needed, unnamed, frozenset({"coredns"}))
    assert [p.split(":")[0] for p in problems] == ["not limited to resourceNames ['coredns']"]
