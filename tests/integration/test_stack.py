"""The local control plane is real: controllers act, DNS answers from the API, the CRD
validates, Pub/Sub delivers, and RBAC confines our identities.

Why: later capabilities are tested against this stack instead of mocks; these tests prove
each part does what the same part does in a cluster, so a green run elsewhere means
something. DNS is queried with dnslib (the repo's own ``dns`` package shadows dnspython).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from egressctl.devstack.procs import wait_for
from egressctl.devstack.stack import dns_query
from tests.integration.helpers import DNS_PROPAGATION_S

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 60.0


def _eventually(what: str, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    if not wait_for(predicate, timeout, interval=0.2, max_interval=1.0):
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _resolve(addr: str, name: str) -> list[str]:
    try:
        rcode, answers = dns_query(addr, name)
    except OSError:
        return []
    return answers if rcode == "NOERROR" else []


# --------------------------------------------------------------------------- controllers


def _deployment(name: str) -> Any:
    from kubernetes import client

    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="c", image="egress-test/never-pulled:1")]
                ),
            ),
        ),
    )


def test_deployment_gets_a_replicaset_and_gc_removes_it(k8s: Any, namespace: str) -> None:
    from kubernetes import client

    apps = client.AppsV1Api(k8s)
    dep = apps.create_namespaced_deployment(namespace, _deployment("web"))

    def owned_replicasets() -> list[Any]:
        items = apps.list_namespaced_replica_set(namespace).items
        return [
            rs
            for rs in items
            if any(o.uid == dep.metadata.uid for o in rs.metadata.owner_references or [])
        ]

    _eventually(
        "the deployment controller to create a ReplicaSet", lambda: bool(owned_replicasets())
    )
    rs = owned_replicasets()[0]
    # The replicaset controller creates the pod (it stays Pending: no nodes, by design).
    _eventually(
        "the replicaset controller to create a pod",
        lambda: any(
            any(o.uid == rs.metadata.uid for o in p.metadata.owner_references or [])
            for p in client.CoreV1Api(k8s).list_namespaced_pod(namespace).items
        ),
    )
    apps.delete_namespaced_deployment(
        "web", namespace, body=client.V1DeleteOptions(propagation_policy="Background")
    )
    _eventually("the garbage collector to delete the ReplicaSet", lambda: not owned_replicasets())


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(k8s: Any, namespace: str) -> None:
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[ref])),
    )
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except client.ApiException as exc:
            return bool(exc.status == 404)
        return False

    _eventually("the garbage collector to delete the dependent", dependent_gone)


# --------------------------------------------------------------------------- DNS


def _service(k8s: Any, namespace: str, name: str) -> str:
    from kubernetes import client

    svc = client.CoreV1Api(k8s).create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1ServiceSpec(
                selector={"app": name}, ports=[client.V1ServicePort(port=443, target_port=443)]
            ),
        ),
    )
    ip = svc.spec.cluster_ip
    cidr = ipaddress.ip_network(os.environ["EGRESS_DEV_SERVICE_CIDR"])
    assert ip and ipaddress.ip_address(ip) in cidr, f"no ClusterIP from {cidr}: {ip!r}"
    return str(ip)


def test_service_gets_cluster_ip_and_cluster_dns_answers_it(
    k8s: Any, namespace: str, dev_stack: Any
) -> None:
    ip = _service(k8s, namespace, "api")
    fqdn = f"api.{namespace}.svc.cluster.local"
    _eventually(f"CoreDNS to answer {fqdn}", lambda: _resolve(dev_stack.coredns_addr, fqdn) == [ip])


def test_external_names_resolve_offline_through_the_upstream(dev_stack: Any) -> None:
    assert _resolve(dev_stack.coredns_addr, "api.example.com") == ["192.0.2.10"]
    assert _resolve(dev_stack.coredns_addr, "anything-at-all.example.test") == ["192.0.2.99"]
    rcode, _ = dns_query(dev_stack.coredns_addr, "not-served.example.org")
    assert rcode == "NXDOMAIN"


def _configmap_data(core: Any, name: str) -> dict[str, str] | None:
    from kubernetes import client

    try:
        return dict(core.read_namespaced_config_map(name, "kube-system").data or {})
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _nudge_coredns(k8s: Any) -> None:
    """What the reconciler does after its DNS writes (README, "How fast DNS changes"): touch
    the CoreDNS pods so their kubelet refreshes the mounted ConfigMaps now, not within its
    60 s sync."""
    from core.kube import Kube
    from core.settings import Settings
    from dns.delivery import DnsDelivery

    nudged, problem = DnsDelivery(Settings()).nudge(Kube(k8s), f"test-{time.monotonic_ns()}")
    assert nudged and not problem, problem


def test_corefile_configmap_change_reaches_coredns(
    k8s: Any, dev_stack: Any, unique: str, cleanup: Callable[[Callable[[], object]], None]
) -> None:
    """Edit kube-system/coredns like an operator would; CoreDNS reloads the projection."""
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    original = _configmap_data(core, "coredns")
    assert original is not None and "Corefile" in original, "kube-system/coredns has no Corefile"
    corefile = original["Corefile"]
    probe = f"probe-{unique}.corefile.test"
    marker = "    forward . "
    assert marker in corefile, "the Corefile has no forward line to insert before"
    changed = corefile.replace(
        marker,
        f"    hosts {{\n        203.0.113.77 {probe}\n        fallthrough\n    }}\n{marker}",
        1,
    )

    def restore() -> None:
        core.patch_namespaced_config_map("coredns", "kube-system", {"data": {"Corefile": corefile}})
        _nudge_coredns(k8s)
        _eventually(
            "CoreDNS to drop the probe again",
            lambda: not _resolve(dev_stack.coredns_addr, probe),
            DNS_PROPAGATION_S,
        )

    core.patch_namespaced_config_map("coredns", "kube-system", {"data": {"Corefile": changed}})
    _nudge_coredns(k8s)
    cleanup(restore)
    t0 = time.monotonic()
    _eventually(
        "the Corefile change to reach CoreDNS",
        lambda: _resolve(dev_stack.coredns_addr, probe) == ["203.0.113.77"],
        DNS_PROPAGATION_S,
    )
    print(f"Corefile change answered after {time.monotonic() - t0:.1f}s")


def test_imported_configmap_rewrite_reaches_coredns(
    k8s: Any,
    namespace: str,
    dev_stack: Any,
    unique: str,
    cleanup: Callable[[Callable[[], object]], None],
) -> None:
    """The reconciler's path: a key of kube-system/egress-gateway-dns imported by the Corefile
    rewrites an external name to a Service, and the answer keeps the asked name."""
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    ip = _service(k8s, namespace, "gw")
    external = f"ext-{unique}.example.com"
    key = f"test-{unique}.override"
    rule = f"rewrite stop name exact {external} gw.{namespace}.svc.cluster.local\n"
    if _configmap_data(core, "egress-gateway-dns") is None:
        try:
            core.create_namespaced_config_map(
                "kube-system",
                client.V1ConfigMap(metadata=client.V1ObjectMeta(name="egress-gateway-dns")),
            )
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    core.patch_namespaced_config_map("egress-gateway-dns", "kube-system", {"data": {key: rule}})
    _nudge_coredns(k8s)

    def remove_key() -> None:
        core.patch_namespaced_config_map("egress-gateway-dns", "kube-system", {"data": {key: None}})
        _nudge_coredns(k8s)

    cleanup(remove_key)
    _eventually(
        f"CoreDNS to rewrite {external} to the Service",
        lambda: _resolve(dev_stack.coredns_addr, external) == [ip],
        DNS_PROPAGATION_S,
    )
    from dnslib import DNSRecord

    host, port = dev_stack.coredns_addr.rsplit(":", 1)
    reply = DNSRecord.parse(DNSRecord.question(external).send(host, int(port), timeout=2))
    assert [str(rr.rname).rstrip(".") for rr in reply.rr] == [external]


# --------------------------------------------------------------------------- Pub/Sub


def test_pubsub_emulator_publish_and_pull(dev_stack: Any, unique: str) -> None:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(dev_stack.pubsub_project, f"t-{unique}")
    sub = subscriber.subscription_path(dev_stack.pubsub_project, f"s-{unique}")
    publisher.create_topic(name=topic)
    try:
        subscriber.create_subscription(name=sub, topic=topic)
        try:
            publisher.publish(topic, b"hello", ordering_key="").result(timeout=30)
            received: list[bytes] = []

            def pulled() -> bool:
                resp = subscriber.pull(subscription=sub, max_messages=10, timeout=10)
                if resp.received_messages:
                    subscriber.acknowledge(
                        subscription=sub, ack_ids=[m.ack_id for m in resp.received_messages]
                    )
                    received.extend(m.message.data for m in resp.received_messages)
                return bool(received)

            _eventually("the published message to be pulled", pulled, timeout=30)
            assert received == [b"hello"]
        finally:
            subscriber.delete_subscription(subscription=sub)
    finally:
        publisher.delete_topic(topic=topic)
        subscriber.close()


# --------------------------------------------------------------------------- CRD


def _load(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    text = path.read_text()
    expect = {}
    for line in text.splitlines():
        if line.startswith("# expect-"):
            k, _, v = line[len("# expect-") :].partition(":")
            expect[k.strip()] = v.strip()
    return yaml.safe_load(text), expect


INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))
VALID = sorted((REPO / "examples").glob("*.yaml"))


def _create(k8s: Any, body: dict[str, Any], dry_run: bool = True) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(k8s).create_cluster_custom_object(
        "egress.monzo.com",
        "v1",
        "externalservices",
        body,
        dry_run="All" if dry_run else None,
        field_validation="Strict",
    )


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_api_server_rejects_invalid_externalservice(k8s: Any, path: Path) -> None:
    from kubernetes import client

    body, expect = _load(path)
    with pytest.raises(client.ApiException) as info:
        _create(k8s, body)
    # 422 Invalid from schema/CEL validation; 400 from strict decoding of unknown fields.
    assert info.value.status in (400, 422), info.value.body
    message = str(info.value.body)
    if "message" in expect:
        assert expect["message"] in " ".join(message.split()), message
    field = expect.get("field", "")
    if field and field != "<root>":
        assert field in message, message


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_api_server_accepts_valid_examples(k8s: Any, path: Path) -> None:
    body, _ = _load(path)
    created = _create(k8s, body)
    assert created["metadata"]["name"] == body["metadata"]["name"]


def test_crd_schema_rejects_for_real_not_only_in_dry_run(k8s: Any, unique: str) -> None:
    from kubernetes import client

    body = {
        "apiVersion": "egress.monzo.com/v1",
        "kind": "ExternalService",
        "metadata": {"name": f"bad-{unique}"},
        "spec": {
            "dnsName": "example.com",
            "ports": [{"port": 443}],
            "minReplicas": 5,
            "maxReplicas": 2,
        },
    }
    with pytest.raises(client.ApiException) as info:
        _create(k8s, body, dry_run=False)
    assert info.value.status == 422
    assert "maxReplicas must be greater than or equal to minReplicas" in " ".join(
        str(info.value.body).split()
    )


# --------------------------------------------------------------------------- RBAC


def _can(api_client: Any, verb: str, resource: str, namespace: str = "", **kw: str) -> bool:
    from kubernetes import client

    review = client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, resource=resource, namespace=namespace or None, **kw
            )
        )
    )
    result = client.AuthorizationV1Api(api_client).create_self_subject_access_review(review)
    return bool(result.status.allowed)


GW = "egress-operator-system"


def test_reconciler_identity_has_exactly_its_rbac(dev_stack: Any) -> None:
    rec = dev_stack.api_client(dev_stack.identity_kubeconfig("egress-reconciler"))
    es = {"group": "egress.monzo.com"}
    allowed = [
        ("list", "externalservices", "", es),
        ("patch", "externalservices", "", {**es, "subresource": "status"}),
        ("update", "externalservices", "", {**es, "subresource": "finalizers"}),
        ("create", "deployments", GW, {"group": "apps"}),
        ("delete", "horizontalpodautoscalers", GW, {"group": "autoscaling"}),
        ("create", "networkpolicies", GW, {"group": "networking.k8s.io"}),
        ("create", "poddisruptionbudgets", GW, {"group": "policy"}),
        ("update", "configmaps", "kube-system", {"name": "egress-gateway-dns"}),
        ("update", "configmaps", "kube-system", {"name": "coredns"}),
        ("get", "configmaps", "kube-system", {"name": "coredns"}),
        ("create", "configmaps", "kube-system", {}),
    ]
    denied = [
        ("create", "externalservices", "", es),
        ("delete", "externalservices", "", es),
        ("create", "deployments", "default", {"group": "apps"}),
        ("patch", "configmaps", "kube-system", {"name": "kube-proxy"}),
        ("delete", "configmaps", "kube-system", {"name": "egress-gateway-dns"}),
        ("get", "secrets", GW, {}),
        ("list", "secrets", "kube-system", {}),
        ("create", "pods", GW, {}),
        # Nothing in the code watches, lists kube-system or writes with PUT in the gateway
        # namespace (tests/integration/test_infra.py derives the exact set).
        ("watch", "configmaps", "kube-system", {}),
        ("list", "configmaps", "kube-system", {}),
        ("get", "configmaps", "kube-system", {"name": "kube-proxy"}),
        ("update", "deployments", GW, {"group": "apps"}),
        ("watch", "externalservices", "", es),
        ("create", "events", GW, {}),
    ]
    for verb, res, ns, kw in allowed:
        assert _can(rec, verb, res, ns, **kw), (
            f"reconciler should be allowed {verb} {res} {ns} {kw}"
        )
    for verb, res, ns, kw in denied:
        assert not _can(rec, verb, res, ns, **kw), f"reconciler must not {verb} {res} {ns} {kw}"


def test_exporter_identity_is_read_only(dev_stack: Any) -> None:
    from kubernetes import client

    exp = dev_stack.api_client(dev_stack.identity_kubeconfig("egress-exporter"))
    assert _can(exp, "watch", "externalservices", group="egress.monzo.com")
    assert _can(exp, "list", "deployments", GW, group="apps")
    assert _can(exp, "watch", "deployments", GW, group="apps")
    assert not _can(exp, "get", "externalservices", group="egress.monzo.com")
    assert not _can(exp, "list", "deployments", "default", group="apps")
    assert not _can(exp, "patch", "externalservices", group="egress.monzo.com")
    assert not _can(exp, "get", "configmaps", GW)
    # And a real request is refused by the API server, not only by the review.
    with pytest.raises(client.ApiException) as info:
        client.CoreV1Api(exp).list_namespaced_config_map("kube-system")
    assert info.value.status == 403


# --------------------------------------------------------------------------- CLI


def test_dev_up_again_is_harmless_and_status_is_healthy(dev_stack: Any) -> None:
    cmd = [sys.executable, "-m", "egressctl", "dev"]
    up = subprocess.run([*cmd, "up"], cwd=REPO, capture_output=True, text=True, check=False)
    assert up.returncode == 0, up.stderr
    assert "already up" in up.stderr
    status = subprocess.run([*cmd, "status"], cwd=REPO, capture_output=True, text=True, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    parts = (
        "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "containerd",
        "kubelet", "kube-proxy", "kube-router", "dns-upstream", "upstream", "cluster-dns",
        "pubsub",
    )  # fmt: skip
    for part in parts:
        assert part in status.stdout
    env = (REPO / ".cache" / "dev" / "env").read_text()
    exported = (
        "KUBECONFIG", "PUBSUB_EMULATOR_HOST", "PUBSUB_PROJECT_ID", "COREDNS_ADDR", "ENVOY_IMAGE",
        "EGRESS_DEV_CLIENT_IMAGE", "EGRESS_DEV_UPSTREAM_NAME", "EGRESS_DEV_UPSTREAM_TCP_PORT",
        "EGRESS_DEV_UPSTREAM_UDP_PORT", "EGRESS_DEV_NODE",
    )  # fmt: skip
    for var in exported:
        assert f"export {var}=" in env
