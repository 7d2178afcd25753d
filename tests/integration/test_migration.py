"""From the original egress-operator to this product and back, on the real local cluster.

The original cannot run here (no images of it), so each test recreates what a cluster running
it holds, the way it writes it (tests/integration/original_operator.py): its CRD without status
subresource, its manager Deployment and leader-election lease, gateway objects written under
its field manager, and a "fighter" that keeps rewriting a field we own, as it does while it
runs.

- ``egressctl migrate`` refuses while the original's manager has replicas or its lease is
  fresh, and writes nothing then;
- ``--apply`` replaces its CRD in place (every stored ExternalService keeps its UID, spec and
  resourceVersion; the CRD then is exactly ours, with a status subresource), adopts its gateway
  objects (same UIDs, the original's leftovers gone) with one rolling restart and not one
  failed request from a client that resolves the name through cluster DNS for every request;
- a writer that keeps rewriting a field we own is reported (manager and field) with a
  ``Conflict`` condition and left alone, instead of being fought on every sweep;
- ``egressctl uninstall`` releases our finalizers and annotations, so deletions complete with
  our reconciler stopped, and the original can take the gateways back.

The CRD swap affects every test sharing the API server while it lasts (the original's CRD has no
status subresource): the window is a few seconds, and ``our_crd_restored`` puts our CRD back
whatever happens.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from core import constants as c
from core.errors import PermanentError
from core.kube import (
    DEPLOYMENT,
    EXTERNAL_SERVICE,
    REPLICA_SET,
    SERVICE,
    Kube,
)
from dns.delivery import DnsDelivery
from egressctl.cli import main as egressctl
from reconcile.controller import Reconciler
from reconcile.migration import CRD, inspect_crd, leftover_bridges, replace_crd
from reconcile.results import Outcome
from tests.conftest import REPO, DevStack
from tests.integration.changes import _rolled_out
from tests.integration.helpers import (
    GATEWAY_NS,
    ContinuousClient,
    await_dns,
    boot_clock,
    children,
    create_es,
    dev_settings,
    eventually,
    external_service,
    gateway_pods,
    purge,
    run_pod,
    serve_offline_name,
    sh,
)
from tests.integration.original_operator import (
    MANAGER_DEPLOYMENT,
    NAMESPACE,
    ORIGINAL_MANAGER,
    LeaderLease,
    create_as_original,
    gateway_objects,
    install_original_crd,
    manager_deployment,
    patch_as_original,
)

pytestmark = pytest.mark.cluster

CRD_FILE = REPO / "infra" / "crd" / "externalservices.yaml"
CLIENT = "mig-client"
IMAGE_PATH = 'spec.template.spec.containers[name="gateway"].image'


def our_crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return loaded


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = egressctl(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def our_crd_restored(admin: Kube) -> Iterator[None]:
    """Whatever the test does to the CRD, ours is back (in place, as `dev up` applies it) and
    served with its status subresource afterwards."""
    yield
    replace_crd(admin, our_crd(), "egressctl-dev")
    subprocess.run(
        ["kubectl", "apply", "--server-side", "--force-conflicts",
         "--field-manager=egressctl-dev", "-f", str(CRD_FILE)],
        check=True, capture_output=True,
    )  # fmt: skip
    assert inspect_crd(admin, our_crd()).flavour == "ours"


@pytest.fixture
def client_namespace(k8s: Any) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    ns = f"mig-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    try:
        yield ns
    finally:
        core.delete_namespace(ns)


@pytest.fixture
def original_manager(admin: Kube, dev_stack: DevStack) -> Iterator[LeaderLease]:
    """The original's manager Deployment (one ready pod) holding its leader-election lease."""
    admin.delete(DEPLOYMENT, MANAGER_DEPLOYMENT, NAMESPACE)
    # A manager left by an earlier run must be gone, not terminating: its ready pod would
    # satisfy the readiness wait below and then vanish under the test.
    eventually(
        lambda: admin.get(DEPLOYMENT, MANAGER_DEPLOYMENT, NAMESPACE) is None,
        60,
        "an earlier manager Deployment to go",
    )
    admin.request(
        "POST",
        DEPLOYMENT.path(NAMESPACE),
        body=manager_deployment(dev_stack.env["EGRESS_DEV_CLIENT_IMAGE"]),
    )
    lease = LeaderLease(admin, f"{MANAGER_DEPLOYMENT}-6d4f9c7b8-x2x9q")
    lease.start()
    try:
        yield lease
    finally:
        lease.remove()
        admin.delete(DEPLOYMENT, MANAGER_DEPLOYMENT, NAMESPACE)


def _ready(admin: Kube, name: str, namespace: str = GATEWAY_NS) -> bool:
    dep = admin.get(DEPLOYMENT, name, namespace) or {}
    return bool(int((dep.get("status") or {}).get("readyReplicas") or 0) >= 1)


def _replica_sets(admin: Kube, name: str) -> list[str]:
    items, _ = admin.list_all(REPLICA_SET, GATEWAY_NS, f"{c.LABEL_GATEWAY}={name}")
    return sorted(rs["metadata"]["name"] for rs in items)


# -- refusing while the original runs -------------------------------------------------------------


def test_migrate_refuses_while_the_original_runs(
    admin: Kube, original_manager: LeaderLease, capsys: pytest.CaptureFixture[str]
) -> None:
    eventually(lambda: _ready(admin, MANAGER_DEPLOYMENT, NAMESPACE), 90, "the manager pod")
    crd_before = admin.get(CRD, our_crd()["metadata"]["name"])
    assert crd_before is not None

    rc, out, _ = run_cli(capsys, "migrate", "--json")
    plan = json.loads(out)
    assert rc == 2, out
    assert plan["original"]["running"] is True
    assert any("Deployment egress-operator-system/egress-operator-controller-manager has 1 "
               "ready of 1" in b for b in plan["blockers"]), plan["blockers"]  # fmt: skip
    assert any("Lease" in b and "controller-leader-election-helper" in b for b in plan["blockers"])
    # The settings mapping comes from the original manager's environment and flags.
    mapped = {m["original"]: m for m in plan["settings"]}
    assert mapped["NODE_SELECTOR_KEY"]["ours"] == "NODE_SELECTOR_KEY"
    assert mapped["--enable-pod-disruption-budgets"]["ours"] == "ENABLE_PDB"
    assert mapped["ENVOY_IMAGE"]["ourValue"] == "(unset)"

    rc, _, err = run_cli(capsys, "migrate", "--apply")
    assert rc == 2 and "refused: the original operator runs" in err, err
    crd_after = admin.get(CRD, our_crd()["metadata"]["name"])
    assert crd_after is not None
    assert crd_after["metadata"]["resourceVersion"] == crd_before["metadata"]["resourceVersion"]

    # Stopped, but its lease was renewed seconds ago: another manager may still hold it.
    admin.merge_patch(DEPLOYMENT, MANAGER_DEPLOYMENT, {"spec": {"replicas": 0}}, NAMESPACE)
    original_manager.halt()
    eventually(
        lambda: (
            not int(
                (
                    (admin.get(DEPLOYMENT, MANAGER_DEPLOYMENT, NAMESPACE) or {}).get("status") or {}
                ).get("replicas")
                or 0
            )
        ),
        60,
        "the manager pod to go",
    )
    rc, out, _ = run_cli(capsys, "migrate")
    assert rc == 2, out
    assert "leader-election Lease egress-operator-system/controller-leader-election-helper" in out
    assert "Deployment egress-operator-controller-manager: 0 ready of 0" in out

    # Its lease has expired: nothing blocks.
    original_manager.expire()
    rc, out, _ = run_cli(capsys, "migrate")
    assert rc == 0, out
    assert "nothing blocks" in out and "expired" in out


# -- the migration, end to end -------------------------------------------------------------------


def test_migrate_replaces_the_crd_and_adopts_the_gateways_in_place(
    k8s: Any,
    admin: Kube,
    dev_stack: DevStack,
    client_namespace: str,
    our_crd_restored: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = dev_stack.env
    name = f"mig-{uuid.uuid4().hex[:6]}"
    bad = f"{name}-old"
    settings = dev_settings(coredns_import_path=env["COREDNS_IMPORT_PATH"])
    tcp_port = int(env["EGRESS_DEV_UPSTREAM_TCP_PORT"])
    dns_name = serve_offline_name(env, f"{name}.offline.test")
    traffic: ContinuousClient | None = None
    try:
        client = run_pod(
            k8s, client_namespace, CLIENT, env["EGRESS_DEV_CLIENT_IMAGE"], ["sleep", "3600"],
            labels={c.grant_label(name): c.GRANT_LABEL_VALUE},
        )  # fmt: skip
        client_ip = str(client["status"]["pod_ip"])
        # What the original left: the ExternalService (no finalizer, no status) and its
        # gateway, written under its field manager.
        es = create_es(
            admin,
            external_service(
                name, dnsName=dns_name, hijackDns=True, ports=[{"port": tcp_port}], minReplicas=1
            ),
        )
        for obj in gateway_objects(es, env["ENVOY_IMAGE"]):
            create_as_original(admin, obj)
        eventually(lambda: _ready(admin, name), 120, "the original's gateway pod to be ready")
        # The original's CoreDNS plugin answers hijacked names with the Service's ClusterIP;
        # here our rules stand in for it, rendered from the same Service label.
        DnsDelivery(settings).sync(admin)
        service = admin.get(SERVICE, name, GATEWAY_NS)
        assert service is not None
        cluster_ip = service["spec"]["clusterIP"]
        await_dns(
            lambda: cluster_ip in sh(client_namespace, CLIENT, f"nslookup {dns_name}").stdout,
            admin,
            "the client to resolve the name to the original's gateway",
        )
        uids = {kind: obj["metadata"]["uid"] for kind, obj in children(admin, name).items()}
        assert set(uids) == {"ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                             "NetworkPolicy", "Service"}  # fmt: skip
        pods_before = {p["metadata"]["uid"] for p in gateway_pods(admin, name)}
        replica_sets_before = _replica_sets(admin, name)
        assert len(replica_sets_before) == 1

        traffic = ContinuousClient(client_namespace, CLIENT, dns_name, tcp_port)
        started = boot_clock()
        time.sleep(3)  # traffic through the original's gateway first

        # -- the window with the original's CRD: as short as possible (other tests share it).
        install_original_crd(admin)
        t_window = time.monotonic()
        eventually(
            lambda: inspect_crd(admin, our_crd()).flavour == "original", 30, "the original CRD"
        )
        # An object the original accepted and this product refuses (uppercase dnsName).
        create_es(admin, external_service(bad, dnsName="Old.Example.COM"))
        stored_before = {
            item["metadata"]["name"]: (item["metadata"]["uid"], item["metadata"]["resourceVersion"])
            for item in admin.list_all(EXTERNAL_SERVICE)[0]
        }
        # Our reconciler against it: the 404 of every status write now says what to install.
        with pytest.raises(PermanentError, match="no status subresource") as refused:
            Reconciler(admin.with_dry_run(True), settings).reconcile(name)
        assert "egressctl migrate" in str(refused.value)

        rc, out, _ = run_cli(capsys, "migrate", "--json")
        assert rc == 0, out
        plan = json.loads(out)
        assert plan["blockers"] == [] and plan["crd"]["flavour"] == "original"
        mine = {a["kind"]: a for a in plan["adoptions"][name]}
        assert {a["uid"] for a in mine.values()} == set(uids.values())
        assert all(a["originalManagers"] == [ORIGINAL_MANAGER] for a in mine.values()), mine
        assert mine["Deployment"]["rollingRestart"] is True
        # The original's single port is unnamed; ours is named: bridged during the rename.
        assert mine["Service"]["renamedPorts"] == {"": f"{name}-tcp-{tcp_port}"}
        assert name in plan["rollingRestarts"]
        # The CoreDNS steps: the dev cluster already mounts and imports our rules (stock CoreDNS
        # built here, no `egressoperator` line); the image is not an upstream one.
        steps = plan["coredns"]["steps"]
        assert len(steps) == 5 and steps[0]["done"] and steps[1]["done"] and steps[3]["done"]
        stored = {s["name"]: s for s in plan["storedExternalServices"]}
        assert stored[bad]["problems"] and "dnsName" in stored[bad]["problems"][0]

        applying = boot_clock()
        rc, out, err = run_cli(capsys, "migrate", "--apply", "--json")
        applied = boot_clock()
        window_s = time.monotonic() - t_window
        # -- the window is closed: our CRD is served again.
        report = json.loads(out)
        assert rc in (0, 1), err  # 1: another test's object failed in the sweep meanwhile
        assert report["crdReplaced"] is True

        # The CRD is exactly ours now, owned by the deploy field manager only.
        crd = admin.get(CRD, our_crd()["metadata"]["name"])
        assert crd is not None
        assert inspect_crd(admin, our_crd()).flavour == "ours"
        assert "status" in crd["spec"]["versions"][0]["subresources"]
        assert [e["manager"] for e in crd["metadata"]["managedFields"]
                if not e.get("subresource")] == ["egress-gateways-deploy"]  # fmt: skip
        resources = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "properties"
        ]["resources"]
        assert "claims" not in (resources.get("properties") or {}), "the original's leftover"
        assert "controller-gen.kubebuilder.io/version" not in (
            crd["metadata"].get("annotations") or {}
        )
        # The CRD change rewrote no stored object: same UID and resourceVersion right after it
        # for all of them (others' tests may write theirs meanwhile; ours nobody does).
        assert report["storedKept"] >= 2 and not {name, bad} & set(report["storedChanged"])
        mine_after = admin.get(EXTERNAL_SERVICE, name)
        assert mine_after is not None
        assert mine_after["metadata"]["uid"] == es["metadata"]["uid"]
        assert mine_after["spec"]["dnsName"] == dns_name
        assert c.FINALIZER in mine_after["metadata"]["finalizers"]
        bad_after = admin.get(EXTERNAL_SERVICE, bad)
        assert bad_after is not None and bad_after["metadata"]["uid"] == stored_before[bad][0]
        valid = next(cd for cd in bad_after["status"]["conditions"] if cd["type"] == "Valid")
        assert valid["status"] == "False" and "dnsName" in valid["message"]

        # The gateway objects are the same objects, now ours alone, leftovers gone.
        live = children(admin, name)
        assert {kind: obj["metadata"]["uid"] for kind, obj in live.items()} == uids
        assert live["Service"]["spec"]["clusterIP"] == cluster_ip
        for kind, obj in live.items():
            managers = {e["manager"] for e in obj["metadata"]["managedFields"]}
            assert ORIGINAL_MANAGER not in managers, (kind, managers)
        container = live["Deployment"]["spec"]["template"]["spec"]["containers"][0]
        assert "env" not in container, "the original's ENVOY_UID=0 is gone"
        assert container["image"] == settings.envoy_image
        assert report["gatewayObjectsRecreated"] == []
        assert leftover_bridges(admin, GATEWAY_NS) == [], "the rename's bridge is gone"
        assert name in report["rollingRestarts"]

        # One rolling restart, and no request lost meanwhile.
        eventually(lambda: _rolled_out(admin, name), 240, "the adoption's rolling restart")
        rolled_at = boot_clock()
        again = Reconciler(admin, settings).reconcile(name)
        assert again.outcome == Outcome.IN_SYNC, again
        assert Reconciler(admin, settings).reconcile(name).outcome == Outcome.IN_SYNC
        time.sleep(3)
        replica_sets_after = _replica_sets(admin, name)
        pods_after = {p["metadata"]["uid"] for p in gateway_pods(admin, name)}
        assert len(replica_sets_after) == 2, (replica_sets_before, replica_sets_after)
        assert not pods_before & pods_after, "every pod was replaced once"
        assert all(
            cs.get("restartCount", 0) == 0
            for p in gateway_pods(admin, name)
            for cs in (p.get("status") or {}).get("containerStatuses") or []
        )
        answer = sh(client_namespace, CLIENT, f"nslookup {dns_name}").stdout
        assert cluster_ip in answer, answer
        samples = traffic.stop()
        traffic = None
        during = [s for s in samples if started <= s.at]
        failed = [s for s in during if not s.ok]
        via_gateway = [s for s in during if s.ok and s.peer != client_ip]
        print(
            f"\nmigration measured: CRD window {window_s:.1f}s; rolling restarts 1 "
            f"(ReplicaSets {len(replica_sets_before)} -> {len(replica_sets_after)}, pods replaced "
            f"{len(pods_before)} -> {len(pods_after)}); roll done {rolled_at - started:.1f}s after "
            f"traffic began (migrate --apply took {applied - applying:.1f}s); requests "
            f"{len(during)}, failed {len(failed)}, through the gateway {len(via_gateway)}; DNS "
            f"answer {cluster_ip} before and after"
        )
        assert len(during) >= 100, "too little traffic to prove anything"
        assert not failed, failed[:5]
        assert len(via_gateway) == len(during), "every request went through the gateway"
    finally:
        if traffic is not None:
            traffic.stop()
        purge(admin, bad)
        purge(admin, name)


# -- no silent fights ----------------------------------------------------------------------------


class Fighter:
    """Another field manager writing the gateway's Envoy image every ``every_s``, as the original
    operator (or a GitOps tool holding an old manifest) does while it runs."""

    def __init__(self, admin: Kube, name: str, image: str, every_s: float = 1.0) -> None:
        self.stop = threading.Event()
        self.writes = 0

        def loop() -> None:
            while not self.stop.is_set():
                patch_as_original(
                    admin,
                    "Deployment",
                    name,
                    {"spec": {"template": {"spec": {"containers": [
                        {"name": "gateway", "image": image}]}}}},
                )  # fmt: skip
                self.writes += 1
                self.stop.wait(every_s)

        self.thread = threading.Thread(target=loop, daemon=True)

    def __enter__(self) -> Fighter:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _image(admin: Kube, name: str) -> str:
    dep = admin.get(DEPLOYMENT, name, GATEWAY_NS) or {}
    return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])


def _our_write_time(admin: Kube, name: str) -> str:
    dep = admin.get(DEPLOYMENT, name, GATEWAY_NS) or {}
    return next(
        str(e["time"])
        for e in dep["metadata"]["managedFields"]
        if e["manager"] == c.FIELD_MANAGER and e["operation"] == "Apply"
    )


def test_a_writer_that_keeps_rewriting_our_fields_is_reported_not_fought(
    admin: Kube,
    as_reconciler: Kube,
    dev_stack: DevStack,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"fight-{uuid.uuid4().hex[:6]}"
    settings = dev_settings()
    reconciler = Reconciler(as_reconciler, settings)
    theirs = "egress-dev.local/envoy:their-pin"
    try:
        create_es(admin, external_service(name))
        assert reconciler.reconcile(name).outcome == Outcome.CONVERGED
        with Fighter(admin, name, theirs) as fighter:
            eventually(lambda: _image(admin, name) == theirs, 30, "the fighter's first write")
            # First time: a hand edit as far as we know. Taken back, and remembered.
            first = reconciler.reconcile(name)
            assert first.outcome == Outcome.CONVERGED and not first.fights, first
            fields = {f.path for ch in first.changes for f in ch.fields}
            assert "spec.template.spec.containers[0].image" in fields
            es = admin.get(EXTERNAL_SERVICE, name)
            assert es is not None
            memory = json.loads(es["metadata"]["annotations"][c.ANNOTATION_TAKEN_BACK])
            assert memory["Deployment"]["managers"] == [ORIGINAL_MANAGER]
            # It writes again: it keeps rewriting. Reported by manager and field, not fought.
            eventually(lambda: _image(admin, name) == theirs, 30, "the fighter's rewrite")
            second = reconciler.reconcile(name)
            assert second.outcome == Outcome.CONTESTED, second
            assert not second.changes
            [fight] = second.fights
            assert (fight.kind, fight.manager) == ("Deployment", ORIGINAL_MANAGER)
            assert fight.fields == ("." + IMAGE_PATH,), fight
            es = admin.get(EXTERNAL_SERVICE, name)
            assert es is not None
            conflict = next(cd for cd in es["status"]["conditions"] if cd["type"] == "Conflict")
            assert conflict["status"] == "True"
            assert conflict["reason"] == "FieldManagerConflict"
            assert '"manager"' in conflict["message"] and IMAGE_PATH in conflict["message"]
            # Later sweeps leave the object alone: no write of ours, no roll.
            generation = (admin.get(DEPLOYMENT, name, GATEWAY_NS) or {})["metadata"]["generation"]
            ours_at = _our_write_time(admin, name)
            # A sweep reports it too (a dry run here: other tests' gateways share the cluster).
            report = Reconciler(as_reconciler.with_dry_run(True), settings).sweep()
            assert [f.to_dict() for f in report.fights if f.name == name] == [fight.to_dict()]
            assert report.to_dict()["fights"], report.to_dict()
            third = reconciler.reconcile(name)
            assert third.outcome == Outcome.CONTESTED
            assert (admin.get(DEPLOYMENT, name, GATEWAY_NS) or {})["metadata"][
                "generation"
            ] == generation
            assert _our_write_time(admin, name) == ours_at
            writes = fighter.writes
        assert writes >= 2, "the fighter wrote at least twice"
        # The writer is stopped: the operator takes the field back on purpose.
        rc, out, _ = run_cli(
            capsys, "reconcile", name, "--force-conflicts",
            "--kubeconfig", dev_stack.identity_kubeconfig("egress-reconciler"),
        )  # fmt: skip
        assert rc == 0, out
        assert _image(admin, name) == settings.envoy_image
        done = reconciler.reconcile(name)
        assert done.outcome == Outcome.IN_SYNC and not done.fights
        es = admin.get(EXTERNAL_SERVICE, name)
        assert es is not None
        assert "Conflict" not in {cd["type"] for cd in es["status"]["conditions"]}
    finally:
        purge(admin, name)


# -- the way back ---------------------------------------------------------------------------------


def test_uninstall_releases_our_finalizers_so_deletions_complete_without_us(
    admin: Kube,
    as_reconciler: Kube,
    dev_stack: DevStack,
    capsys: pytest.CaptureFixture[str],
) -> None:
    suffix = uuid.uuid4().hex[:6]
    gone, kept = f"rb-gone-{suffix}", f"rb-kept-{suffix}"
    exporter = f"rb-exporter-{suffix}"
    reconciler = Reconciler(as_reconciler, dev_settings(delete_grace_s=60))
    try:
        for name in (gone, kept):
            create_es(admin, external_service(name))
            reconciler.reconcile(name)
            es = admin.get(EXTERNAL_SERVICE, name)
            assert es is not None and c.FINALIZER in es["metadata"]["finalizers"]
        # Deleted once, seen by our reconciler (DNS withdrawn, grace period recorded); then our
        # control loop stops. Without us, nothing would ever release it.
        admin.delete(EXTERNAL_SERVICE, gone)
        assert reconciler.reconcile(gone).outcome == Outcome.DELETING
        time.sleep(2)
        stuck = admin.get(EXTERNAL_SERVICE, gone)
        assert stuck is not None and stuck["metadata"].get("deletionTimestamp")
        assert c.ANNOTATION_DELETE_AFTER in stuck["metadata"]["annotations"]

        # While our exporter runs, our functions would add the finalizer back: refused. (Its
        # pods never start: the namespace's Pod Security refuses them; replicas: 1 is enough.)
        admin.request(
            "POST",
            DEPLOYMENT.path(GATEWAY_NS),
            body={
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": exporter},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": exporter}},
                    "template": {
                        "metadata": {"labels": {"app": exporter}},
                        "spec": {"containers": [{"name": "x", "image": "none.invalid/x"}]},
                    },
                },
            },
        )
        rc, out, _ = run_cli(capsys, "uninstall", "--exporter", exporter)
        assert rc == 2 and f"our exporter runs (Deployment {exporter}" in out, out
        rc, _, err = run_cli(capsys, "uninstall", "--apply", "--exporter", exporter)
        assert rc == 2 and "refused: our exporter runs" in err, err
        still = admin.get(EXTERNAL_SERVICE, gone)
        assert still is not None and c.FINALIZER in still["metadata"]["finalizers"]
        admin.delete(DEPLOYMENT, exporter, GATEWAY_NS)

        admin.merge_patch(
            EXTERNAL_SERVICE, kept, {"metadata": {"annotations": {c.ANNOTATION_TAKEN_BACK: "{}"}}}
        )
        rc, out, _ = run_cli(capsys, "uninstall", "--json")
        assert rc == 0, out
        plan = json.loads(out)
        releases = {r["name"]: r for r in plan["releases"]}
        assert releases[gone]["deleting"] is True and releases[gone]["finalizer"] is True
        assert releases[kept]["annotations"] == [c.ANNOTATION_TAKEN_BACK]
        assert admin.get(EXTERNAL_SERVICE, gone) is not None, "a plan writes nothing"

        rc, out, err = run_cli(capsys, "uninstall", "--apply", "--json")
        assert rc == 0, err
        done = json.loads(out)
        assert {gone, kept} <= set(done["released"])
        assert gone in done["deletedOnRelease"]
        assert admin.get(EXTERNAL_SERVICE, gone) is None
        eventually(lambda: not children(admin, gone), 60, "the garbage collector")
        live = admin.get(EXTERNAL_SERVICE, kept)
        assert live is not None
        assert c.FINALIZER not in (live["metadata"].get("finalizers") or [])
        assert not set(live["metadata"].get("annotations") or {}) & {
            c.ANNOTATION_DELETE_AFTER, c.ANNOTATION_TAKEN_BACK
        }  # fmt: skip

        # The original takes the gateway back (its first reconcile patches every object it
        # builds; nothing of ours answers), and a deletion completes at once.
        patch_as_original(
            admin,
            "Deployment",
            kept,
            {"spec": {"template": {"spec": {"containers": [
                {"name": "gateway", "image": "envoyproxy/envoy-alpine:v1.16.5"}]}}}},
        )  # fmt: skip
        dep = admin.get(DEPLOYMENT, kept, GATEWAY_NS)
        assert dep is not None
        assert ORIGINAL_MANAGER in {e["manager"] for e in dep["metadata"]["managedFields"]}
        admin.delete(EXTERNAL_SERVICE, kept)
        eventually(lambda: admin.get(EXTERNAL_SERVICE, kept) is None, 10, "the deletion")
        eventually(lambda: not children(admin, kept), 60, "the garbage collector")
        # Running `uninstall` again finds nothing of ours on these objects.
        rc, out, _ = run_cli(capsys, "uninstall", "--json")
        names = {r["name"] for r in json.loads(out)["releases"]}
        assert not names & {gone, kept}
    finally:
        admin.delete(DEPLOYMENT, exporter, GATEWAY_NS)
        for name in (gone, kept):
            purge(admin, name)
