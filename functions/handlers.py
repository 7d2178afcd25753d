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

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

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
    shard_count,
    shard_of,
    sweep_id_of,
)
from functions.settings import MAX_CLOCK_SKEW_S, PipelineSettings

if TYPE_CHECKING:  # imported when first used: a cold start that refuses a message needs neither
    from core.kube import Kube
    from functions.shards import ProgressStore, Record, ShardPublisher
    from reconcile.controller import Outcome, Result, SweepReport

log = logs.get("functions")

# Refusals are logged and answered; a message can make one long, never the log line huge.
MAX_REASON_CHARS = 300
# A repair body is well under 1 KiB; anything this large is not a repair request.
MAX_REPAIR_BODY_BYTES = 65536

ApiClientFactory = Callable[[], Any]


class Delivered(StrEnum):
    """How a handler ended, where no reconcile result says it: the ``outcome`` of its log line."""

    MALFORMED = "malformed"  # acknowledged: the message can never be processed
    STALE = "stale"  # acknowledged: older than MAX_EVENT_AGE_SECONDS, the sweep covers it
    TRANSIENT_ERROR = "transient-error"  # raised: Pub/Sub redelivers
    PERMANENT_ERROR = "permanent-error"  # acknowledged: a retry would fail the same way
    ERROR = "error"  # raised: unexpected, logged with its traceback
    SWEPT = "swept"  # the sweep's summary line (a sharded sweep's merged report, once)
    FANNED_OUT = "fanned-out"  # a coordinator published shard messages
    SWEPT_SHARD = "swept-shard"  # one shard's summary line
    DUPLICATE = "duplicate"  # acknowledged: this shard was reported already
    INCOMPLETE = "incomplete"  # a sharded sweep some shard never reported (found at clean-up)
    BUSY = "busy"  # acknowledged unrun: a sharded sweep is still running
    BAD_REQUEST = "bad-request"  # a repair body that cannot be parsed: 400


class Reconciles(Protocol):
    """What the handlers need of ``reconcile.controller.Reconciler`` (tests pass a stub)."""

    def reconcile(self, name: str) -> Result: ...

    def sweep(self) -> SweepReport: ...


class SweepsInShards(Protocol):
    """What a shard needs of ``reconcile.controller.Reconciler`` (tests pass a stub)."""

    def sweep(
        self, *, only: Callable[[str], bool] | None = None, deliver: bool = True
    ) -> SweepReport: ...

    def finish_sweep(self) -> SweepReport: ...


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


def _log(level: int, text: str, outcome: Delivered | Outcome, **fields: Any) -> None:
    logs.log(log, level, text, outcome=str(outcome), **fields)


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
            _log(
                level,
                f"malformed notice acknowledged: {reason}",
                Delivered.MALFORMED,
                reason=reason,
            )
            return
        with logs.context(externalService=notice.name):
            age = (rt.clock() - notice.time).total_seconds()
            if age > rt.pipeline.max_event_age_s:
                _log(
                    logging.INFO,
                    f"stale notice acknowledged ({age:.0f}s old, limit "
                    f"{rt.pipeline.max_event_age_s}s); the sweep covers it",
                    Delivered.STALE,
                    ageSeconds=round(age, 1),
                    notice=notice.to_json(),
                )
                return
            if age < -MAX_CLOCK_SKEW_S:
                _log(
                    logging.WARNING,
                    f"malformed notice acknowledged: time is {-age:.0f}s in the future",
                    Delivered.MALFORMED,
                    reason="time in the future",
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
    from reconcile.controller import Outcome

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
        _log(
            logging.ERROR,
            f"reconcile {name}: {verdict.text}",
            verdict.outcome,
            durationMs=_ms(t0),
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
    _log(
        level,
        text,
        result.outcome,
        changes=report["changes"],
        hijackState=result.hijack_state,
        durationMs=_ms(t0),
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


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)


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
            return run_shard(rt, shard, started)
        if shard is not None:
            reason, level = shard
            _log(
                level,
                f"malformed shard message acknowledged: {reason}",
                Delivered.MALFORMED,
                reason=reason,
            )
            return None
        raw_time = _attr(event, "time")
        age = _age_s(rt, raw_time)
        if age is not None and age > rt.pipeline.max_event_age_s:
            _log(
                logging.INFO,
                f"stale sweep trigger acknowledged ({age:.0f}s old); the next one runs",
                Delivered.STALE,
            )
            return None
        sweep_id = sweep_id_of(event_id, _text(raw_time))
        if rt.pipeline.sweep_shard_size > 0:
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


def sweep_logged(
    rt: Runtime, *, dry_run: bool, started: float | None = None, sweep_id: str | None = None
) -> dict[str, Any]:
    from core.errors import PermanentError, TransientError

    t0 = started if started is not None else time.monotonic()
    extra: dict[str, Any] = {"sweepId": sweep_id} if sweep_id else {}
    try:
        report = rt.reconciler(dry_run).sweep()
    except (TransientError, PermanentError) as exc:
        return _sweep_failed(exc, t0, **extra)
    out: dict[str, Any] = dict(report.to_dict())
    _log_results(report, dry_run)
    level = logging.WARNING if out["drift"] or out["errors"] or out["fights"] else logging.INFO
    _log(
        level,
        f"sweep: {out['externalServices']} ExternalService(s), {len(out['drift'])} drift "
        f"change(s), {len(report.pruned)} orphan(s) pruned, {len(out['errors'])} error(s)"
        + (f", {len(out['fights'])} field manager fight(s)" if out["fights"] else ""),
        Delivered.SWEPT,
        externalServices=out["externalServices"],
        outcomes=out["outcomes"],
        drift=out["drift"],
        errors=out["errors"],
        fights=out["fights"],
        dryRun=dry_run,
        durationMs=_ms(t0),
        **extra,
    )
    return out


def _sweep_failed(exc: Exception, t0: float, **extra: Any) -> dict[str, Any]:
    """A sweep that stopped before reconciling anything: logged, acknowledged (the next runs)."""
    _log(
        logging.ERROR,
        f"sweep failed before reconciling anything: {exc}",
        Delivered.ERROR,
        durationMs=_ms(t0),
        **extra,
    )
    return {"error": str(exc)}


def _log_results(report: SweepReport, dry_run: bool) -> None:
    """One line per ExternalService a sweep (or a shard) changed or found not in sync."""
    from reconcile.controller import Outcome

    for result in report.results:
        if result.changes or result.outcome != Outcome.IN_SYNC:
            with logs.context(externalService=result.name):
                _log(
                    logging.WARNING if result.changes or result.fights else logging.INFO,
                    f"sweep: {result.name}: {result.outcome}"
                    + (f" (drift: {len(result.changes)} change(s))" if result.changes else "")
                    + "".join(f"; {f.describe()}" for f in result.fights),
                    result.outcome,
                    changes=[ch.to_dict() for ch in result.changes],
                    fights=[f.to_dict() for f in result.fights],
                    dryRun=dry_run,
                )


# -- a sweep in shards --------------------------------------------------------------------


def retention_s(rt: Runtime) -> float:
    """How long a progress record is kept: past it no delivery of its sweep can still write
    (shard messages older than SWEEP_MAX_AGE_S and triggers older than MAX_EVENT_AGE_SECONDS
    are acknowledged unrun, a finisher is taken over after FINISH_LEASE_S), and a redelivered
    trigger always finds it."""
    from functions.shards import FINISH_LEASE_S, SWEEP_MAX_AGE_S

    return max(SWEEP_MAX_AGE_S, rt.pipeline.max_event_age_s) + FINISH_LEASE_S + 60


def coordinate(rt: Runtime, event_id: str, sweep_id: str, started: float) -> dict[str, Any]:
    """The scheduler's trigger with SWEEP_SHARD_SIZE set: count, then sweep here or fan out.

    At most SWEEP_SHARD_SIZE ExternalServices: the whole sweep runs in this invocation, exactly
    as without sharding (one LIST of one item more, to count). More: a progress record for
    ``sweep_id`` and one shard message per shard on the sweep topic, each shard about
    SWEEP_SHARD_SIZE names by hash (``core.shards``). A redelivered trigger finds its record
    and publishes again only the shards not reported yet (a shard message delivered twice is
    harmless); a publish that fails raises, so that the trigger is redelivered. The
    coordinator also removes expired progress records, logging each incomplete one.

    One sharded sweep at a time: while another one is unfinished and younger than
    SWEEP_MAX_AGE_S, the trigger is acknowledged unrun (the deployed on_sweep once ran with
    max-instances 1 for the same reason: two sweeps at once do every write twice, and a backlog
    of them never catches up). The next trigger after it finishes, or expires, runs.
    """
    from core.errors import PermanentError, TransientError

    with logs.context(sweepId=sweep_id):
        try:
            store = rt.progress_store()
            running = _clean_up(rt, store, sweep_id)
            if running:
                return _busy(rt, running[-1], started)
            from functions.shards import count_external_services

            total = count_external_services(rt.kube())
        except (TransientError, PermanentError) as exc:
            return _sweep_failed(exc, started)
        shards = shard_count(total, rt.pipeline.sweep_shard_size)
        if shards == 1:
            return sweep_logged(rt, dry_run=False, started=started, sweep_id=sweep_id)
        try:
            record, created = store.start(sweep_id, shards, event_id)
        except TransientError as exc:
            _log(
                logging.ERROR,
                f"sweep {sweep_id}: cannot record its progress, raising for redelivery: {exc}",
                Delivered.TRANSIENT_ERROR,
                durationMs=_ms(started),
            )
            raise
        except PermanentError as exc:
            _log(
                logging.ERROR,
                f"sweep failed before reconciling anything: cannot record its progress: {exc}",
                Delivered.ERROR,
                durationMs=_ms(started),
            )
            return {"error": str(exc)}
        if record.done is not None:
            _log(
                logging.INFO,
                f"sweep {sweep_id}: trigger delivered again after the sweep finished; "
                "nothing to do",
                Delivered.DUPLICATE,
            )
            return {"sweepId": sweep_id, "shards": record.shards, "published": 0}
        messages = [
            ShardMessage(sweep_id, k, record.shards, record.started) for k in record.missing
        ]
        try:
            rt.publisher().publish(messages)
        except Exception as exc:
            _log(
                logging.ERROR,
                f"sweep {sweep_id}: publishing {len(messages)} shard message(s) failed, raising "
                f"for redelivery: {exc}",
                Delivered.TRANSIENT_ERROR,
                durationMs=_ms(started),
            )
            raise
        again = "" if created else " again (trigger redelivered)"
        _log(
            logging.INFO,
            f"sweep {sweep_id}: {total} ExternalService(s) in {record.shards} shards; published "
            f"{len(messages)} shard message(s){again}",
            Delivered.FANNED_OUT,
            externalServices=total,
            shards=record.shards,
            published=[m.shard for m in messages],
            durationMs=_ms(started),
        )
        return {
            "sweepId": sweep_id,
            "shards": record.shards,
            "externalServices": total,
            "published": len(messages),
        }


def _busy(rt: Runtime, record: Record, started: float) -> dict[str, Any]:
    age = (rt.clock() - record.started).total_seconds()
    _log(
        logging.INFO,
        f"sweep {record.sweep} is still running ({len(record.results)} of {record.shards} "
        f"shard(s) reported, started {age:.0f}s ago); this trigger is acknowledged unrun, a "
        "later one sweeps",
        Delivered.BUSY,
        runningSweepId=record.sweep,
        durationMs=_ms(started),
    )
    return {"busy": record.sweep}


def _clean_up(rt: Runtime, store: ProgressStore, current: str) -> list[Record]:
    """Remove expired progress records, logging each incomplete one with what it lacks; return
    the unfinished sharded sweeps still running (not ``current``). Never fails the sweep: a
    record left now is removed by a later one."""
    from core.errors import ReconcileError
    from functions.shards import SWEEP_MAX_AGE_S, merge

    try:
        expired, live = store.others(retention_s(rt), keep=current)
    except ReconcileError as exc:
        log.warning("cannot list sweep progress records: %s", exc)
        return []
    now = rt.clock()
    running = [
        r for r in live if r.done is None and (now - r.started).total_seconds() <= SWEEP_MAX_AGE_S
    ]
    for record in expired:
        if record.done is None:
            partial = merge(record.results, record.shards)
            finishing = (
                f"; shard {record.finish.shard} began its end but never finished it (DNS "
                "delivery and report)"
                if record.finish is not None
                else ""
            )
            _log(
                logging.WARNING,
                f"sweep {record.sweep} incomplete: {len(record.results)} of {record.shards} "
                f"shard(s) reported, missing {record.missing}{finishing}; the sweeps since "
                "have covered its part",
                Delivered.INCOMPLETE,
                incompleteSweepId=record.sweep,
                partial=partial,
            )
        try:
            store.remove(record)
        except ReconcileError as exc:
            log.warning("cannot remove sweep progress record %s: %s", record.sweep, exc)
    return running


def run_shard(rt: Runtime, shard: ShardMessage, started: float) -> dict[str, Any] | None:
    """Reconcile one shard's part of a sweep and record it; the shard that completes the set
    delivers DNS and logs the merged report (``finish_shard``).

    Acknowledged: stale (older than SWEEP_MAX_AGE_S since the fan-out: the sweep stays
    incomplete and the next sweep covers its part), a sweep with no record (finished and
    removed, or never started), a shard reported already (a redelivery: nothing is
    reconciled again), and refusals that a retry cannot change. Raised for redelivery:
    transient failures of the reconciler or of the progress record (the redelivery finds
    whether this shard got recorded).
    """
    from core.errors import PermanentError, TransientError
    from functions.shards import SWEEP_MAX_AGE_S, Recorded, new_token, summarize

    with logs.context(sweepId=shard.sweep, shard=shard.label):
        age = (rt.clock() - shard.time).total_seconds()
        if age > SWEEP_MAX_AGE_S:
            _log(
                logging.INFO,
                f"stale shard message acknowledged ({age:.0f}s old); sweep {shard.sweep} stays "
                "incomplete and the next sweep covers this part",
                Delivered.STALE,
            )
            return None
        if age < -MAX_CLOCK_SKEW_S:
            _log(
                logging.WARNING,
                f"malformed shard message acknowledged: time is {-age:.0f}s in the future",
                Delivered.MALFORMED,
                reason="time in the future",
            )
            return None
        try:
            store = rt.progress_store()
            record = store.load(shard.sweep)
        except PermanentError as exc:
            _log(logging.ERROR, f"shard {shard.label}: {exc}", Delivered.PERMANENT_ERROR)
            return None
        except TransientError as exc:
            _log(
                logging.ERROR,
                f"shard {shard.label}: transient failure, raising for redelivery: {exc}",
                Delivered.TRANSIENT_ERROR,
            )
            raise
        if record is None:
            _log(
                logging.INFO,
                f"shard message of sweep {shard.sweep} acknowledged: no progress record (the "
                "sweep finished and was cleaned up, or never started here)",
                Delivered.STALE,
            )
            return None
        if record.shards != shard.shards:
            reason = f"sweep {shard.sweep} has {record.shards} shards, not {shard.shards}"
            _log(
                logging.WARNING,
                f"malformed shard message acknowledged: {reason}",
                Delivered.MALFORMED,
                reason=reason,
            )
            return None
        if shard.shard in record.results:
            return _reported_already(rt, store, record, shard)
        token = new_token()
        t0 = time.monotonic()
        try:
            report = rt.shard_reconciler().sweep(
                only=lambda name: shard_of(name, shard.shards) == shard.shard, deliver=False
            )
        except (TransientError, PermanentError) as exc:
            retry = isinstance(exc, TransientError)
            _log(
                logging.ERROR,
                f"shard {shard.label} failed before reconciling anything"
                + (", raising for redelivery" if retry else "; the next sweep covers it")
                + f": {exc}",
                Delivered.TRANSIENT_ERROR if retry else Delivered.PERMANENT_ERROR,
                durationMs=_ms(t0),
            )
            if retry:
                raise
            return None
        _log_results(report, False)
        summary = summarize(report, _ms(started), token)
        try:
            state, after = store.record(shard.sweep, shard.shard, summary)
        except TransientError as exc:
            _log(
                logging.ERROR,
                f"shard {shard.label}: cannot record it, raising for redelivery: {exc}",
                Delivered.TRANSIENT_ERROR,
            )
            raise
        if state is Recorded.UNKNOWN or after is None:
            _log(
                logging.WARNING,
                f"shard {shard.label} done but its sweep's progress record is gone (expired); "
                "its part is reconciled, the sweep's report is lost",
                Delivered.STALE,
            )
            return None
        if state is Recorded.DUPLICATE:
            _log(
                logging.INFO,
                f"shard {shard.label} was reported by another delivery meanwhile; not counted "
                "again",
                Delivered.DUPLICATE,
            )
            return None
        level = logging.WARNING if summary["driftCount"] or summary["errorCount"] else logging.INFO
        _log(
            level,
            f"sweep {shard.sweep} shard {shard.label}: {summary['externalServices']} "
            f"ExternalService(s), {summary['driftCount']} drift change(s), {summary['pruned']} "
            f"orphan(s) pruned, {summary['errorCount']} error(s); {len(after.results)} of "
            f"{after.shards} shard(s) reported",
            Delivered.SWEPT_SHARD,
            outcomes=summary["outcomes"],
            drift=summary["drift"],
            errors=summary["errors"],
            pruned=summary["pruned"],
            externalServices=summary["externalServices"],
            shardsReported=len(after.results),
            durationMs=_ms(started),
        )
        if state is Recorded.COMPLETES:
            return finish_shard(rt, store, after, shard, token)
        return summary


def _reported_already(
    rt: Runtime, store: ProgressStore, record: Record, shard: ShardMessage
) -> dict[str, Any] | None:
    """A delivery of a shard reported already: nothing to do, unless it was the completing
    shard and its end was abandoned (then this delivery finishes the sweep)."""
    from core.errors import TransientError
    from functions.shards import FINISH_LEASE_S, new_token

    fin = record.finish
    if record.done is None and fin is not None and fin.shard == shard.shard:
        quiet_s = (rt.clock() - fin.since).total_seconds()
        if not fin.token or quiet_s > FINISH_LEASE_S:
            token = new_token()
            if store.take_over(record, shard.shard, token):
                _log(
                    logging.WARNING,
                    f"sweep {shard.sweep}: its end was left unfinished ({quiet_s:.0f}s); "
                    f"shard {shard.label} finishes it",
                    Delivered.SWEPT_SHARD,
                )
                return finish_shard(rt, store, record, shard, token)
        else:
            _log(
                logging.INFO,
                f"shard {shard.label}: the sweep's end is running in another delivery "
                f"({quiet_s:.0f}s so far); raising so that Pub/Sub asks again later",
                Delivered.TRANSIENT_ERROR,
            )
            raise TransientError(f"sweep {shard.sweep} is being finished by another delivery")
    _log(
        logging.INFO,
        f"shard {shard.label} already reported ({len(record.results)} of {record.shards}"
        f"{', sweep done' if record.done is not None else ''}); nothing done",
        Delivered.DUPLICATE,
    )
    return None


def finish_shard(
    rt: Runtime, store: ProgressStore, record: Record, shard: ShardMessage, token: str
) -> dict[str, Any]:
    """The end of a sharded sweep, run once by the delivery that completed its record: DNS
    delivered from live state after every shard reconciled its part, then the one merged
    report logged with the sweep id, then the record marked done.

    A failure raises for redelivery after releasing the claim, so that the next delivery of
    this shard finishes at once. If the instance dies instead, the claim's lease runs out and
    a redelivery takes over; DNS delivery is idempotent, and at worst (a death between the
    report line and ``done``) the report is logged twice under the same sweep id.
    """
    from core.errors import PermanentError, TransientError
    from functions.shards import merge

    t0 = time.monotonic()
    try:
        end = rt.shard_reconciler().finish_sweep()
    except (TransientError, PermanentError) as exc:
        _log(
            logging.ERROR,
            f"sweep {shard.sweep}: DNS delivery at its end failed, raising for redelivery: {exc}",
            Delivered.TRANSIENT_ERROR,
            durationMs=_ms(t0),
        )
        with contextlib.suppress(Exception):
            store.take_over(record, shard.shard, "")  # released: the next delivery finishes
        raise TransientError(f"end of sweep {shard.sweep}: {exc}") from exc
    merged = merge(record.results, record.shards, end.dns.to_dict() if end.dns else None)
    if end.errors:
        merged["errors"] = [*merged["errors"], *end.errors]
        merged["errorCount"] += len(end.errors)
    if end.access is not None:
        merged["access"] = end.access
    sweep_s = (rt.clock() - record.started).total_seconds()
    level = (
        logging.WARNING
        if merged["driftCount"] or merged["errorCount"] or merged["fightCount"]
        else logging.INFO
    )
    _log(
        level,
        f"sweep: {merged['externalServices']} ExternalService(s), {merged['driftCount']} drift "
        f"change(s), {merged['pruned']} orphan(s) pruned, {merged['errorCount']} error(s)"
        + (f", {merged['fightCount']} field manager fight(s)" if merged["fightCount"] else "")
        + f"; {record.shards} shards, sweep {shard.sweep} done in {sweep_s:.1f}s",
        Delivered.SWEPT,
        **{k: v for k, v in merged.items() if k not in ("missingShards", "shardsReported")},
        finishedBy=shard.shard,
        sweepSeconds=round(sweep_s, 3),
        dryRun=False,
        durationMs=_ms(t0),
    )
    counts = {
        k: merged[k] for k in ("externalServices", "driftCount", "pruned", "errorCount", "shards")
    }
    store.mark_done(record, {"by": shard.shard, "sweepSeconds": round(sweep_s, 3), **counts})
    return merged


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
            _log(level, f"repair: bad request: {reason}", Delivered.BAD_REQUEST, reason=reason)
            return _json({"error": reason}), 400, headers
        from core.errors import TransientError
        from reconcile.controller import Outcome

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
