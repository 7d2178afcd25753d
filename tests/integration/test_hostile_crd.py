"""Hostile tenants against the real API server: the CRD, the gateway namespace, the reconciler.

A tenant who may create ExternalServices and nothing else must not get past the CRD with any
object of ``tests/unit/hostile.py`` (the table the parser's tests use too), must not get a
gateway pod past the namespace's LimitRange and ResourceQuota (infra/namespace/limits.yaml),
and an object only the reconciler can judge (above the operator's ceilings) must end with
``Valid=False`` naming the field and the setting, while a gateway that worked keeps working
and its neighbours converge. Quantities are also checked against the API server's own parser,
so that the reconciler's grammar is Kubernetes' and not an imitation of it.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from core import constants as c
from core.kube import EXTERNAL_SERVICE, Kube
from core.spec import (
    DEFAULT_CEILING_CPU,
    DEFAULT_CEILING_MEMORY,
    DEFAULT_LIMITS,
    DEFAULT_REQUESTS,
    ENV_MAX_REPLICAS,
    Ceilings,
    InvalidExternalService,
    parse_external_service,
    quantity_value,
)
from reconcile.controller import Reconciler
from reconcile.results import Outcome
from tests.integration.helpers import (
    GATEWAY_NS,
    children,
    create_es,
    dev_settings,
    external_service,
    purge,
    update_spec,
)
from tests.unit.hostile import HOSTILE, Hostile

pytestmark = pytest.mark.cluster

SENT = [h for h in HOSTILE if not h.offline_only]


def _create(k8s: Any, body: dict[str, Any], dry_run: bool = True) -> dict[str, Any]:
    from kubernetes import client

    created: dict[str, Any] = client.CustomObjectsApi(k8s).create_cluster_custom_object(
        c.GROUP,
        c.VERSION,
        "externalservices",
        body,
        dry_run="All" if dry_run else None,
        field_validation="Strict",
    )
    return created


def _refusal(k8s: Any, body: dict[str, Any], dry_run: bool = True) -> str:
    """The API server's message for a refused create (fails the test if it accepts)."""
    from kubernetes import client

    with pytest.raises(client.ApiException) as info:
        _create(k8s, body, dry_run)
    assert info.value.status == 422, info.value.body
    return " ".join(str(info.value.body).split())


# --------------------------------------------------------------------------- the CRD


@pytest.mark.parametrize("case", SENT, ids=[h.id for h in SENT])
def test_api_server_refuses_hostile_object(k8s: Any, unique: str, case: Hostile) -> None:
    message = _refusal(k8s, case.manifest(f"hostile-{unique}"))
    assert case.crd_field in message, message
    assert case.crd_message in message, message


def test_hostile_object_is_refused_for_real_not_only_in_dry_run(k8s: Any, unique: str) -> None:
    from kubernetes import client

    name = f"hostile-{unique}"
    (case,) = [h for h in HOSTILE if h.id == "ip-metadata-v4"]
    assert "metadata server" in _refusal(k8s, case.manifest(name), dry_run=False)
    with pytest.raises(client.ApiException) as info:
        client.CustomObjectsApi(k8s).get_cluster_custom_object(
            c.GROUP, c.VERSION, "externalservices", name
        )
    assert info.value.status == 404


# Accepted by the CRD and the reconciler alike: the rules refuse only what they must.
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    (
        "private-and-global-addresses",
        {
            "ipOverride": [
                "10.0.0.1",
                "172.16.0.1",
                "192.168.1.1",
                "100.64.0.1",
                "203.0.113.10",
                "fd00::1",
                "2001:db8::1",
            ]
        },
    ),
    ("metadata-lookalike-name", {"dnsName": "metadata.example.com"}),
    ("localhost-lookalike-name", {"dnsName": "localhost.example.com"}),
    ("regional-lookalike-name", {"dnsName": "ip-10-0-0-1.eu-west-1.compute.internal"}),
    (
        "every-resource-kind",
        {
            "resources": {
                "requests": {
                    "cpu": "+.5",
                    "memory": "5.",
                    "ephemeral-storage": "1e3",
                    "hugepages-2Mi": "4Mi",
                    "example.com/dongle": "1",
                },
                "limits": {
                    "cpu": 8,
                    "memory": "16Gi",
                    "ephemeral-storage": "1E+4",
                    "hugepages-2Mi": "4Mi",
                    "example.com/dongle": 1,
                },
            }
        },
    ),
    ("extended-limit-only", {"resources": {"limits": {"example.com/dongle": 2}}}),
]


@pytest.mark.parametrize(
    ("spec", "_id"), [(s, i) for i, s in ACCEPTED], ids=[i for i, _ in ACCEPTED]
)
def test_what_both_accept(k8s: Any, unique: str, spec: dict[str, Any], _id: str) -> None:
    body = external_service(f"fine-{unique}", **spec)
    assert _create(k8s, body)["metadata"]["name"] == f"fine-{unique}"
    parse_external_service(body)


# The operator's ceilings are settings: the CRD cannot know them, so raising one never needs a
# CRD change; only the reconciler refuses these.
ABOVE_CEILINGS: list[tuple[str, dict[str, Any], str]] = [
    ("replicas-at-int32", {"minReplicas": 1, "maxReplicas": 2147483647}, "spec.maxReplicas"),
    ("cpu", {"resources": {"limits": {"cpu": "9"}}}, "spec.resources.limits.cpu"),
    ("memory", {"resources": {"requests": {"memory": "17Gi"}}}, "spec.resources.requests.memory"),
]


@pytest.mark.parametrize(
    ("spec", "field"), [(s, f) for _, s, f in ABOVE_CEILINGS], ids=[i for i, _, _ in ABOVE_CEILINGS]
)
def test_the_crd_leaves_the_ceilings_to_the_reconciler(
    k8s: Any, unique: str, spec: dict[str, Any], field: str
) -> None:
    body = external_service(f"big-{unique}", **spec)
    _create(k8s, body)
    with pytest.raises(InvalidExternalService) as info:
        parse_external_service(body)
    assert field in [e.path for e in info.value.errors]


# ---------------------------------------------------------------- the API server's quantities

# Quantities the API server decodes exactly as the reconciler does: accepted by both with the
# same value (a ResourceQuota's resource list holds it as a container's does: rounded up to 1m),
# or refused by both.
QUANTITIES = [
    "0",
    "1",
    "+1",
    "5.",
    ".5",
    "0.1n",
    "1.0001m",
    "1e-30",
    "1e99",
    "1E+2",
    "1.5Gi",
    "2Ei",
    "1E",
    "99999999999999999999",
    "0." + "0" * 40 + "1e45",
    "NaN",
    "Infinity",
    "inf",
    "1_0",
    "1e",
    "1e1.5",
    "1ki",
    "1K",
    "1Gb",
    "0x10",
    "1.e3",
    "\u0661",
]
# Accepted by the API server, refused by the reconciler (and the CRD): spaces are trimmed by
# the JSON decoder only, a number without digits reads as 0, and longer exponents stall the
# API server (1e999999999: minutes of CPU), so none must reach it inside a Deployment.
STRICTER = [" 1", "1 ", ".", "+", "-", "e3", "1e100", "1e0000000001"]


def _quota_value(k8s: Any, text: str) -> str | None:
    """The API server's canonical form of ``text`` as a resource-list quantity, or None if it
    cannot decode it (a dry-run ResourceQuota: nothing is stored)."""
    from kubernetes import client

    body = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": f"quantity-{uuid.uuid4().hex[:8]}"},
        "spec": {"hard": {"requests.memory": text}},
    }
    try:
        out = client.CoreV1Api(k8s).create_namespaced_resource_quota(
            "default", body, dry_run="All", _preload_content=False
        )
    except client.ApiException as exc:
        assert exc.status == 400, exc.body
        return None
    return str(json.loads(out.data)["spec"]["hard"]["requests.memory"])


def _parsed(text: str) -> Any:
    try:
        return quantity_value(text)
    except ValueError:
        return None


@pytest.mark.parametrize("text", QUANTITIES, ids=[repr(q) for q in QUANTITIES])
def test_quantities_are_read_as_the_api_server_reads_them(k8s: Any, text: str) -> None:
    canonical = _quota_value(k8s, text)
    ours = _parsed(text)
    if canonical is None:
        assert ours is None, f"the API server refuses {text!r}, the reconciler reads {ours}"
    else:
        assert ours is not None, f"the API server reads {text!r} as {canonical}"
        assert ours == quantity_value(canonical), canonical


@pytest.mark.parametrize("text", STRICTER, ids=[repr(q) for q in STRICTER])
def test_the_reconciler_is_stricter_only_where_it_must(k8s: Any, text: str) -> None:
    assert _quota_value(k8s, text) is not None
    assert _parsed(text) is None


# ------------------------------------------------------------------ the gateway namespace


def _dry_run_pod(k8s: Any, resources: dict[str, Any]) -> dict[str, Any]:
    from kubernetes import client

    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"limits-{uuid.uuid4().hex[:8]}"},
        "spec": {
            # Pod Security "restricted" is enforced in the gateway namespace.
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": c.GATEWAY_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "envoy",
                    "image": "envoy",
                    "resources": resources,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    out = client.CoreV1Api(k8s).create_namespaced_pod(
        GATEWAY_NS, body, dry_run="All", _preload_content=False
    )
    pod: dict[str, Any] = json.loads(out.data)
    return pod


def test_the_gateway_namespace_defaults_a_pod_like_the_reconciler(k8s: Any) -> None:
    pod = _dry_run_pod(k8s, {})
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources == {"requests": dict(DEFAULT_REQUESTS), "limits": dict(DEFAULT_LIMITS)}


@pytest.mark.parametrize(
    "resources",
    [
        {"limits": {"cpu": "9"}},
        {"requests": {"cpu": "100m"}, "limits": {"memory": "17Gi"}},
    ],
    ids=["cpu", "memory"],
)
def test_the_gateway_namespace_refuses_a_pod_above_the_ceilings(
    k8s: Any, resources: dict[str, Any]
) -> None:
    from kubernetes import client

    with pytest.raises(client.ApiException) as info:
        _dry_run_pod(k8s, resources)
    assert info.value.status == 403, info.value.body
    assert "maximum" in str(info.value.body)
    # At the ceilings themselves, the pod is admitted.
    _dry_run_pod(k8s, {"limits": {"cpu": DEFAULT_CEILING_CPU, "memory": DEFAULT_CEILING_MEMORY}})


def test_the_gateway_namespace_has_no_node_ports(k8s: Any) -> None:
    from kubernetes import client

    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"np-{uuid.uuid4().hex[:8]}"},
        "spec": {"type": "NodePort", "ports": [{"port": 443}], "selector": {"a": "b"}},
    }
    with pytest.raises(client.ApiException) as info:
        client.CoreV1Api(k8s).create_namespaced_service(GATEWAY_NS, body, dry_run="All")
    assert info.value.status == 403 and "services.nodeports" in str(info.value.body)


# ------------------------------------------------------------------------- the reconciler


@pytest.fixture
def names(admin: Kube, unique: str) -> Iterator[tuple[str, str]]:
    victim, neighbour = f"big-{unique}", f"near-{unique}"
    yield victim, neighbour
    purge(admin, victim)
    purge(admin, neighbour)


def _ours(admin: Kube, name: str) -> dict[str, Any]:
    """Our field manager's entries and the resourceVersions no controller moves."""
    out: dict[str, Any] = {}
    for kind, obj in children(admin, name).items():
        out[kind] = [
            (e["time"], e["fieldsV1"])
            for e in obj["metadata"]["managedFields"]
            if e["manager"] == c.FIELD_MANAGER
        ]
        if kind in ("ConfigMap", "Service", "NetworkPolicy"):
            out[kind + "/rv"] = obj["metadata"]["resourceVersion"]
    return out


def test_an_object_above_the_ceilings_is_refused_and_harms_nothing(
    admin: Kube, as_reconciler: Kube, names: tuple[str, str]
) -> None:
    victim, neighbour = names
    reconciler = Reconciler(as_reconciler, dev_settings())
    create_es(admin, external_service(victim))
    assert reconciler.reconcile(victim).outcome == Outcome.CONVERGED
    before = _ours(admin, victim)
    assert set(before) >= {"Deployment", "Service"}

    # Accepted by the CRD (which cannot know the operator's settings), refused by the reconciler.
    update_spec(admin, victim, {"maxReplicas": 1000})
    create_es(admin, external_service(neighbour))
    result = reconciler.reconcile(victim)
    assert result.outcome == Outcome.INVALID
    assert reconciler.reconcile(neighbour).outcome == Outcome.CONVERGED

    live = admin.get(EXTERNAL_SERVICE, victim)
    assert live is not None
    valid = next(cd for cd in live["status"]["conditions"] if cd["type"] == "Valid")
    assert valid["status"] == "False"
    assert "spec.maxReplicas" in valid["message"] and ENV_MAX_REPLICAS in valid["message"]
    assert _ours(admin, victim) == before, "the gateway that worked is left untouched"
    assert children(admin, neighbour), "the neighbour got its gateway"
    # A platform team that raises the ceiling gets the gateway it asked for.
    raised = Reconciler(
        as_reconciler, dataclasses.replace(dev_settings(), ceilings=Ceilings(max_replicas=2000))
    )
    assert raised.reconcile(victim).outcome == Outcome.CONVERGED
    hpa = children(admin, victim)["HorizontalPodAutoscaler"]
    assert hpa["spec"]["maxReplicas"] == 1000
