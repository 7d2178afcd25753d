"""Publishing notices at least once, or dying trying.

Each notice is published with its ExternalService name as ordering key and attribute, through
Pub/Sub's REST ``projects.topics.publish`` with google-auth's ``AuthorizedSession`` (the gRPC
client and its runtime cost about 55 MB of resident memory, more than everything else here put
together; a publisher of ~200-byte notices needs one HTTPS POST). Semantics kept from the
client library's ordered publishing:

- notices of one ordering key are sent in publish order, one request in flight per key, each
  request batching up to ``MAX_BATCH`` notices of that key (the API wants one key a request);
  different keys are sent concurrently by ``workers`` threads;
- a request is retried with exponential backoff (0.1 s doubling to 5 s) on the answers Pub/Sub
  documents as retryable (ABORTED, CANCELLED, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED,
  UNAVAILABLE, UNKNOWN) and on connection failures, for at most ``timeout_s``;
- a notice that still fails, or meets a non-retryable answer (a missing topic, a refused
  permission), goes to the caller's ``on_fatal``, and so does every notice after it: the
  exporter then exits non-zero, because its restart re-lists and republishes everything,
  whereas carrying on would silently drop the change.

``publish`` blocks while ``max_outstanding`` notices are unacknowledged, so that a re-list of
any size holds a bounded number of them in memory.

``PUBSUB_EMULATOR_HOST`` sends to the emulator over plain HTTP without credentials, as the
client library does.
"""

from __future__ import annotations

import base64
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from core.notice import Notice

PUBSUB_SCOPE = "https://www.googleapis.com/auth/pubsub"
DEFAULT_ENDPOINT = "https://pubsub.googleapis.com"
# Messages per publish request (the client library's default batch size; the API takes 1,000).
MAX_BATCH = 100
# HTTP statuses of the retryable gRPC codes above (409 ABORTED, 429 RESOURCE_EXHAUSTED,
# 499 CANCELLED, 500 INTERNAL/UNKNOWN, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED) and 502.
RETRYABLE_STATUSES = frozenset({409, 429, 499, 500, 502, 503, 504})


class Publisher(Protocol):
    def publish(self, notice: Notice) -> None: ...

    def flush(self, timeout_s: float) -> bool: ...


class PublishError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def authorized_session(env: Mapping[str, str], workers: int) -> tuple[Any, str]:
    """An ``AuthorizedSession`` and the API root: the emulator's if ``PUBSUB_EMULATOR_HOST``
    is set (anonymous), else Pub/Sub's with Application Default Credentials (on GKE, the
    Workload Identity of the exporter's service account)."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.auth.transport.requests import AuthorizedSession
    from requests.adapters import HTTPAdapter

    emulator = (env.get("PUBSUB_EMULATOR_HOST") or "").strip()
    if emulator:
        credentials: Any = AnonymousCredentials()  # type: ignore[no-untyped-call]
        root = f"http://{emulator}"
    else:
        credentials, _ = google.auth.default(scopes=[PUBSUB_SCOPE])
        root = DEFAULT_ENDPOINT
    session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
    # One pooled connection per worker (requests keeps 10 by default and warns past that).
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=workers)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session, root


class PubSubPublisher:
    def __init__(
        self,
        project: str,
        topic: str,
        *,
        timeout_s: float,
        on_fatal: Callable[[BaseException, Notice], None],
        workers: int = 32,
        max_outstanding: int = 1000,
        session: Any = None,
        endpoint: str | None = None,
        env: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if session is None:
            session, root = authorized_session(os.environ if env is None else env, workers)
            endpoint = endpoint or root
        self.session = session
        self.url = f"{endpoint or DEFAULT_ENDPOINT}/v1/projects/{project}/topics/{topic}:publish"
        self.timeout_s = timeout_s
        self.on_fatal = on_fatal
        self.max_outstanding = max_outstanding
        self.sleep = sleep
        self.cond = threading.Condition()
        self.queues: dict[str, deque[Notice]] = {}  # by ordering key, in publish order
        self.ready: deque[str] = deque()  # keys with queued notices and no request in flight
        self.busy: set[str] = set()  # keys with a request in flight
        self.outstanding = 0  # published, not yet acknowledged or failed
        self.published = 0  # acknowledged by Pub/Sub
        self.requests = 0  # publish requests sent, retries included
        self.acknowledged_at = 0.0  # monotonic time of the last acknowledgement
        self.failure: BaseException | None = None
        self.stopping = False
        self.threads = [
            threading.Thread(target=self._work, name=f"publish-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    # -- the caller's side -----------------------------------------------------------------

    def publish(self, notice: Notice) -> None:
        """Queue ``notice``; blocks while ``max_outstanding`` notices are unacknowledged."""
        with self.cond:
            self.cond.wait_for(
                lambda: self.outstanding < self.max_outstanding or self.failure is not None
            )
            failure = self.failure
            if failure is None:
                key = notice.name
                queue = self.queues.get(key)
                if queue is None:
                    queue = self.queues[key] = deque()
                if not queue and key not in self.busy:
                    self.ready.append(key)
                queue.append(notice)
                self.outstanding += 1
                self.cond.notify_all()
        if failure is not None:
            # Publishing already failed: the process is going down; say so for this one too.
            self.on_fatal(failure, notice)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every notice published so far is acknowledged by Pub/Sub; False after
        a failure, or once ``timeout_s`` passed without any acknowledgement (a backlog that
        keeps draining is waited for: each request has its own deadline anyway)."""
        with self.cond:
            since = time.monotonic()
            while self.outstanding and self.failure is None:
                idle = time.monotonic() - max(since, self.acknowledged_at)
                if idle >= timeout_s:
                    return False
                self.cond.wait(timeout_s - idle)
            return self.failure is None

    def stop(self) -> None:
        """End the workers (after ``flush``: queued notices are not sent)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join(timeout=5)
        close = getattr(self.session, "close", None)
        if close is not None:
            close()

    # -- the workers -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.ready) or self.stopping)
                if self.stopping:
                    return
                key = self.ready.popleft()
                queue = self.queues[key]
                count = len(queue) if self.failure is not None else min(len(queue), MAX_BATCH)
                batch = [queue.popleft() for _ in range(count)]
                self.busy.add(key)
                failure = self.failure
            if failure is None:
                try:
                    self._send(key, batch)
                except Exception as exc:
                    failure = exc
            with self.cond:
                self.busy.discard(key)
                self.outstanding -= len(batch)
                if failure is None:
                    self.published += len(batch)
                    self.acknowledged_at = time.monotonic()
                elif self.failure is None:
                    self.failure = failure
                if queue:
                    self.ready.append(key)
                else:
                    del self.queues[key]
                self.cond.notify_all()
            if failure is not None:
                for notice in batch:
                    self.on_fatal(failure, notice)

    def _send(self, key: str, batch: list[Notice]) -> None:
        """One publish request for ``batch`` (all of ordering key ``key``), retried on
        retryable failures until ``timeout_s`` has passed; raises what finally failed."""
        body = {
            "messages": [
                {
                    "data": base64.b64encode(n.encode()).decode("ascii"),
                    "attributes": n.attributes(),
                    "orderingKey": key,
                }
                for n in batch
            ]
        }
        deadline = time.monotonic() + self.timeout_s
        delay = 0.1
        while True:
            remaining = deadline - time.monotonic()
            try:
                with self.cond:
                    self.requests += 1
                response = self.session.post(self.url, json=body, timeout=max(remaining, 1.0))
                status = int(response.status_code)
                if 200 <= status < 300:
                    return
                error: Exception = PublishError(
                    f"publish answered {status}: {response.text[:300]}", status
                )
                retryable = status in RETRYABLE_STATUSES
            except Exception as exc:
                error, retryable = exc, _is_connection_failure(exc)
            if not retryable or time.monotonic() + delay > deadline:
                raise error
            self.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 5.0)


def _is_connection_failure(exc: BaseException) -> bool:
    """A failure to reach Pub/Sub or to get a token (worth retrying), not a bug of ours."""
    from google.auth.exceptions import TransportError
    from requests.exceptions import ConnectionError, Timeout

    return isinstance(exc, ConnectionError | Timeout | TransportError | OSError)
