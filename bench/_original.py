"""The original egress-operator's requests, replayed against the bench stack for comparison.

Its binary cannot run here (``tests/integration/original_operator.py`` says why), so this sends
what it sends, in its order, read from its source (controller-runtime, one reconcile at a time:
``MaxConcurrentReconciles`` is left at its default, 1):

- start: its informers LIST every kind it watches (ExternalServices, and the Deployments,
  NetworkPolicies, ConfigMaps, Services and HPAs it owns), 500 items a page; reads after that
  come from the cache, never from the API server;
- a new ExternalService: one POST per object (``client.Create``), under its field manager; the
  watch events of those creates queue the ExternalService again, and that reconcile finds a
  difference in the Deployment (fields the API server defaulted) and sends one merge PATCH that
  changes nothing (issue 14 counted about 6,000 requests for 1,000: 5 POSTs and this PATCH
  each). The queue is first in, first out: every first reconcile, then every second one;
- a restart over gateways it already made: one reconcile of each ExternalService, each with
  that no-op PATCH of the Deployment (issue 14: about 1,000 no-op PATCHes for 1,000).

Generous to the original: every body is built and encoded before the clock starts and sent on
a raw connection (no client library work per request), standing in for Go's near-free client;
no client-side rate limit (controller-runtime's default QPS would only slow it down).
"""

from __future__ import annotations

import json
import time
from typing import Any

from core.errors import MAX_RETRY_AFTER_S
from core.kube import (
    CONFIGMAP,
    DEPLOYMENT,
    EXTERNAL_SERVICE,
    NETWORK_POLICY,
    SERVICE,
    Kube,
)
from tests.integration.original_operator import (
    HPA_V1,
    NAMESPACE,
    ORIGINAL_MANAGER,
    RESOURCES,
    gateway_objects,
)

WATCHED = (EXTERNAL_SERVICE, DEPLOYMENT, NETWORK_POLICY, CONFIGMAP, SERVICE, HPA_V1)
# Its reconcile's order: Deployment, NetworkPolicy, ConfigMap, Service, then the HPA.
ORDER = ("Deployment", "NetworkPolicy", "ConfigMap", "Service", "HorizontalPodAutoscaler")


class RawClient:
    """Requests with pre-encoded bodies on the API client's own connection pool."""

    def __init__(self, kube: Kube) -> None:
        self.pool = kube.api.rest_client.pool_manager
        self.host = kube.api.configuration.host
        self.headers = {"Accept": "application/json"}
        token = kube.api.configuration.auth_settings().get("BearerToken")
        if token:
            self.headers[token["key"]] = token["value"]
        self.sent = 0
        self.retried = 0

    def send(self, method: str, path: str, body: bytes, content_type: str) -> int:
        headers = {**self.headers, "Content-Type": content_type}
        for _ in range(10):
            self.sent += 1
            response = self.pool.request(
                method, self.host + path, body=body, headers=headers, timeout=30.0
            )
            if response.status != 429:
                return int(response.status)
            # Overload: wait as told, as client-go does.
            self.retried += 1
            time.sleep(min(float(response.headers.get("Retry-After") or 1), MAX_RETRY_AFTER_S))
        raise RuntimeError(f"{method} {path}: still 429 after 10 attempts")


# What its patch of an unchanged Deployment amounts to: nothing the server keeps.
NOOP = json.dumps({"metadata": {"labels": {"app": "egress-gateway"}}}).encode()
MERGE = "application/merge-patch+json"


def _noop_path(name: str) -> str:
    return DEPLOYMENT.path(NAMESPACE, name) + f"?fieldManager={ORIGINAL_MANAGER}"


def _names(externals: list[dict[str, Any]], prefix: str) -> list[str]:
    return sorted(n for es in externals if (n := es["metadata"]["name"]).startswith(prefix))


def _informer_start(kube: Kube) -> list[dict[str, Any]]:
    externals: list[dict[str, Any]] = []
    for resource in WATCHED:
        namespace = None if resource is EXTERNAL_SERVICE else NAMESPACE
        items, _ = kube.list_all(resource, namespace)
        if resource is EXTERNAL_SERVICE:
            externals = items
    return externals


def converge_new(kube: Kube, image: str, prefix: str) -> dict[str, Any]:
    """Every ExternalService named ``prefix...`` is new: POST its five objects, one by one.

    The clock runs for its LISTs and its POSTs; it stops while this process builds the bodies
    (the original's Go does that in microseconds)."""
    start = time.perf_counter()
    externals = _informer_start(kube)
    listing = time.perf_counter() - start
    bodies: list[tuple[str, bytes]] = []
    names = _names(externals, prefix)
    by_name = {es["metadata"]["name"]: es for es in externals}
    for name in names:
        es = by_name[name]
        objects = {obj["kind"]: obj for obj in gateway_objects(es, image)}
        for kind in ORDER:
            path = RESOURCES[kind].path(NAMESPACE) + f"?fieldManager={ORIGINAL_MANAGER}"
            bodies.append((path, json.dumps(objects[kind]).encode()))
    raw = RawClient(kube)
    failed = 0
    start = time.perf_counter()
    for path, body in bodies:
        if raw.send("POST", path, body, "application/json") != 201:
            failed += 1
    created = len(bodies) - failed
    for name in names:  # the second reconcile of each
        if raw.send("PATCH", _noop_path(name), NOOP, MERGE) != 200:
            failed += 1
    wall = listing + time.perf_counter() - start
    return {"wallSeconds": round(wall, 3), "created": created, "failed": failed,
            "retried429": raw.retried}  # fmt: skip


def restart_in_sync(kube: Kube, prefix: str) -> dict[str, Any]:
    """A restart over its own gateways: the LISTs, then one no-op PATCH per ExternalService."""
    raw = RawClient(kube)
    failed = 0
    start = time.perf_counter()
    for name in _names(_informer_start(kube), prefix):
        if raw.send("PATCH", _noop_path(name), NOOP, MERGE) != 200:
            failed += 1
    wall = time.perf_counter() - start
    return {"wallSeconds": round(wall, 3), "failed": failed,
            "retried429": raw.retried}  # fmt: skip
