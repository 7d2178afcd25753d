"""The stateless reconciler against the real local control plane, run as its own RBAC identity."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core import constants as c
from core.errors import PermanentError, RetryPolicy
from core.kube import (
    CONFIGMAP,
    DEPLOYMENT,
    EXTERNAL_SERVICE,
    GATEWAY_KINDS,
    NETWORK_POLICY,
    PDB,
    SERVICE,
    Kube,
    Resource,
    api_client_from_kubeconfig,
)
from reconcile.controller import Reconciler
from reconcile.results import Outcome
from tests.conftest import DevStack
from tests.integration.faultproxy import Fault, FaultProxy
from tests.integration.helpers import (
    GATEWAY_NS,
    POD,
    children,
    create_es,
    dev_settings,
    eventually,
    external_service,
    gateway_pods,
    no_room_for_new_pods,
    purge,
    set_pods_ready,
    update_spec,
)

pytestmark = pytest.mark.cluster

KINDS = {"ConfigMap", "NetworkPolicy", "Service", "Deployment", "HorizontalPodAutoscaler"}


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reconciler(as_reconciler: Kube, clock: Clock) -> Reconciler:
    return Reconciler(as_reconciler, dev_settings(delete_grace_s=60), clock=clock)


@pytest.fixture
def es_name(admin: Kube, unique: str) -> Iterator[str]:
    name = f"gw-{unique}"
    yield name
    purge(admin, name)


def test_create_builds_every_object_owned_and_labelled(
    admin: Kube, reconciler: Reconciler, es_name: str
) -> None:
    created = create_es(admin, external_service(es_name, hijackDns=True))
    result = reconciler.reconcile(es_name)
    assert result.outcome == Outcome.CONVERGED
    assert {ch.kind for ch in result.changes if ch.action == "create"} == KINDS
    live = children(admin, es_name)
    assert set(live) == KINDS
    for obj in live.values():
        meta = obj["metadata"]
        assert meta["labels"][c.LABEL_GATEWAY] == es_name
        assert meta["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        assert meta["ownerReferences"][0]["controller"] is True
    assert live["Service"]["spec"]["clusterIP"]
    assert live["Service"]["metadata"]["labels"][c.LABEL_HIJACK_DNS] == "waiting-for-pods"
    assert "replicas" not in _applied_by_us(live["Deployment"], "spec")
    es = admin.get(EXTERNAL_SERVICE, es_name)
    assert es is not None
    assert c.FINALIZER in es["metadata"]["finalizers"]
    status = es["status"]
    assert status["observedGeneration"] == es["metadata"]["generation"]
    assert status["clusterIP"] == live["Service"]["spec"]["clusterIP"]
    assert status["hijackState"] == "waiting-for-pods"
    conditions = {cd["type"]: cd for cd in status["conditions"]}
    assert conditions["Valid"]["status"] == "True"
    assert conditions["Ready"]["status"] == "False"
    assert conditions["DnsHijacked"]["reason"] == "WaitingForPods"


def _versions(admin: Kube, name: str) -> dict[str, Any]:
    """resourceVersions of the objects no controller writes, and our apply entries of all.

    The Deployment and HPA controllers update their objects' status, so only our own field
    manager's entry (its time and fields) says whether we wrote them.
    """
    out: dict[str, Any] = {}
    for kind, obj in children(admin, name).items():
        ours = [
            (e["time"], e["fieldsV1"])
            for e in obj["metadata"]["managedFields"]
            if e["manager"] == c.FIELD_MANAGER
        ]
        out[kind] = ours
        if kind in ("ConfigMap", "Service", "NetworkPolicy"):
            out[kind + "/rv"] = obj["metadata"]["resourceVersion"]
    return out


def _applied_by_us(obj: dict[str, Any], top: str) -> dict[str, Any]:
    for entry in obj["metadata"].get("managedFields") or []:
        if entry["manager"] == c.FIELD_MANAGER and entry["operation"] == "Apply":
            fields: dict[str, Any] = entry["fieldsV1"].get(f"f:{top}", {})
            return {k.removeprefix("f:"): v for k, v in fields.items()}
    raise AssertionError("no apply entry of ours")


def test_second_reconcile_writes_nothing(
    admin: Kube, as_reconciler: Kube, reconciler: Reconciler, es_name: str
) -> None:
    create_es(
        admin, external_service(es_name, ports=[{"port": 443}, {"port": 53, "protocol": "UDP"}])
    )
    reconciler.reconcile(es_name)
    before = _versions(admin, es_name)
    es_before = admin.get(EXTERNAL_SERVICE, es_name)
    writes = as_reconciler.counters.writes
    result = reconciler.reconcile(es_name)
    assert result.outcome == Outcome.IN_SYNC and not result.changes
    assert as_reconciler.counters.writes == writes, (
        "a no-op reconcile must not send a mutating request"
    )
    assert _versions(admin, es_name) == before
    es_after = admin.get(EXTERNAL_SERVICE, es_name)
    assert es_before is not None and es_after is not None
    assert es_after["metadata"]["resourceVersion"] == es_before["metadata"]["resourceVersion"]


def test_update_adds_and_removes_ports(admin: Kube, reconciler: Reconciler, es_name: str) -> None:
    create_es(admin, external_service(es_name))
    reconciler.reconcile(es_name)
    old_hash = children(admin, es_name)["Deployment"]["spec"]["template"]["metadata"][
        "annotations"
    ][c.ANNOTATION_CONFIG_HASH]
    update_spec(admin, es_name, {"ports": [{"port": 443}, {"port": 8443}]})
    result = reconciler.reconcile(es_name)
    assert result.outcome == Outcome.CONVERGED
    live = children(admin, es_name)
    assert [p["port"] for p in live["Service"]["spec"]["ports"]] == [443, 8443]
    assert [p["port"] for p in live["NetworkPolicy"]["spec"]["ingress"][0]["ports"]] == [443, 8443]
    assert f"{es_name}_TCP_8443" in live["ConfigMap"]["data"]["envoy.yaml"]
    new_hash = live["Deployment"]["spec"]["template"]["metadata"]["annotations"][
        c.ANNOTATION_CONFIG_HASH
    ]
    assert new_hash != old_hash
    update_spec(admin, es_name, {"ports": [{"port": 8443}]})
    reconciler.reconcile(es_name)
    live = children(admin, es_name)
    assert [p["port"] for p in live["Service"]["spec"]["ports"]] == [8443]
    assert [
        p["containerPort"]
        for p in live["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    ] == [8443]
    assert f"{es_name}_TCP_443" not in live["ConfigMap"]["data"]["envoy.yaml"]
    es = admin.get(EXTERNAL_SERVICE, es_name)
    assert es is not None and es["status"]["observedGeneration"] == es["metadata"]["generation"]


def test_sweep_repairs_hand_made_drift_and_reports_it(
    admin: Kube, as_reconciler: Kube, reconciler: Reconciler, es_name: str
) -> None:
    create_es(admin, external_service(es_name))
    reconciler.reconcile(es_name)
    admin.merge_patch(
        DEPLOYMENT,
        es_name,
        {
            "spec": {
                "template": {
                    "spec": {"containers": [{"name": "gateway", "image": "evil/envoy:latest"}]}
                }
            }
        },
        GATEWAY_NS,
    )
    admin.merge_patch(CONFIGMAP, es_name, {"data": {"envoy.yaml": "tampered: true\n"}}, GATEWAY_NS)
    admin.delete(NETWORK_POLICY, es_name, GATEWAY_NS)
    report = reconciler.sweep()
    mine = next(r for r in report.results if r.name == es_name)
    drift = {(ch.kind, ch.action): ch for ch in mine.changes}
    assert ("NetworkPolicy", "create") in drift
    fields = {f.path: f for f in drift[("Deployment", "update")].fields}
    assert fields["spec.template.spec.containers[0].image"].live == "evil/envoy:latest"
    assert "data.envoy.yaml" in {f.path for f in drift[("ConfigMap", "update")].fields}
    live = children(admin, es_name)
    assert (
        live["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
        == dev_settings().envoy_image
    )
    assert "tampered" not in live["ConfigMap"]["data"]["envoy.yaml"]
    assert "NetworkPolicy" in live
    writes = as_reconciler.counters.writes
    again = reconciler.sweep()
    assert not [r for r in again.results if r.name == es_name and r.changes]
    assert as_reconciler.counters.writes == writes, "an in-sync sweep writes nothing"


def test_delete_withdraws_dns_first_then_removes_the_gateway_after_grace(
    admin: Kube, reconciler: Reconciler, clock: Clock, es_name: str
) -> None:
    create_es(admin, external_service(es_name, hijackDns=True))
    reconciler.reconcile(es_name)
    set_pods_ready(admin, es_name, True)
    assert reconciler.reconcile(es_name).hijack_state == "true"
    admin.delete(EXTERNAL_SERVICE, es_name)
    first = reconciler.reconcile(es_name)
    assert first.outcome == Outcome.DELETING
    assert first.requeue_after_s == pytest.approx(60, abs=2)
    live = children(admin, es_name)
    assert set(live) == KINDS, "the gateway keeps serving during the grace period"
    assert live["Service"]["metadata"]["labels"][c.LABEL_HIJACK_DNS] == "false"
    es = admin.get(EXTERNAL_SERVICE, es_name)
    assert es is not None and c.ANNOTATION_DELETE_AFTER in es["metadata"]["annotations"]
    clock.now += dt.timedelta(seconds=30)
    assert reconciler.reconcile(es_name).outcome == Outcome.DELETING
    assert set(children(admin, es_name)) == KINDS
    clock.now += dt.timedelta(seconds=31)
    done = reconciler.reconcile(es_name)
    assert done.outcome == Outcome.DELETED
    eventually(
        lambda: admin.get(EXTERNAL_SERVICE, es_name) is None, 10, "the ExternalService to go"
    )
    eventually(lambda: not children(admin, es_name), 30, "the gateway objects to go")


def test_garbage_collector_removes_children_of_a_deleted_owner(
    admin: Kube, reconciler: Reconciler, es_name: str
) -> None:
    create_es(admin, external_service(es_name))
    reconciler.reconcile(es_name)
    admin.merge_patch(EXTERNAL_SERVICE, es_name, {"metadata": {"finalizers": None}})
    admin.delete(EXTERNAL_SERVICE, es_name)
    eventually(lambda: not children(admin, es_name), 60, "garbage collection of the gateway")


def test_sweep_prunes_orphans_and_switched_off_kinds_but_never_foreign_objects(
    admin: Kube, as_reconciler: Kube, clock: Clock, es_name: str, unique: str
) -> None:
    with_pdb = Reconciler(as_reconciler, dev_settings(enable_pdb=True), clock=clock)
    create_es(admin, external_service(es_name))
    with_pdb.reconcile(es_name)
    assert "PodDisruptionBudget" in children(admin, es_name)
    orphan = f"orphan-{unique}"
    foreign = f"foreign-{unique}"
    labels = {c.LABEL_APP: c.APP_VALUE, c.LABEL_GATEWAY: orphan}
    admin.request(
        "POST",
        CONFIGMAP.path(GATEWAY_NS),
        body={
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": orphan, "labels": labels},
        },
    )
    admin.request(
        "POST",
        CONFIGMAP.path(GATEWAY_NS),
        body={
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": foreign, "labels": {"app": "other"}},
        },
    )
    try:
        report = Reconciler(as_reconciler, dev_settings(), clock=clock).sweep()
        pruned = {(ch.kind, ch.name) for ch in report.pruned}
        assert ("ConfigMap", orphan) in pruned
        mine = next(r for r in report.results if r.name == es_name)
        assert ("delete", "PodDisruptionBudget") in {(ch.action, ch.kind) for ch in mine.changes}
        assert admin.get(CONFIGMAP, orphan, GATEWAY_NS) is None
        assert admin.get(PDB, es_name, GATEWAY_NS) is None
        assert admin.get(CONFIGMAP, foreign, GATEWAY_NS) is not None
        assert ("ConfigMap", foreign) not in pruned
    finally:
        admin.delete(CONFIGMAP, foreign, GATEWAY_NS)
        admin.delete(CONFIGMAP, orphan, GATEWAY_NS)


class ListThenCreate(Kube):
    """The reconciler's own client; right after the sweep's LIST of ExternalServices returns,
    another process creates a gateway (a real ExternalService, reconciled for real)."""

    def __init__(self, base: Kube, meanwhile: Callable[[], None]) -> None:
        super().__init__(base.api, retry=base.retry)
        self.meanwhile: Callable[[], None] | None = meanwhile

    def list_all(
        self,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], str]:
        out = super().list_all(resource, namespace, label_selector, **kwargs)
        if resource is EXTERNAL_SERVICE and self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        return out


def test_sweep_never_prunes_a_gateway_created_after_it_listed(
    admin: Kube, as_reconciler: Kube, clock: Clock, es_name: str
) -> None:
    """A gateway whose ExternalService appeared between the sweep's LISTs looks like an orphan;
    it must survive (pruning it would give it a new ClusterIP)."""
    other = Reconciler(as_reconciler, dev_settings(), clock=clock)

    def create_meanwhile() -> None:
        create_es(admin, external_service(es_name))
        other.reconcile(es_name)

    sweeper = Reconciler(
        ListThenCreate(as_reconciler, create_meanwhile), dev_settings(), clock=clock
    )
    report = sweeper.sweep()
    assert not [ch for ch in report.pruned if ch.name == es_name], report.to_dict()
    live = children(admin, es_name)
    assert set(live) == KINDS, sorted(live)
    service_uid = live["Service"]["metadata"]["uid"]
    # The next sweep sees the ExternalService and leaves the same Service in place.
    Reconciler(as_reconciler, dev_settings(), clock=clock).sweep()
    again = admin.get(SERVICE, es_name, GATEWAY_NS)
    assert again is not None and again["metadata"]["uid"] == service_uid


def test_a_refused_object_shows_on_the_external_service(
    admin: Kube, reconciler: Reconciler, es_name: str
) -> None:
    """An admission policy refuses the gateway's NetworkPolicy: the reconcile fails for good,
    and the ExternalService's Ready condition names the kind and the refusal."""
    policy = f"deny-{es_name}"
    vap: dict[str, Any] = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["networking.k8s.io"],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["networkpolicies"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": f"object.metadata.name != '{es_name}'",
                    "message": "network policies of this gateway are not allowed here",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy},
        "spec": {"policyName": policy, "validationActions": ["Deny"]},
    }
    vaps = Resource("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy",
                    "validatingadmissionpolicies", namespaced=False)  # fmt: skip
    bindings = Resource("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding",
                        "validatingadmissionpolicybindings", namespaced=False)  # fmt: skip
    admin.request("POST", vaps.path(), body=vap)
    admin.request("POST", bindings.path(), body=binding)
    probe = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": es_name, "namespace": GATEWAY_NS},
        "spec": {"podSelector": {}},
    }

    def active() -> bool:
        try:
            admin.request(
                "POST",
                NETWORK_POLICY.path(GATEWAY_NS),
                query=[("dryRun", "All")],
                body=probe,
                final_statuses=frozenset({422}),
            )
        except PermanentError:
            return True
        return False

    try:
        eventually(active, 30, "the admission policy to be in force")
        create_es(admin, external_service(es_name))
        with pytest.raises(PermanentError):
            reconciler.reconcile(es_name)
        es = admin.get(EXTERNAL_SERVICE, es_name)
        assert es is not None
        ready = next(cd for cd in es["status"]["conditions"] if cd["type"] == "Ready")
        assert ready["status"] == "False"
        assert ready["reason"] == "NetworkPolicyInvalid", ready
        assert "not allowed here" in ready["message"]
    finally:
        admin.delete(bindings, policy)
        admin.delete(vaps, policy)


def test_foreign_object_with_a_gateway_name_is_not_taken_over(
    admin: Kube, reconciler: Reconciler, es_name: str
) -> None:
    admin.request(
        "POST",
        CONFIGMAP.path(GATEWAY_NS),
        body={
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": es_name},
            "data": {"mine": "yes"},
        },
    )
    create_es(admin, external_service(es_name))
    result = reconciler.reconcile(es_name)
    assert result.outcome == Outcome.CONFLICT
    foreign = admin.get(CONFIGMAP, es_name, GATEWAY_NS)
    assert foreign is not None and foreign["data"] == {"mine": "yes"}
    assert admin.get(SERVICE, es_name, GATEWAY_NS) is None
    es = admin.get(EXTERNAL_SERVICE, es_name)
    assert es is not None
    ready = next(cd for cd in es["status"]["conditions"] if cd["type"] == "Ready")
    assert ready["reason"] == "NameConflict" and "ConfigMap" in ready["message"]


def test_invalid_update_keeps_the_last_good_gateway(
    admin: Kube, reconciler: Reconciler, es_name: str
) -> None:
    create_es(admin, external_service(es_name))
    reconciler.reconcile(es_name)
    before = _versions(admin, es_name)
    # Accepted by the CRD (it cannot compare quantities), refused by the reconciler.
    update_spec(admin, es_name, {"resources": {"requests": {"cpu": "3"}, "limits": {"cpu": "2"}}})
    result = reconciler.reconcile(es_name)
    assert result.outcome == Outcome.INVALID
    assert "spec.resources.requests.cpu" in result.message
    assert _versions(admin, es_name) == before, "a previously working gateway is left untouched"
    es = admin.get(EXTERNAL_SERVICE, es_name)
    assert es is not None
    valid = next(cd for cd in es["status"]["conditions"] if cd["type"] == "Valid")
    assert valid["status"] == "False" and "greater than limit" in valid["message"]
    assert es["status"]["clusterIP"], "the last good gateway's address is still reported"


def test_invalid_new_object_creates_nothing(
    admin: Kube, reconciler: Reconciler, es_name: str
) -> None:
    create_es(
        admin,
        external_service(
            es_name, resources={"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}
        ),
    )
    assert reconciler.reconcile(es_name).outcome == Outcome.INVALID
    assert children(admin, es_name) == {}


def test_every_hijack_transition_follows_live_readiness(
    admin: Kube, reconciler: Reconciler, es_name: str
) -> None:
    def label() -> str:
        service = admin.get(SERVICE, es_name, GATEWAY_NS)
        assert service is not None
        return str(service["metadata"]["labels"][c.LABEL_HIJACK_DNS])

    # Real pods turn Ready by themselves: keep the gateway's pod Pending at first (node
    # cordoned) so that the waiting state is observed rather than raced.
    with no_room_for_new_pods():
        create_es(admin, external_service(es_name, hijackDns=False))
        reconciler.reconcile(es_name)
        assert label() == "false"
        update_spec(admin, es_name, {"hijackDns": True})
        reconciler.reconcile(es_name)
        assert label() == "waiting-for-pods"  # false -> waiting (not ready)
        reconciler.reconcile(es_name)
        assert label() == "waiting-for-pods"  # waiting stays waiting while not ready
    set_pods_ready(admin, es_name, True)
    reconciler.reconcile(es_name)
    assert label() == "true"  # waiting -> true once ready
    # A blip: the gateway's only pod goes away (as in a node drain) and its replacement
    # stays Pending, so no pod is ready for a while.
    with no_room_for_new_pods():
        for pod in gateway_pods(admin, es_name):
            admin.delete(POD, pod["metadata"]["name"], GATEWAY_NS)

        def none_ready() -> bool:
            dep = admin.get(DEPLOYMENT, es_name, GATEWAY_NS) or {}
            return not (dep.get("status") or {}).get("readyReplicas")

        eventually(none_ready, 60, "no ready gateway pod")
        reconciler.reconcile(es_name)
        assert label() == "true"  # a readiness blip does not flap DNS
        update_spec(admin, es_name, {"hijackDns": False})
        reconciler.reconcile(es_name)
        assert label() == "false"  # true -> false when switched off
        update_spec(admin, es_name, {"hijackDns": True})
        reconciler.reconcile(es_name)
        assert label() == "waiting-for-pods"  # false -> waiting while still unready
    set_pods_ready(admin, es_name, True)
    reconciler.reconcile(es_name)
    assert label() == "true"
    es = admin.get(EXTERNAL_SERVICE, es_name)
    assert es is not None
    assert es["status"]["readyReplicas"] >= 1
    assert {cd["type"]: cd["status"] for cd in es["status"]["conditions"]} == {
        "Valid": "True",
        "Ready": "True",
        "DnsHijacked": "True",
    }


def test_concurrent_reconciles_of_one_object_both_succeed(
    admin: Kube, dev_stack: DevStack, es_name: str
) -> None:
    """Four separate processes (as four function instances would be) reconcile one object at once."""
    with no_room_for_new_pods():  # no pod turns ready (a real change) before the final check
        _concurrent_reconciles(admin, dev_stack, es_name)


def _concurrent_reconciles(admin: Kube, dev_stack: DevStack, es_name: str) -> None:
    import subprocess
    import sys

    create_es(admin, external_service(es_name, ports=[{"port": 443}, {"port": 80}], hijackDns=True))
    env = {**os.environ, "KUBECONFIG": dev_stack.identity_kubeconfig("egress-reconciler")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "egressctl", "reconcile", es_name, "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert json.loads(out)[0]["outcome"] in (Outcome.CONVERGED, Outcome.IN_SYNC)
    final = Reconciler(
        Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler"))),
        dev_settings(),
    )
    assert final.reconcile(es_name).outcome == Outcome.IN_SYNC
    live = children(admin, es_name)
    assert set(live) == KINDS
    assert [p["port"] for p in live["Service"]["spec"]["ports"]] == [443, 80]
    es = admin.get(EXTERNAL_SERVICE, es_name)
    assert es is not None and es["metadata"]["finalizers"].count(c.FINALIZER) == 1


def test_reconciler_identity_is_least_privilege(as_reconciler: Kube) -> None:
    """Everything above ran as this identity; here it is refused what it does not need."""
    probe = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "probe", "namespace": "default"},
    }
    with pytest.raises(PermanentError, match="403"):
        as_reconciler.apply(probe)
    with pytest.raises(PermanentError, match="403"):
        as_reconciler.list_all(Resource("v1", "Secret", "secrets"), GATEWAY_NS)
    with pytest.raises(PermanentError, match="403"):
        as_reconciler.request("POST", EXTERNAL_SERVICE.path(), body=external_service("nope"))


@pytest.fixture
def proxy(dev_stack: DevStack) -> Iterator[FaultProxy]:
    p = FaultProxy.from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler"))
    p.start()
    yield p
    p.stop()


def _kube_via(proxy: FaultProxy, slept: list[float] | None = None, page_size: int = 500) -> Kube:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = proxy.url
    record = slept if slept is not None else []
    return Kube(
        client.ApiClient(configuration),
        retry=RetryPolicy(attempts=5, base_delay_s=0.05),
        sleep=record.append,
        page_size=page_size,
    )


FAULTS: list[Callable[[str], list[Fault]]] = [
    lambda n: [Fault("PATCH", f"/deployments/{n}", 409, times=2)],
    lambda n: [Fault("PATCH", f"/services/{n}", 429, times=2, retry_after="1")],
    lambda n: [Fault("GET", f"/externalservices/{n}", 500, times=3)],
    lambda n: [
        Fault("PATCH", f"/configmaps/{n}", None, times=2),
        Fault("GET", "/deployments/", None, times=1),
    ],
]


@pytest.mark.parametrize(
    "faults", FAULTS, ids=["409-apply", "429-retry-after", "500-read", "dropped-connections"]
)
def test_converges_through_injected_faults(
    admin: Kube, proxy: FaultProxy, es_name: str, faults: Callable[[str], list[Fault]]
) -> None:
    create_es(admin, external_service(es_name))
    for fault in faults(es_name):
        proxy.inject(fault)
    slept: list[float] = []
    result = Reconciler(_kube_via(proxy, slept), dev_settings()).reconcile(es_name)
    assert proxy.injected, "the faults must actually have been hit"
    assert result.outcome == Outcome.CONVERGED
    assert set(children(admin, es_name)) == KINDS
    if any(f.retry_after for f in faults(es_name)):
        assert 1.0 in slept, "Retry-After must be honoured"


def test_persistent_failure_raises_transient_for_redelivery(
    admin: Kube, proxy: FaultProxy, es_name: str
) -> None:
    from core.errors import TransientError

    create_es(admin, external_service(es_name))
    proxy.inject(Fault("GET", f"/externalservices/{es_name}", 503, times=100))
    with pytest.raises(TransientError):
        Reconciler(_kube_via(proxy), dev_settings()).reconcile(es_name)


def test_list_restarts_when_a_continue_token_expires(
    admin: Kube, proxy: FaultProxy, unique: str
) -> None:
    names = [f"page{i}-{unique}" for i in range(5)]
    try:
        for name in names:
            create_es(admin, external_service(name))
        proxy.inject(Fault("GET", "continue=", 410, times=1))
        kube = _kube_via(proxy, page_size=2)
        items, _ = kube.list_all(EXTERNAL_SERVICE)
        assert [m for m, p, s in proxy.injected if s == 410], "the expired token must have been hit"
        listed = {i["metadata"]["name"] for i in items}
        assert set(names) <= listed
        assert len(items) == len(listed), "a restarted list must not return duplicates"
    finally:
        for name in names:
            purge(admin, name)


def test_a_sweep_reads_nothing_per_object(admin: Kube, proxy: FaultProxy, unique: str) -> None:
    """New ExternalServices cost a sweep their writes and one LIST per kind, never a GET each:
    every request counted as it reached the proxy in front of the API server. A foreign object
    holding one of the names is still found (in the LIST of its kind) and left alone."""
    names = [f"cold{i}-{unique}" for i in range(4)]
    foreign = names[0]
    try:
        for name in names:
            create_es(admin, external_service(name))
        admin.request(
            "POST",
            CONFIGMAP.path(GATEWAY_NS),
            body={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": foreign},
                  "data": {"mine": "yes"}},
        )  # fmt: skip
        report = Reconciler(_kube_via(proxy), dev_settings()).sweep()
        outcomes = {r.name: r.outcome for r in report.results if r.name in names}
        assert outcomes == {
            foreign: Outcome.CONFLICT,
            **{name: Outcome.CONVERGED for name in names[1:]},
        }, report.to_dict()
        live = admin.get(CONFIGMAP, foreign, GATEWAY_NS)
        assert live is not None and live["data"] == {"mine": "yes"}
        for name in names[1:]:
            assert set(children(admin, name)) == KINDS

        def requests_for(name: str) -> list[tuple[str, str]]:
            return [(m, p) for m, p in proxy.seen if p.split("?")[0].endswith(f"/{name}")
                    or f"/{name}/" in p]  # fmt: skip

        assert not [r for name in names for r in requests_for(name) if r[0] == "GET"]
        # Each new one: its finalizer, its five objects, its status; all writes.
        for name in names[1:]:
            assert Counter(m for m, _ in requests_for(name)) == {"PATCH": 7}, requests_for(name)
        assert Counter(m for m, _ in requests_for(foreign)) == {"PATCH": 1}  # its status
        lists = Counter(p.split("?")[0] for m, p in proxy.seen if m == "GET" and "limit=" in p)
        kinds = [EXTERNAL_SERVICE.path(), *(r.path(GATEWAY_NS) for r in GATEWAY_KINDS)]
        assert set(lists) == set(kinds) and set(lists.values()) == {1}, lists
    finally:
        admin.delete(CONFIGMAP, foreign, GATEWAY_NS)
        for name in names:
            purge(admin, name)


def test_command_line_plan_reconcile_status(dev_stack: DevStack, admin: Kube, es_name: str) -> None:
    import json
    import subprocess
    import sys

    def egressctl(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": dev_stack.identity_kubeconfig("egress-reconciler")}
        return subprocess.run(
            [sys.executable, "-m", "egressctl", *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )

    create_es(admin, external_service(es_name))
    plan = egressctl("plan", es_name)
    assert plan.returncode == 3, plan.stderr
    assert f"+ Deployment egress-operator-system/{es_name}" in plan.stdout
    assert children(admin, es_name) == {}, "plan writes nothing"
    done = egressctl("reconcile", es_name, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["outcome"] == "converged"
    assert egressctl("plan", es_name).returncode == 0
    status = egressctl("status")
    assert status.returncode == 0
    row = next(line for line in status.stdout.splitlines() if line.startswith(es_name + " "))
    assert f"{es_name}.example.com" in row and "443/TCP" in row and "Valid" in row
    assert egressctl("reconcile", "no-such-gateway").returncode == 2


def test_a_sweep_converges_the_rest_past_an_object_stored_before_the_crd_tightened(
    admin: Kube, as_reconciler: Kube, clock: Clock, unique: str
) -> None:
    """Objects stored under an older, looser CRD can hold anything (a NaN quantity, a string
    for a number). The CRD is loosened for a moment to store two such objects for real. The
    sweep marks the first Valid=False; the second the API server will not even let us annotate
    (a CEL rule fails on its type, and CEL errors are not ratcheted), so it is reported in the
    sweep's errors; the neighbour converges all the same."""
    import subprocess

    import yaml

    crd_path = Path(__file__).resolve().parents[2] / "infra" / "crd" / "externalservices.yaml"
    crd = yaml.safe_load(crd_path.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema.pop("x-kubernetes-validations", None)
    crds = Resource(
        "apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions",
        namespaced=False,
    )  # fmt: skip
    bad, worse, good = f"old-{unique}", f"older-{unique}", f"good-{unique}"
    corrupt = [
        external_service(bad, resources={"limits": {"cpu": "NaN"}}),
        external_service(worse, minReplicas="two"),
    ]

    def stored() -> bool:
        try:
            for obj in corrupt:
                if admin.get(EXTERNAL_SERVICE, obj["metadata"]["name"]) is None:
                    create_es(admin, obj)
        except PermanentError:
            return False  # the looser schema is not served yet
        return True

    try:
        admin.request(
            "PATCH",
            crds.path(None, crd["metadata"]["name"]),
            query=[("fieldManager", "egressctl-dev"), ("force", "true")],
            body=crd,
            content_type="application/apply-patch+yaml",
        )
        eventually(stored, 30, "the looser CRD to store the old object")
    finally:
        subprocess.run(
            ["kubectl", "apply", "--server-side", "--force-conflicts",
             "--field-manager=egressctl-dev", "-f", str(crd_path)],
            check=True, capture_output=True,
        )  # fmt: skip
    try:
        create_es(admin, external_service(good))
        report = Reconciler(as_reconciler, dev_settings(), clock=clock).sweep()
        outcomes = {r.name: r.outcome for r in report.results}
        assert outcomes[bad] == Outcome.INVALID and outcomes[good] == Outcome.CONVERGED, outcomes
        mine = [e for e in report.errors if e["name"].endswith(unique)]
        assert [e["name"] for e in mine] == [worse] and "422" in mine[0]["error"], mine
        assert set(children(admin, good)) == KINDS
        assert children(admin, bad) == {}
        live = admin.get(EXTERNAL_SERVICE, bad)
        assert live is not None
        valid = next(cd for cd in live["status"]["conditions"] if cd["type"] == "Valid")
        assert valid["status"] == "False"
        assert "spec.resources" in valid["message"], valid
    finally:
        for name in (bad, worse, good):
            purge(admin, name)
