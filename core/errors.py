"""Which failures are worth retrying, decided in one place.

Pub/Sub redelivers a message whose handler raised, so a *transient* failure (conflict, overload,
server error, a dropped connection) is retried a few times here with backoff and then raised as
``TransientError`` for redelivery. A *permanent* failure (the API refused the request as invalid
or forbidden) would fail the same way forever: it is raised as ``PermanentError``, which the
handlers log and acknowledge.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

TRANSIENT_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 10.0


class ReconcileError(Exception):
    """Base of the errors the handlers map to an outcome; ``status`` is the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientError(ReconcileError):
    """Retry later: Pub/Sub should redeliver."""


class PermanentError(ReconcileError):
    """Will never succeed as is: log, record on the object if possible, acknowledge."""


class HttpError(Exception):
    """An HTTP answer other than 2xx from a small client of ours (``core.kubehttp``), shaped
    like the official client's ``ApiException`` (status, reason, headers, body)."""

    def __init__(
        self, status: int, reason: str = "", headers: Any = None, body: bytes | str = b""
    ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        self.body = body


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Failure:
    transient: bool
    status: int | None
    retry_after_s: float | None
    message: str


def classify(exc: BaseException) -> Failure:
    """Map an exception from the Kubernetes client or the network to a Failure."""
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, HttpError) or _is_api_exception(exc):
        status = int(getattr(exc, "status", 0) or 0)
        retry_after = None
        headers = getattr(exc, "headers", None) or {}
        raw = headers.get("Retry-After") if hasattr(headers, "get") else None
        if raw:
            try:
                retry_after = min(float(raw), MAX_RETRY_AFTER_S)
            except ValueError:
                retry_after = None
        transient = status in TRANSIENT_STATUSES or status == 0
        return Failure(
            transient,
            status or None,
            retry_after,
            f"{status} {getattr(exc, 'reason', '')}: {_body(exc)}",
        )
    if isinstance(exc, (Urllib3Error, ConnectionError, TimeoutError, OSError)):
        return Failure(True, None, None, f"{type(exc).__name__}: {exc}")
    return Failure(False, None, None, f"{type(exc).__name__}: {exc}")


def _is_api_exception(exc: BaseException) -> bool:
    """An ``ApiException`` of the official client, without importing it: that import costs
    the whole client (~65 MB), which a process using only ``core.kubehttp`` (the exporter)
    never loads, and then cannot have raised one."""
    module = sys.modules.get("kubernetes.client.exceptions")
    return module is not None and isinstance(exc, module.ApiException)


def _body(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    text = str(body or "")
    return text[:500]


def with_retries(
    call: Callable[[], T],
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] | None = None,
    final_statuses: frozenset[int] = frozenset(),
) -> T:
    """Run ``call``; retry transient failures with jittered backoff (honouring Retry-After).

    A status in ``final_statuses`` is an answer the caller expects (a 404 on a read, a 409 from
    a precondition) and is raised at once as PermanentError.
    """
    policy = policy or RetryPolicy()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as exc:
            failure = classify(exc)
            if not failure.transient or failure.status in final_statuses:
                raise PermanentError(failure.message, failure.status) from exc
            if attempt == policy.attempts:
                raise TransientError(
                    f"gave up after {attempt} attempts: {failure.message}", failure.status
                ) from exc
            delay = failure.retry_after_s
            if delay is None:
                delay = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2
            (sleep or time.sleep)(delay)
    raise AssertionError("unreachable")
