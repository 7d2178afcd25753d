"""Helpers shared by the cluster tests: polling with a deadline, ExternalServices, pod readiness."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from reconcile import constants as c
from reconcile.kube import DEPLOYMENT, EXTERNAL_SERVICE, GATEWAY_KINDS, Kube, Resource

T = TypeVar("T")
GATEWAY_NS = "egress-operator-system"
POD = Resource("v1", "Pod", "pods")


def eventually(
    check: Callable[[], T | None], timeout_s: float = 30.0, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what} (last: {last!r})"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def external_service(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dnsName": f"{name}.example.com",
        "ports": [{"port": 443}],
        "minReplicas": 1,
    }
    body.update(spec)
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": body}


def create_es(admin: Kube, obj: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = admin.request("POST", EXTERNAL_SERVICE.path(), body=obj)
    return created


def update_spec(admin: Kube, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = admin.merge_patch(EXTERNAL_SERVICE, name, {"spec": spec})
    return result


def purge(admin: Kube, name: str) -> None:
    """Remove an ExternalService and every object of its gateway, finalizer or not."""
    live = admin.get(EXTERNAL_SERVICE, name)
    if live is not None:
        admin.merge_patch(EXTERNAL_SERVICE, name, {"metadata": {"finalizers": None}})
        admin.delete(EXTERNAL_SERVICE, name)
    for resource in GATEWAY_KINDS:
        admin.delete(resource, name, GATEWAY_NS)


def children(admin: Kube, name: str) -> dict[str, dict[str, Any]]:
    out = {}
    for resource in GATEWAY_KINDS:
        obj = admin.get(resource, name, GATEWAY_NS)
        if obj is not None:
            out[resource.kind] = obj
    return out


def set_pods_ready(admin: Kube, name: str, ready: bool, timeout_s: float = 30.0) -> None:
    """Mark the gateway's pods Ready (or not) the way a kubelet would, and wait for the Deployment.

    There is no kubelet in the local control plane, so the pods' status is written directly; the
    real ReplicaSet and Deployment controllers then derive the Deployment's readyReplicas.
    """

    def pods() -> list[dict[str, Any]] | None:
        items, _ = admin.list_all(POD, GATEWAY_NS, label_selector=f"{c.LABEL_GATEWAY}={name}")
        return items or None

    status = "True" if ready else "False"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for pod in eventually(pods, timeout_s, f"pods of {name}"):
        admin.merge_patch(
            POD,
            pod["metadata"]["name"],
            {
                "status": {
                    "phase": "Running",
                    "conditions": [
                        {"type": "Ready", "status": status, "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": status, "lastTransitionTime": now},
                    ],
                }
            },
            GATEWAY_NS,
            subresource="status",
        )

    def deployment_matches() -> bool:
        dep = admin.get(DEPLOYMENT, name, GATEWAY_NS) or {}
        ready_replicas = int((dep.get("status") or {}).get("readyReplicas") or 0)
        return ready_replicas >= 1 if ready else ready_replicas == 0

    eventually(deployment_matches, timeout_s, f"Deployment {name} readyReplicas to follow the pods")
