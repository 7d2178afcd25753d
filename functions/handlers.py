"""What each Cloud Function does with its trigger; ``main.py`` only routes to these.

Acknowledge or retry is the one decision every handler makes, and Pub/Sub reads it from the
HTTP status: return (2xx) acknowledges, raise (500) asks for redelivery. So:

- malformed, oversized, unknown-name, invalid-spec and forbidden are *permanent*: logged with
  the reason and acknowledged, since a retry would fail the same way forever. "Malformed" is
  anything the parsing of a message (or of a repair body: a 400) raises, whatever the exception
  (hostile input makes Python's own parsers fail without a ValueError); parsing calls nothing,
  so nothing transient hides there, and a parser bug is logged as an error but still refused;
- conflicts, overload, timeouts and server errors are *transient*: raised, and Pub/Sub
  redelivers with backoff (a dead-letter topic bounds the attempts);
- notices older than ``MAX_EVENT_AGE_SECONDS`` are acknowledged and left to the sweep.

The Kubernetes client is created on first use and kept for the life of the instance (one
function instance serves many events; creating a client costs TLS and credential setup).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core import logs
from core.notice import (
    BadNotice,
    Malformed,
    Notice,
    clip,
    decode_data,
    load_json,
    parse_notice,
    parse_time,
    preview,
    valid_name,
)
from core.settings import Settings
from core.shards import (
    MAX_SHARD_MESSAGE_BYTES,
    ShardMessage,
    looks_like_shard,
    parse_shard_message,
    sweep_id_of,
)
from functions.outcomes import (
    Delivered,
    Reconciles,
    log,
    log_line,
    log_malformed,
    ms_since,
    sweep_logged,
)
from functions.settings import MAX_CLOCK_SKEW_S, PipelineSettings

if TYPE_CHECKING:  # imported when first used: a cold start that refuses a message needs neither
    from core.kube import Kube
    from functions.shards import ProgressStore, ShardPublisher, SweepsInShards

# Refusals are logged and answered; a message can make one long, never the log line huge.
MAX_REASON_CHARS = 300
# A repair body is well under 1 KiB; anything this large is not a repair request.
MAX_REPAIR_BODY_BYTES = 65536

ApiClientFactory = Callable[[], Any]


PublisherFactory = Callable[[], "ShardPublisher"]


@dataclass
class Runtime:
    """Per-instance state: settings (read once at start-up) and the lazily built reconcilers."""

    settings: Settings
    pipeline: PipelineSettings
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    api_client_factory: ApiClientFactory | None = None
    publisher_factory: PublisherFactory | None = None
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    sleep: Callable[[float], None] = time.sleep
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _kube: Kube | None = None
    _reconcilers: dict[bool, Reconciles] = field(default_factory=dict)
    _publisher: ShardPublisher | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Runtime:
        """Read every setting now, so that a bad one stops start-up with its name."""
        pipeline = PipelineSettings.from_env(env)
        logs.setup(pipeline.project)
        return cls(Settings.from_env(env), pipeline, env=dict(env))

    def kube(self) -> Kube:
        with self._lock:
            if self._kube is None:
                from core.kube import Kube
                from functions.credentials import api_client

                factory = self.api_client_factory or (lambda: api_client(self.pipeline, self.env))
                self._kube = Kube(factory())
            return self._kube

    def reconciler(self, dry_run: bool = False) -> Reconciles:
        kube = self.kube()
        with self._lock:
            if dry_run not in self._reconcilers:
                from reconcile.app import build_reconciler

                self._reconcilers[dry_run] = build_reconciler(
                    kube.with_dry_run(True) if dry_run else kube, self.settings
                )
            return self._reconcilers[dry_run]

    def shard_reconciler(self) -> SweepsInShards:
        reconciler: Any = self.reconciler(False)
        return reconciler  # type: ignore[no-any-return]

    def progress_store(self) -> ProgressStore:
        from functions.shards import ProgressStore

        return ProgressStore(
            self.kube(), self.settings.gateway_namespace, clock=self.clock, sleep=self.sleep
        )

    def publisher(self) -> ShardPublisher:
        with self._lock:
            if self._publisher is None:
                if self.publisher_factory is not None:
                    self._publisher = self.publisher_factory()
                else:
                    from functions.shards import PubSubShardPublisher

                    self._publisher = PubSubShardPublisher(
                        self.pipeline.project, self.pipeline.sweep_topic
                    )
            return self._publisher


# -- the events topic -----------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """What a CloudEvent from Pub/Sub (Eventarc, or functions-framework's push conversion) says.

    Only what every log line of the delivery needs; the Pub/Sub message is checked by
    ``notice_of``, so that a refusal is logged with the event id and trace too.
    """

    event_id: str
    trace: str
    span: str | None
    message: object


def delivery_of(event: Any) -> Delivery:
    """The ids and the unchecked Pub/Sub message of a CloudEvent; never raises."""
    event_id = _text(_attr(event, "id"))
    payload = getattr(event, "data", None)
    message = payload.get("message") if isinstance(payload, dict) else None
    attributes = message.get("attributes") if isinstance(message, dict) else None
    traceparent = _text(_attr(event, "traceparent"))
    if not traceparent and isinstance(attributes, dict):
        traceparent = _text(attributes.get("traceparent"))
    trace, span = logs.trace_from(traceparent or None)
    if not trace:
        # No trace propagated: derive a stable one from the message id, so every line of one
        # delivery (and of its redeliveries) groups together.
        import hashlib

        trace = hashlib.sha256(f"pubsub:{event_id}".encode()).hexdigest()[:32]
    return Delivery(event_id, trace, span, message)


def notice_of(delivery: Delivery, max_bytes: int) -> Notice:
    """The notice a Pub/Sub message carries; raises BadNotice if it carries none."""
    message = delivery.message
    if not isinstance(message, dict):
        raise BadNotice("CloudEvent data is not a Pub/Sub message ({'message': {...}})")
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise BadNotice("message attributes are not a map")
    notice = parse_notice(decode_data(message.get("data"), max_bytes))
    attr_name = attributes.get("name")
    if attr_name is not None and attr_name != notice.name:
        raise BadNotice(
            f"attribute name {preview(attr_name)} does not match notice name {notice.name!r}"
        )
    return notice


def _attr(event: Any, name: str) -> Any:
    try:
        return event[name]
    except (KeyError, TypeError):
        getter = getattr(event, "get", None)
        return getter(name) if callable(getter) else None


def _text(value: object, limit: int = 200) -> str:
    """An attribute as bounded text: CloudEvent attributes are strings unless someone is hostile."""
    if value is None:
        return ""
    return clip(value, limit) if isinstance(value, str) else preview(value, limit)


def _refusal(exc: Exception) -> tuple[str, int]:
    """Why input that cannot be parsed was refused, and the level to log it at."""
    if isinstance(exc, Malformed):
        return clip(str(exc), MAX_REASON_CHARS), logging.WARNING
    # Not a reason we wrote: a parser bug, logged as an error to be fixed. The same input would
    # fail the same way on every retry, so it is refused all the same.
    return f"cannot be parsed ({type(exc).__name__}: {clip(str(exc), 120)})", logging.ERROR


def handle_event(rt: Runtime, event: Any) -> None:
    """Reconcile the ExternalService a notice names; see the module docstring for ack/retry."""
    started = time.monotonic()
    delivery = delivery_of(event)
    with logs.context(
        function="event", eventId=delivery.event_id, trace=delivery.trace, spanId=delivery.span
    ):
        try:
            notice = notice_of(delivery, rt.pipeline.max_notice_bytes)
        except Exception as exc:  # parsing only: see the module docstring
            reason, level = _refusal(exc)
            log_malformed("notice", reason, level)
            return
        with logs.context(externalService=notice.name):
            age = (rt.clock() - notice.time).total_seconds()
            if age > rt.pipeline.max_event_age_s:
                log_line(
                    logging.INFO,
                    f"stale notice acknowledged ({age:.0f}s old, limit "
                    f"{rt.pipeline.max_event_age_s}s); the sweep covers it",
                    Delivered.STALE,
                    ageSeconds=round(age, 1),
                    notice=notice.to_json(),
                )
                return
            if age < -MAX_CLOCK_SKEW_S:
                log_malformed(
                    "notice", "time in the future", said=f"time is {-age:.0f}s in the future"
                )
                return
            reconcile_logged(rt, notice.name, notice=notice, started=started)


def reconcile_logged(
    rt: Runtime,
    name: str,
    *,
    notice: Notice | None = None,
    dry_run: bool = False,
    started: float | None = None,
) -> dict[str, Any]:
    """Reconcile one ExternalService and write the one log line that says how it went.

    Returns the result as a dict; raises TransientError (and unexpected errors) for a retry.
    """
    from reconcile.results import Outcome

    t0 = started if started is not None else time.monotonic()
    extra: dict[str, Any] = {"dryRun": dry_run} if dry_run else {}
    if notice is not None:
        extra["notice"] = notice.to_json()
    try:
        reconciler = rt.reconciler(dry_run)
        result = reconciler.reconcile(name)
        if (
            result.outcome == Outcome.DELETING
            and result.requeue_after_s is not None
            and result.requeue_after_s <= rt.pipeline.inline_requeue_max_s
            and not dry_run
        ):
            # A short grace period is waited out here; a long one is finished by the sweep.
            rt.sleep(max(0.0, result.requeue_after_s) + 0.1)
            first = result
            result = reconciler.reconcile(name)
            result.changes[:0] = first.changes
    except Exception as exc:
        verdict = verdict_of(exc)
        log_line(
            logging.ERROR,
            f"reconcile {name}: {verdict.text}",
            verdict.outcome,
            durationMs=ms_since(t0),
            **extra,
        )
        if verdict.outcome is Delivered.ERROR:
            log.exception("unexpected error")
        if verdict.retry:
            raise
        return {"name": name, "outcome": str(verdict.outcome), "message": str(exc)}
    report: dict[str, Any] = dict(result.to_dict())
    level = logging.INFO
    if result.outcome in (Outcome.INVALID, Outcome.CONFLICT, Outcome.CONTESTED):
        level = logging.WARNING
    summary = ", ".join(f"{ch.action} {ch.kind}" for ch in result.changes) or "no changes"
    text = f"reconcile {name}: {result.outcome} ({summary})"
    if result.message:
        text += f": {result.message}"
    log_line(
        level,
        text,
        result.outcome,
        changes=report["changes"],
        hijackState=result.hijack_state,
        durationMs=ms_since(t0),
        **extra,
    )
    return report


@dataclass(frozen=True)
class Verdict:
    """The ack/retry decision for a reconcile that raised, and the words its log line uses."""

    outcome: Delivered
    retry: bool
    text: str


def verdict_of(exc: Exception) -> Verdict:
    from core.errors import PermanentError, TransientError

    if isinstance(exc, TransientError):
        return Verdict(
            Delivered.TRANSIENT_ERROR, True, f"transient failure, raising for redelivery: {exc}"
        )
    if isinstance(exc, PermanentError):
        return Verdict(Delivered.PERMANENT_ERROR, False, f"permanent failure, acknowledged: {exc}")
    return Verdict(
        Delivered.ERROR, True, f"unexpected {type(exc).__name__}, raising for redelivery"
    )


# -- the sweep topic (Cloud Scheduler, and the shards of a large sweep) ---------------------


def handle_sweep(rt: Runtime, event: Any) -> dict[str, Any] | None:
    """Reconcile everything, prune orphans, log the drift; or, for a large sweep, one shard.

    The scheduler's trigger is always acknowledged: failures of single objects are in the
    report (the next sweep retries them) and a redelivery would only run a second full sweep.
    With ``SWEEP_SHARD_SIZE`` set and more ExternalServices than that, the trigger's delivery
    becomes the coordinator (``coordinate``) and the sweep's work travels as shard messages on
    the same topic (``run_shard``); see ``functions.shards`` for the record that makes them one
    sweep. A message that claims to be a shard but does not parse as one is logged and
    acknowledged, like a malformed notice.
    """
    started = time.monotonic()
    event_id = _text(_attr(event, "id"))
    trace, span = logs.trace_from(_text(_attr(event, "traceparent")) or None)
    with logs.context(function="sweep", eventId=event_id, trace=trace or None, spanId=span):
        shard = _shard_of_event(event)
        if isinstance(shard, ShardMessage):
            from functions.shards import run_shard

            return run_shard(rt, shard, started)
        if shard is not None:
            reason, level = shard
            log_malformed("shard message", reason, level)
            return None
        raw_time = _attr(event, "time")
        age = _age_s(rt, raw_time)
        if age is not None and age > rt.pipeline.max_event_age_s:
            log_line(
                logging.INFO,
                f"stale sweep trigger acknowledged ({age:.0f}s old); the next one runs",
                Delivered.STALE,
            )
            return None
        sweep_id = sweep_id_of(event_id, _text(raw_time))
        if rt.pipeline.sweep_shard_size > 0:
            from functions.shards import coordinate

            return coordinate(rt, event_id, sweep_id, started)
        return sweep_logged(rt, dry_run=False, started=started, sweep_id=sweep_id)


def _shard_of_event(event: Any) -> ShardMessage | tuple[str, int] | None:
    """The shard message a sweep-topic event carries; None for the scheduler's trigger (whose
    body is not read); (reason, log level) for a shard message that cannot be parsed."""
    payload = getattr(event, "data", None)
    message = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(message, dict):
        return None
    attributes = message.get("attributes")
    try:
        data: bytes | None = decode_data(message.get("data"), MAX_SHARD_MESSAGE_BYTES)
    except Exception:  # not base64, too large, absent: not a shard unless its attributes say so
        data = None
    try:
        if not looks_like_shard(attributes, data):
            return None
        raw = decode_data(message.get("data"), MAX_SHARD_MESSAGE_BYTES)
        return parse_shard_message(raw, attributes)
    except Exception as exc:  # parsing only: see the module docstring
        return _refusal(exc)


def _age_s(rt: Runtime, raw_time: object) -> float | None:
    """Seconds since a trigger's time; None if it has none that reads as a time in UTC."""
    try:
        return (rt.clock() - parse_time(_text(raw_time))).total_seconds()
    except (OverflowError, ValueError):
        return None


# -- repair over HTTP -----------------------------------------------------------------------


class BadRequest(Malformed):
    """The repair request cannot be served as sent: 400 with the reason."""


def parse_repair_body(raw: bytes, content_type: str | None) -> tuple[str | None, bool]:
    """``{"name": optional string, "dryRun": optional bool}``; raises BadRequest with why."""
    if len(raw) > MAX_REPAIR_BODY_BYTES:
        raise BadRequest(f"body is larger than {MAX_REPAIR_BODY_BYTES} bytes ({len(raw)} bytes)")
    if not raw.strip():
        return None, False
    # utf-8-sig: some shells (PowerShell) prefix a byte order mark.
    body = load_json(raw, "body", BadRequest, encoding="utf-8-sig")
    if not isinstance(body, dict):
        raise BadRequest('body must be a JSON object like {"name": "google", "dryRun": true}')
    unknown = sorted(set(body) - {"name", "dryRun"})
    if unknown:
        shown = ", ".join(preview(key, 40) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise BadRequest(f"unknown field(s) {shown}{more}; allowed: 'name', 'dryRun'")
    name = body.get("name")
    if name is not None and not valid_name(name):
        raise BadRequest(f"name must be an ExternalService name, got {preview(name)}")
    dry_run = body.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise BadRequest(f"dryRun must be true or false, got {preview(dry_run, 40)}")
    return name, dry_run


def handle_repair(rt: Runtime, request: Any) -> tuple[str, int, dict[str, str]]:
    """Reconcile one ExternalService (``name``) or sweep everything, optionally as a dry run."""
    headers = {"Content-Type": "application/json"}
    trace, span = logs.trace_from(
        request.headers.get("traceparent"), request.headers.get("X-Cloud-Trace-Context")
    )
    with logs.context(function="repair", trace=trace or None, spanId=span):
        if request.method not in ("POST", "PUT"):
            return _json({"error": "use POST with a JSON body"}), 405, headers
        raw = request.get_data()
        try:
            name, dry_run = parse_repair_body(raw, request.content_type)
        except Exception as exc:  # parsing only: see the module docstring
            reason, level = _refusal(exc)
            log_line(level, f"repair: bad request: {reason}", Delivered.BAD_REQUEST, reason=reason)
            return _json({"error": reason}), 400, headers
        from core.errors import TransientError
        from reconcile.results import Outcome

        try:
            if name is None:
                report = sweep_logged(rt, dry_run=dry_run)
                status = 503 if "error" in report else 200
                return _json({"dryRun": dry_run, "sweep": report}), status, headers
            with logs.context(externalService=name):
                result = reconcile_logged(rt, name, dry_run=dry_run)
        except TransientError as exc:
            return _json({"error": f"transient: {exc}", "retry": True}), 503, headers
        status = 404 if result.get("outcome") == Outcome.NOT_FOUND else 200
        return _json({"dryRun": dry_run, "result": result}), status, headers


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"
