"""All Kubernetes I/O of the product, through one small REST layer over the official client.

The typed clients of the pinned ``kubernetes`` release cannot send a server-side apply and
deserialising into their models is slow, so requests go through ``ApiClient.call_api`` with
plain JSON in and out. Every request is counted (the benchmarks and the zero-write guarantee of
an in-sync sweep are measured with these counters), retried for transient failures in
``core.errors``, and carries dry run when asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from core import constants as c
from core.errors import PermanentError, RetryPolicy, TransientError, classify, with_retries

Obj = dict[str, Any]

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
MERGE_CONTENT_TYPE = "application/merge-patch+json"
JSON_PATCH_CONTENT_TYPE = "application/json-patch+json"
LIST_PAGE_SIZE = 500
# Connections kept open to the API server: at least a sweep's concurrency (SWEEP_CONCURRENCY),
# or the requests beyond the pool's size each pay a TLS handshake (the client's default is 5
# per CPU: 5 on a one-CPU function instance).
CONNECTIONS = 64
DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Resource:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The object's path, or its collection's; a namespaced collection without a namespace
        is the collection across all namespaces (a cluster-wide LIST)."""
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace is None and name:
            raise ValueError(f"{self.kind} {name!r}: a namespaced object needs its namespace")
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


EXTERNAL_SERVICE = Resource(c.API_VERSION, c.KIND, c.PLURAL, namespaced=False)
CONFIGMAP = Resource("v1", "ConfigMap", "configmaps")
SERVICE = Resource("v1", "Service", "services")
DEPLOYMENT = Resource("apps/v1", "Deployment", "deployments")
HPA = Resource("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
NETWORK_POLICY = Resource("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies")
PDB = Resource("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
POD = Resource("v1", "Pod", "pods")
ENDPOINT_SLICE = Resource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices")
# Read only by the access audit (access/), across all namespaces.
NAMESPACE = Resource("v1", "Namespace", "namespaces", namespaced=False)
REPLICA_SET = Resource("apps/v1", "ReplicaSet", "replicasets")
JOB = Resource("batch/v1", "Job", "jobs")

# The kinds of a gateway, in apply order: the policy exists before any pod can run, the Service
# before DNS can point at it (gateway.render returns its objects in this order).
GATEWAY_KINDS: tuple[Resource, ...] = (CONFIGMAP, NETWORK_POLICY, SERVICE, DEPLOYMENT, HPA, PDB)
BY_KIND: dict[str, Resource] = {r.kind: r for r in (EXTERNAL_SERVICE, *GATEWAY_KINDS)}


class Gone(Exception):
    """410: a list continue token or a watch resourceVersion expired."""


@dataclass
class Counters:
    """Requests sent, by verb; thread-safe so that concurrent reconciles can share a client."""

    by_verb: Counter[str] = field(default_factory=Counter)
    # (method, path) of every request: what RBAC must allow, derived from what the code does.
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, verb: str, path: str = "") -> None:
        with self.lock:
            self.by_verb[verb] += 1
            self.calls[(verb, path)] += 1

    @property
    def total(self) -> int:
        return sum(self.by_verb.values())

    @property
    def writes(self) -> int:
        return sum(n for verb, n in self.by_verb.items() if verb in MUTATING)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.by_verb)


class Kube:
    """A Kubernetes API client speaking plain dicts. ``dry_run`` applies to every write."""

    def __init__(
        self,
        api_client: Any,
        *,
        dry_run: bool = False,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout_s: float = 30.0,
        sleep: Callable[[float], None] | None = None,
        page_size: int = LIST_PAGE_SIZE,
    ) -> None:
        self.api = api_client
        self.sleep = sleep
        self.page_size = page_size
        self.dry_run = dry_run
        self.retry = retry
        self.timeout_s = timeout_s
        self.counters = Counters()

    def with_dry_run(self, dry_run: bool) -> Kube:
        clone = Kube(
            self.api,
            dry_run=dry_run,
            retry=self.retry,
            timeout_s=self.timeout_s,
            sleep=self.sleep,
            page_size=self.page_size,
        )
        clone.counters = self.counters
        return clone

    # -- transport -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        final_statuses: frozenset[int] = frozenset(),
    ) -> Any:
        query = list(query or [])
        if self.dry_run and method in MUTATING:
            query.append(("dryRun", "All"))

        def call() -> Any:
            self.counters.add(method, path)
            response = self.api.call_api(
                path,
                method,
                query_params=query,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=self.timeout_s,
            )
            data = response[0].data if isinstance(response, tuple) else response.data
            return json.loads(data) if data else None

        return with_retries(call, self.retry, sleep=self.sleep, final_statuses=final_statuses)

    def _status_of(self, exc: BaseException) -> int | None:
        cause = exc.__cause__ or exc
        return classify(cause).status

    # -- reads -----------------------------------------------------------------------------

    def get(self, resource: Resource, name: str, namespace: str | None = None) -> Obj | None:
        """The live object, or None when it does not exist."""
        try:
            result: Obj = self.request("GET", resource.path(namespace, name))
            return result
        except Exception as exc:
            if self._status_of(exc) == 404:
                return None
            raise

    def list_all(
        self,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        keep: Callable[[Obj], Obj | None] | None = None,
        page_size: int | None = None,
    ) -> tuple[list[Obj], str]:
        """Every object, paginated; restarts from scratch if a continue token expires (410).

        Returns the items and the list's resourceVersion (a starting point for a watch).
        ``keep`` sees each item as its page arrives and returns what to hold (the item, a
        smaller copy) or None to drop it, so that only one page is ever held whole.
        """
        for _ in range(5):
            try:
                return self._list_once(
                    resource, namespace, label_selector, keep, page_size or self.page_size
                )
            except Gone:
                continue
        raise Gone(f"list of {resource.plural} kept expiring")

    def _list_once(
        self,
        resource: Resource,
        namespace: str | None,
        label_selector: str | None,
        keep: Callable[[Obj], Obj | None] | None,
        page_size: int,
    ) -> tuple[list[Obj], str]:
        items: list[Obj] = []
        token = ""
        while True:
            query = [("limit", str(page_size))]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if token:
                query.append(("continue", token))
            try:
                page = self.request("GET", resource.path(namespace), query=query)
            except Exception as exc:
                if self._status_of(exc) == 410:
                    raise Gone(str(exc)) from exc
                raise
            for item in page.pop("items", None) or []:
                item.setdefault("apiVersion", resource.api_version)
                item.setdefault("kind", resource.kind)
                kept = item if keep is None else keep(item)
                if kept is not None:
                    items.append(kept)
            token = page.get("metadata", {}).get("continue") or ""
            if not token:
                return items, str(page.get("metadata", {}).get("resourceVersion", ""))

    def count(self, resource: Resource, namespace: str | None = None) -> int:
        """How many objects exist: a LIST of one item, whose ``remainingItemCount`` says the
        rest; a full paginated LIST (keeping nothing) when the server leaves it out."""
        page = self.request("GET", resource.path(namespace), query=[("limit", "1")])
        meta = page.get("metadata") or {}
        listed = len(page.get("items") or [])
        remaining = meta.get("remainingItemCount")
        if not meta.get("continue"):
            return listed
        if isinstance(remaining, int) and remaining >= 0:
            return listed + remaining
        return len(self.list_all(resource, namespace, keep=lambda _item: {})[0])

    def watch(
        self,
        resource: Resource,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        timeout_s: int = 300,
        connect_timeout_s: float = 10.0,
    ) -> WatchStream:
        """One watch request from ``resource_version``, with bookmarks, as a stream of events;
        the server ends it after ``timeout_s``. Raises Gone if that version is too old (410).

        Not retried here: a watcher resumes from the last resourceVersion it saw, which only
        it knows."""
        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_s)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        path = resource.path(namespace)
        # Counted as WATCH, not GET: what RBAC is asked for (and not a write).
        self.counters.add("WATCH", path)
        try:
            response = self.api.call_api(
                path,
                "GET",
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=(connect_timeout_s, timeout_s + 30),
            )
        except Exception as exc:
            if classify(exc).status == 410:
                raise Gone(str(exc)) from exc
            raise
        return WatchStream(response[0] if isinstance(response, tuple) else response)

    # -- writes ----------------------------------------------------------------------------

    def apply(
        self,
        obj: Obj,
        *,
        force: bool = True,
        field_manager: str = c.FIELD_MANAGER,
        resource: Resource | None = None,
    ) -> Obj:
        """Server-side apply, under the product's single field manager unless told otherwise
        (the migration owns the CRD under its own; ``egressctl run`` applies examples as a user).
        """
        resource = resource or BY_KIND[obj["kind"]]
        meta = obj["metadata"]
        query = [("fieldManager", field_manager), ("force", "true" if force else "false")]
        result: Obj = self.request(
            "PATCH",
            resource.path(meta.get("namespace"), meta["name"]),
            query=query,
            body=obj,
            content_type=APPLY_CONTENT_TYPE,
            # Without force, a 409 is an answer (another manager owns fields we set, see
            # field_conflicts), not a race to retry.
            final_statuses=frozenset() if force else frozenset({409}),
        )
        return result

    def merge_patch(
        self,
        resource: Resource,
        name: str,
        patch: Obj,
        namespace: str | None = None,
        *,
        subresource: str = "",
        field_manager: str | None = None,
        final_statuses: frozenset[int] = frozenset(),
    ) -> Obj:
        """A JSON merge patch (RFC 7386). A ``metadata.uid`` or ``metadata.resourceVersion`` in
        ``patch`` is a precondition: the server answers 409 if the object is not that one."""
        path = resource.path(namespace, name) + (f"/{subresource}" if subresource else "")
        query = [("fieldManager", field_manager)] if field_manager else []
        result: Obj = self.request(
            "PATCH",
            path,
            query=query,
            body=patch,
            content_type=MERGE_CONTENT_TYPE,
            final_statuses=final_statuses,
        )
        return result

    def json_patch(
        self,
        resource: Resource,
        name: str,
        ops: list[Obj],
        namespace: str | None = None,
        *,
        final_statuses: frozenset[int] = frozenset(),
    ) -> Obj:
        """A JSON patch (RFC 6902): its ``test`` operations are preconditions on the live object
        (a failed one is a 422; a 409 means the object changed under the patch)."""
        result: Obj = self.request(
            "PATCH",
            resource.path(namespace, name),
            body=ops,
            content_type=JSON_PATCH_CONTENT_TYPE,
            final_statuses=final_statuses,
        )
        return result

    def create(
        self, resource: Resource, obj: Obj, *, field_manager: str | None = None
    ) -> Obj | None:
        """Create ``obj``; None if an object of that name exists already (409)."""
        path = resource.path(obj["metadata"].get("namespace"))
        return self._write_once("POST", path, obj, field_manager)

    def replace(
        self, resource: Resource, obj: Obj, *, field_manager: str | None = None
    ) -> Obj | None:
        """Replace the whole object under the precondition of its ``metadata.resourceVersion``;
        None if another writer changed it first (409): read again and recompute."""
        meta = obj["metadata"]
        path = resource.path(meta.get("namespace"), meta["name"])
        return self._write_once("PUT", path, obj, field_manager)

    def _write_once(
        self, method: str, path: str, obj: Obj, field_manager: str | None
    ) -> Obj | None:
        try:
            result: Obj = self.request(
                method,
                path,
                query=[("fieldManager", field_manager)] if field_manager else [],
                body=obj,
                final_statuses=frozenset({409}),
            )
        except PermanentError as exc:
            if exc.status == 409:
                return None
            raise
        return result

    def delete(
        self, resource: Resource, name: str, namespace: str | None = None, *, uid: str = ""
    ) -> bool:
        """Delete with background propagation; False if it was already gone.

        With ``uid`` the delete only removes that incarnation of the object.
        """
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request(
                "DELETE", resource.path(namespace, name), body=body, final_statuses=frozenset({409})
            )
            return True
        except Exception as exc:
            status = self._status_of(exc)
            if status in (404, 409) and (status == 404 or uid):
                return False
            raise


class WatchStream:
    """The events of one watch request, in order, as ``(type, object)``: ADDED, MODIFIED,
    DELETED and BOOKMARK (whose object carries only ``metadata.resourceVersion``). An ERROR
    event raises: Gone for 410 (the version expired: re-list), TransientError otherwise.

    Use it as a context manager (the connection goes back to the pool at the end); ``close``
    may be called from another thread and ends the stream at once."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.response.release_conn()

    def __iter__(self) -> Iterator[tuple[str, Obj]]:
        for line in _lines(self.response):
            event = json.loads(line)
            event_type = str(event.get("type") or "")
            obj = event.get("object") or {}
            if event_type == "ERROR":
                code = obj.get("code")
                if code == 410:
                    raise Gone(str(obj.get("message", "")))
                raise TransientError(f"watch error {code}: {obj.get('message', '')}")
            yield event_type, obj

    def close(self) -> None:
        response = self.response
        # Best effort: whatever happens, the reader sees the stream end.
        with contextlib.suppress(Exception):
            response.shutdown() if hasattr(response, "shutdown") else response.close()


def _lines(response: Any) -> Iterator[bytes]:
    """The newline-separated JSON documents of a streamed response body."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def lean(obj: Obj) -> Obj:
    """``obj`` without the field sets of its managedFields entries (for a Deployment, about a
    third of its size): who wrote it, how and when stay, which is all a sweep reads of them."""
    meta = obj.get("metadata") or {}
    entries = meta.get("managedFields")
    if entries:
        meta["managedFields"] = [
            {k: v for k, v in entry.items() if k != "fieldsV1"} for entry in entries
        ]
    return obj


def field_conflicts(exc: BaseException) -> dict[str, list[str]]:
    """The fields of a refused server-side apply (409) by the manager that owns them.

    The API server lists each conflict as a cause ``{"reason": "FieldManagerConflict",
    "message": "conflict with \"<manager>\" using apps/v1", "field": ".spec.replicas"}``;
    an empty result means the 409 was something else.
    """
    from kubernetes.client.exceptions import ApiException

    cause = exc if isinstance(exc, ApiException) else exc.__cause__
    body = getattr(cause, "body", None)
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    try:
        status = json.loads(body or "")
    except ValueError:
        return {}
    out: dict[str, list[str]] = {}
    causes = ((status or {}).get("details") or {}).get("causes") or []
    for item in causes:
        if not isinstance(item, dict) or item.get("reason") != "FieldManagerConflict":
            continue
        match = _CONFLICT_MANAGER.search(str(item.get("message", "")))
        if match:
            out.setdefault(match.group(1), []).append(str(item.get("field", "")))
    return out


_CONFLICT_MANAGER = re.compile(r'conflict with "([^"]*)"')


def api_client_from_kubeconfig(path: str | None = None, context: str | None = None) -> Any:
    """An ApiClient from a kubeconfig file (``$KUBECONFIG`` or ~/.kube/config when None).

    ``$KUBECONFIG`` is read now: the client's own default is read once, when it is imported."""
    from kubernetes import client, config

    configuration = client.Configuration()
    path = path or os.environ.get("KUBECONFIG") or None
    config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
    configuration.connection_pool_maxsize = CONNECTIONS
    return client.ApiClient(configuration)


def api_client_in_cluster() -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = CONNECTIONS
    return client.ApiClient(configuration)
