"""Publishing notices at least once, or dying trying.

Each notice is published with its ExternalService name as ordering key and attribute. The client
retries within a bounded deadline; a notice that still fails makes the exporter exit non-zero
(the caller's ``on_fatal``), because its restart re-lists and republishes everything, whereas
carrying on would silently drop the change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from core.notice import Notice


class Publisher(Protocol):
    def publish(self, notice: Notice) -> None: ...

    def flush(self, timeout_s: float) -> bool: ...


class PubSubPublisher:
    def __init__(
        self,
        project: str,
        topic: str,
        *,
        timeout_s: float,
        on_fatal: Callable[[BaseException, Notice], None],
    ) -> None:
        from google.api_core.retry import Retry
        from google.cloud import pubsub_v1

        retry = Retry(initial=0.1, maximum=5.0, multiplier=2.0, timeout=timeout_s)
        self.client = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.005),
            publisher_options=pubsub_v1.types.PublisherOptions(
                enable_message_ordering=True, retry=retry, timeout=timeout_s
            ),
        )
        self.topic = self.client.topic_path(project, topic)
        self.on_fatal = on_fatal
        self.pending: set[Any] = set()
        self.cond = threading.Condition()
        self.published = 0

    def publish(self, notice: Notice) -> None:
        future = self.client.publish(
            self.topic, notice.encode(), ordering_key=notice.name, **notice.attributes()
        )
        with self.cond:
            self.pending.add(future)

        def done(fut: Any) -> None:
            exc = fut.exception()
            with self.cond:
                self.pending.discard(fut)
                if exc is None:
                    self.published += 1
                self.cond.notify_all()
            if exc is not None:
                self.on_fatal(exc, notice)

        future.add_done_callback(done)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every notice published so far is acknowledged by Pub/Sub."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.pending, timeout=timeout_s)

    def stop(self) -> None:
        self.client.stop()
