"""List-then-watch of ExternalServices and gateway Deployments, turned into notices.

Why not ``kubernetes.watch.Watch``: the pinned client ignores the resourceVersion of BOOKMARK
events and gives up after one 410. Here the resourceVersion is tracked by hand (every event and
bookmark moves it), a 410 (from the request or as an ERROR event) means "re-list and publish a
notice for everything re-listed", and any other failure reconnects with jittered backoff.

Status writes are filtered out: with a status subresource, ``generation`` moves only on spec
changes, so a MODIFIED event that changes neither generation, deletionTimestamp, finalizers nor
uid is the reconciler's own status write and is not published (it would only cause an in-sync
reconcile, and then another status-free event, forever).

Memory: per object only its Seen state is held (uid, generation, deleting, finalizers; for a
gateway Deployment its ready replicas), lists are read a page at a time and never held whole,
and requests go through ``core.kube.Kube`` over ``core.kubehttp`` (no official client, whose
import alone is about 65 MB).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from core import constants as c
from core import logs
from core.errors import PermanentError, TransientError, classify
from core.kube import DEPLOYMENT, EXTERNAL_SERVICE, Gone, Kube, Obj, Resource, WatchStream
from core.notice import EventType, Notice, NoticeChange, NoticeKind
from exporter.publisher import Publisher
from exporter.settings import ExporterSettings

log = logs.get("exporter")
Clock = Callable[[], dt.datetime]
# Objects per LIST page: a page is the most the exporter ever holds of the listed objects.
LIST_PAGE_SIZE = 250


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- what counts as a change ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeenExternalService:
    uid: str
    generation: int
    deleting: bool
    finalizers: tuple[str, ...]

    @classmethod
    def of(cls, obj: Obj) -> SeenExternalService:
        meta = obj.get("metadata") or {}
        return cls(
            str(meta.get("uid", "")),
            int(meta.get("generation") or 0),
            bool(meta.get("deletionTimestamp")),
            tuple(meta.get("finalizers") or ()),
        )


def external_service_change(
    previous: SeenExternalService | None, event_type: str, obj: Obj
) -> NoticeChange | None:
    """The change a watch event makes to an ExternalService, or None for a status-only write."""
    if event_type == "DELETED":
        return NoticeChange.DELETED
    now = SeenExternalService.of(obj)
    if previous is None or previous.uid != now.uid:
        return NoticeChange.CREATED
    if now.deleting and not previous.deleting:
        return NoticeChange.DELETING
    if now.generation != previous.generation:
        return NoticeChange.SPEC
    if now.finalizers != previous.finalizers:
        return NoticeChange.FINALIZERS
    return None


@dataclass(frozen=True, slots=True)
class SeenDeployment:
    uid: str
    ready: int

    @classmethod
    def of(cls, obj: Obj) -> SeenDeployment:
        status = obj.get("status") or {}
        return cls(
            str((obj.get("metadata") or {}).get("uid", "")), int(status.get("readyReplicas") or 0)
        )


def deployment_change(
    previous: SeenDeployment | None, event_type: str, obj: Obj
) -> NoticeChange | None:
    """Readiness moves the hijack state; a deleted Deployment is drift to repair at once."""
    if event_type == "DELETED":
        return NoticeChange.GATEWAY_DELETED
    now = SeenDeployment.of(obj)
    if previous is None or previous.uid != now.uid:
        # Our own reconcile just created it; only a ready one has news.
        return NoticeChange.READINESS if now.ready > 0 else None
    return NoticeChange.READINESS if now.ready != previous.ready else None


def gateway_of(obj: Obj) -> str | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    name = labels.get(c.LABEL_GATEWAY)
    return name if isinstance(name, str) and name else None


# -- the exporter ---------------------------------------------------------------------------


class Backoff:
    def __init__(self, base_s: float = 0.5, max_s: float = 30.0) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.attempt = 0

    def next(self) -> float:
        self.attempt += 1
        delay = min(self.max_s, self.base_s * 2 ** (self.attempt - 1))
        return float(delay * (0.5 + random.random() / 2))

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class WatchState:
    resource: Resource
    namespace: str | None
    label_selector: str | None
    resource_version: str = ""
    listed: bool = False
    relists: int = 0
    events: int = 0
    last_contact: float = 0.0


class Exporter:
    def __init__(
        self,
        kube: Kube,
        publisher: Publisher,
        settings: ExporterSettings,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self.kube = kube
        self.publisher = publisher
        self.settings = settings
        self.clock = clock
        self.stopping = threading.Event()
        self.es_seen: dict[str, SeenExternalService] = {}
        self.deployments_seen: dict[str, SeenDeployment] = {}
        self.watches = {
            "externalservices": WatchState(EXTERNAL_SERVICE, None, None),
            "deployments": WatchState(DEPLOYMENT, settings.gateway_namespace, c.LABEL_GATEWAY),
        }
        self._streams: set[WatchStream] = set()
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return all(w.listed for w in self.watches.values())

    # -- notices ---------------------------------------------------------------------------

    def _publish(
        self, name: str, kind: NoticeKind, change: NoticeChange, event_type: EventType, rv: str
    ) -> None:
        notice = Notice(name, kind, change, event_type, rv or "0", self.clock())
        self.publisher.publish(notice)
        logs.log(
            log,
            logging.INFO,
            f"notice {name}: {change} ({event_type} {kind})",
            externalService=name,
            notice=notice.to_json(),
        )

    def on_external_service(self, event_type: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str):
            return
        change = external_service_change(self.es_seen.get(name), event_type, obj)
        if event_type == "DELETED":
            self.es_seen.pop(name, None)
        else:
            self.es_seen[name] = SeenExternalService.of(obj)
        if change is not None:
            rv = str(meta.get("resourceVersion", ""))
            self._publish(name, NoticeKind.EXTERNAL_SERVICE, change, EventType(event_type), rv)

    def on_deployment(self, event_type: str, obj: Obj) -> None:
        name = gateway_of(obj)
        if name is None:
            return
        change = deployment_change(self.deployments_seen.get(name), event_type, obj)
        if event_type == "DELETED":
            self.deployments_seen.pop(name, None)
        else:
            self.deployments_seen[name] = SeenDeployment.of(obj)
        if change is not None:
            rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
            self._publish(name, NoticeKind.DEPLOYMENT, change, EventType(event_type), rv)

    def relist(self, key: str) -> str:
        """List everything; publish what the list implies; return the list's resourceVersion."""
        watch = self.watches[key]
        # Page by page: each listed object is reduced to what the watch compares (Seen*) as
        # its page arrives, so that only one page is ever held whole, whatever the count.
        keep = self._keep_external_service if key == "externalservices" else self._keep_deployment
        items, rv = self.kube.list_all(
            watch.resource,
            watch.namespace,
            watch.label_selector,
            keep=keep,
            page_size=LIST_PAGE_SIZE,
        )
        watch.relists += 1
        if key == "externalservices":
            # Everything listed got a notice (in _keep_external_service): whatever happened
            # while we were not watching is then reconciled (level-triggered), and names gone
            # meanwhile get a "deleted" one.
            seen: dict[str, SeenExternalService] = {item["name"]: item["seen"] for item in items}
            for name in sorted(set(self.es_seen) - set(seen)):
                self._publish(
                    name, NoticeKind.EXTERNAL_SERVICE, NoticeChange.DELETED, EventType.RELIST, rv
                )
            self.es_seen = seen
        else:
            fresh: dict[str, SeenDeployment] = {}
            for item in items:
                name = item["name"]
                fresh[name] = item["seen"]
                old = self.deployments_seen.get(name)
                if watch.listed and (old is None or old.ready != fresh[name].ready):
                    rv_item = item["resourceVersion"]
                    self._publish(
                        name,
                        NoticeKind.DEPLOYMENT,
                        NoticeChange.READINESS,
                        EventType.RELIST,
                        rv_item,
                    )
            for name in sorted(set(self.deployments_seen) - set(fresh)):
                self._publish(
                    name,
                    NoticeKind.DEPLOYMENT,
                    NoticeChange.GATEWAY_DELETED,
                    EventType.RELIST,
                    rv,
                )
            self.deployments_seen = fresh
        # Only once Pub/Sub has every notice of the list is the list's resourceVersion ours.
        if not self.publisher.flush(self.settings.publish_timeout_s):
            raise TransientError("publishing the re-listed notices failed or stalled")
        logs.log(
            log,
            logging.INFO,
            f"listed {len(items)} {watch.resource.plural}; watching from {rv}",
            resourceVersion=rv,
            count=len(items),
        )
        return rv

    def _keep_external_service(self, item: Obj) -> Obj | None:
        """A listed ExternalService: its notice now, its Seen state kept."""
        meta = item.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str):
            return None
        self._publish(
            name,
            NoticeKind.EXTERNAL_SERVICE,
            NoticeChange.RELIST,
            EventType.RELIST,
            str(meta.get("resourceVersion", "")),
        )
        return {"name": name, "seen": SeenExternalService.of(item)}

    def _keep_deployment(self, item: Obj) -> Obj | None:
        """A listed gateway Deployment, reduced to its gateway, readiness and resourceVersion."""
        name = gateway_of(item)
        if name is None:
            return None
        rv = str((item.get("metadata") or {}).get("resourceVersion", ""))
        return {"name": name, "seen": SeenDeployment.of(item), "resourceVersion": rv}

    # -- watching --------------------------------------------------------------------------

    def watch_loop(self, key: str, start_resource_version: str | None = None) -> None:
        """List, then watch from the list's resourceVersion, until stopped. Never raises."""
        watch = self.watches[key]
        backoff = Backoff(max_s=self.settings.max_backoff_s)
        rv = start_resource_version or ""
        while not self.stopping.is_set():
            try:
                if not rv:
                    rv = self.relist(key)
                    watch.listed = True
                watch.resource_version = rv
                rv = self.stream(key, rv)
                backoff.reset()
            except Gone as exc:
                logs.log(
                    log,
                    logging.WARNING,
                    f"watch of {watch.resource.plural}: resourceVersion {rv} expired (410); "
                    "re-listing",
                    reason=str(exc)[:200],
                )
                rv = ""
            except Exception as exc:
                if self.stopping.is_set():
                    break
                delay = backoff.next()
                logs.log(
                    log,
                    logging.WARNING,
                    f"watch of {watch.resource.plural} failed ({_describe(exc)}); "
                    f"reconnecting in {delay:.1f}s",
                )
                self.stopping.wait(delay)

    def stream(self, key: str, rv: str) -> str:
        """One watch request from ``rv``; returns the last resourceVersion seen. Raises Gone."""
        watch = self.watches[key]
        events = self.kube.watch(
            watch.resource,
            rv,
            watch.namespace,
            watch.label_selector,
            timeout_s=self.settings.watch_timeout_s,
        )
        with self._lock:
            self._streams.add(events)
        if self.stopping.is_set():
            events.close()  # stop() ran before this stream was registered
        handler = self.on_external_service if key == "externalservices" else self.on_deployment
        try:
            with events:
                watch.last_contact = time.monotonic()
                for event_type, obj in events:
                    watch.last_contact = time.monotonic()
                    new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                    if event_type != "BOOKMARK":
                        watch.events += 1
                        handler(event_type, obj)
                    if new_rv:
                        rv = new_rv
                        watch.resource_version = rv
            return rv
        finally:
            with self._lock:
                self._streams.discard(events)

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            streams = list(self._streams)
        for events in streams:
            events.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TransientError | PermanentError):
        return str(exc)[:300]
    return classify(exc).message[:300]
