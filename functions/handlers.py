"""What each Cloud Function does with its trigger; ``main.py`` only routes to these.

Acknowledge or retry is the one decision every handler makes, and Pub/Sub reads it from the
HTTP status: return (2xx) acknowledges, raise (500) asks for redelivery. So:

- malformed, oversized, unknown-name, invalid-spec and forbidden are *permanent*: logged with
  the reason and acknowledged, since a retry would fail the same way forever;
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
from typing import Any

from functions import logs
from functions.notice import BadNotice, Notice, decode_data, parse_notice, valid_name
from functions.settings import MAX_CLOCK_SKEW_S, PipelineSettings
from reconcile.settings import Settings

log = logs.get("functions")

ApiClientFactory = Callable[[], Any]


@dataclass
class Runtime:
    """Per-instance state: settings (read once at start-up) and the lazily built reconcilers."""

    settings: Settings
    pipeline: PipelineSettings
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    api_client_factory: ApiClientFactory | None = None
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    sleep: Callable[[float], None] = time.sleep
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _kube: Any = None
    _reconcilers: dict[bool, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Runtime:
        """Read every setting now, so that a bad one stops start-up with its name."""
        pipeline = PipelineSettings.from_env(env)
        logs.setup(pipeline.project)
        return cls(Settings.from_env(env), pipeline, env=dict(env))

    def kube(self) -> Any:
        with self._lock:
            if self._kube is None:
                from functions.credentials import api_client
                from reconcile.kube import Kube

                factory = self.api_client_factory or (lambda: api_client(self.pipeline, self.env))
                self._kube = Kube(factory())
            return self._kube

    def reconciler(self, dry_run: bool = False) -> Any:
        kube = self.kube()
        with self._lock:
            if dry_run not in self._reconcilers:
                from reconcile.app import build_reconciler

                self._reconcilers[dry_run] = build_reconciler(
                    kube.with_dry_run(True) if dry_run else kube, self.settings
                )
            return self._reconcilers[dry_run]


# -- the events topic -----------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """What a CloudEvent from Pub/Sub (Eventarc, or functions-framework's push conversion) says."""

    event_id: str
    published: dt.datetime | None
    data: object
    attributes: dict[str, Any]
    trace: str
    span: str | None


def delivery_of(event: Any) -> Delivery:
    """Unwrap the Pub/Sub message of a CloudEvent; raises BadNotice if it is not one."""
    event_id = str(_attr(event, "id") or "")
    published = None
    raw_time = _attr(event, "time")
    if raw_time:
        try:
            published = dt.datetime.fromisoformat(str(raw_time).replace("Z", "+00:00"))
        except ValueError:
            published = None
    payload = getattr(event, "data", None)
    message = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(message, dict):
        raise BadNotice("CloudEvent data is not a Pub/Sub message ({'message': {...}})")
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise BadNotice("message attributes are not a map")
    trace, span = logs.trace_from(
        str(_attr(event, "traceparent") or attributes.get("traceparent") or "") or None
    )
    if not trace:
        # No trace propagated: derive a stable one from the message id, so every line of one
        # delivery (and of its redeliveries) groups together.
        import hashlib

        trace = hashlib.sha256(f"pubsub:{event_id}".encode()).hexdigest()[:32]
    return Delivery(event_id, published, message.get("data"), attributes, trace, span)


def _attr(event: Any, name: str) -> Any:
    try:
        return event[name]
    except (KeyError, TypeError):
        getter = getattr(event, "get", None)
        return getter(name) if callable(getter) else None


def handle_event(rt: Runtime, event: Any) -> None:
    """Reconcile the ExternalService a notice names; see the module docstring for ack/retry."""
    started = time.monotonic()
    try:
        delivery = delivery_of(event)
    except BadNotice as exc:
        logs.log(log, logging.WARNING, f"malformed event acknowledged: {exc}", outcome="malformed")
        return
    with logs.context(
        function="event", eventId=delivery.event_id, trace=delivery.trace, spanId=delivery.span
    ):
        try:
            notice = parse_notice(decode_data(delivery.data, rt.pipeline.max_notice_bytes))
            attr_name = delivery.attributes.get("name")
            if attr_name is not None and attr_name != notice.name:
                raise BadNotice(
                    f"attribute name {str(attr_name)[:80]!r} does not match notice name "
                    f"{notice.name!r}"
                )
        except BadNotice as exc:
            logs.log(
                log,
                logging.WARNING,
                f"malformed notice acknowledged: {exc}",
                outcome="malformed",
                reason=str(exc),
            )
            return
        with logs.context(externalService=notice.name):
            age = (rt.clock() - notice.time).total_seconds()
            if age > rt.pipeline.max_event_age_s:
                logs.log(
                    log,
                    logging.INFO,
                    f"stale notice acknowledged ({age:.0f}s old, limit "
                    f"{rt.pipeline.max_event_age_s}s); the sweep covers it",
                    outcome="stale",
                    ageSeconds=round(age, 1),
                    notice=notice.to_json(),
                )
                return
            if age < -MAX_CLOCK_SKEW_S:
                logs.log(
                    log,
                    logging.WARNING,
                    f"malformed notice acknowledged: time is {-age:.0f}s in the future",
                    outcome="malformed",
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
    from reconcile.errors import PermanentError, TransientError

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
    except TransientError as exc:
        logs.log(
            log,
            logging.ERROR,
            f"reconcile {name}: transient failure, raising for redelivery: {exc}",
            outcome="transient-error",
            durationMs=_ms(t0),
            **extra,
        )
        raise
    except PermanentError as exc:
        logs.log(
            log,
            logging.ERROR,
            f"reconcile {name}: permanent failure, acknowledged: {exc}",
            outcome="permanent-error",
            durationMs=_ms(t0),
            **extra,
        )
        return {"name": name, "outcome": "permanent-error", "message": str(exc)}
    except Exception as exc:
        logs.log(
            log,
            logging.ERROR,
            f"reconcile {name}: unexpected {type(exc).__name__}, raising for redelivery",
            outcome="error",
            durationMs=_ms(t0),
            **extra,
        )
        log.exception("unexpected error")
        raise
    report: dict[str, Any] = dict(result.to_dict())
    level = logging.INFO
    if result.outcome in (Outcome.INVALID, Outcome.CONFLICT):
        level = logging.WARNING
    summary = ", ".join(f"{ch.action} {ch.kind}" for ch in result.changes) or "no changes"
    text = f"reconcile {name}: {result.outcome} ({summary})"
    if result.message:
        text += f": {result.message}"
    logs.log(
        log,
        level,
        text,
        outcome=result.outcome,
        changes=report["changes"],
        hijackState=result.hijack_state,
        durationMs=_ms(t0),
        **extra,
    )
    return report


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)


# -- the sweep topic (Cloud Scheduler) ------------------------------------------------------


def handle_sweep(rt: Runtime, event: Any) -> dict[str, Any] | None:
    """Reconcile everything, prune orphans, log the drift. Always acknowledges.

    Failures of single objects are in the report (the next sweep retries them); a redelivery
    would only run a second full sweep.
    """
    started = time.monotonic()
    event_id = str(_attr(event, "id") or "")
    trace, span = logs.trace_from(str(_attr(event, "traceparent") or "") or None)
    with logs.context(function="sweep", eventId=event_id, trace=trace or None, spanId=span):
        raw_time = _attr(event, "time")
        if raw_time:
            try:
                when = dt.datetime.fromisoformat(str(raw_time).replace("Z", "+00:00"))
                age = (rt.clock() - when).total_seconds()
                if age > rt.pipeline.max_event_age_s:
                    logs.log(
                        log,
                        logging.INFO,
                        f"stale sweep trigger acknowledged ({age:.0f}s old); the next one runs",
                        outcome="stale",
                    )
                    return None
            except (TypeError, ValueError):
                pass
        return sweep_logged(rt, dry_run=False, started=started)


def sweep_logged(rt: Runtime, *, dry_run: bool, started: float | None = None) -> dict[str, Any]:
    from reconcile.errors import PermanentError, TransientError

    t0 = started if started is not None else time.monotonic()
    try:
        report = rt.reconciler(dry_run).sweep()
    except (TransientError, PermanentError) as exc:
        logs.log(
            log,
            logging.ERROR,
            f"sweep failed before reconciling anything: {exc}",
            outcome="error",
            durationMs=_ms(t0),
        )
        return {"error": str(exc)}
    out: dict[str, Any] = dict(report.to_dict())
    for result in report.results:
        if result.changes or result.outcome not in ("in-sync",):
            with logs.context(externalService=result.name):
                logs.log(
                    log,
                    logging.WARNING if result.changes else logging.INFO,
                    f"sweep: {result.name}: {result.outcome}"
                    + (f" (drift: {len(result.changes)} change(s))" if result.changes else ""),
                    outcome=result.outcome,
                    changes=[ch.to_dict() for ch in result.changes],
                    dryRun=dry_run,
                )
    level = logging.WARNING if out["drift"] or out["errors"] else logging.INFO
    logs.log(
        log,
        level,
        f"sweep: {out['externalServices']} ExternalService(s), {len(out['drift'])} drift "
        f"change(s), {len(report.pruned)} orphan(s) pruned, {len(out['errors'])} error(s)",
        outcome="swept",
        outcomes=out["outcomes"],
        drift=out["drift"],
        errors=out["errors"],
        dryRun=dry_run,
        durationMs=_ms(t0),
    )
    return out


# -- repair over HTTP -----------------------------------------------------------------------


class BadRequest(ValueError):
    pass


def parse_repair_body(raw: bytes, content_type: str | None) -> tuple[str | None, bool]:
    """``{"name": optional string, "dryRun": optional bool}``; raises BadRequest with why."""
    if not raw.strip():
        return None, False
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest('body must be a JSON object like {"name": "google", "dryRun": true}')
    unknown = sorted(set(body) - {"name", "dryRun"})
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: 'name', 'dryRun'"
        )
    name = body.get("name")
    if name is not None and not valid_name(name):
        raise BadRequest(f"name must be an ExternalService name, got {json.dumps(name)[:80]}")
    dry_run = body.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise BadRequest(f"dryRun must be true or false, got {json.dumps(dry_run)[:40]}")
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
        try:
            name, dry_run = parse_repair_body(request.get_data(), request.content_type)
        except BadRequest as exc:
            logs.log(log, logging.WARNING, f"repair: bad request: {exc}", outcome="bad-request")
            return _json({"error": str(exc)}), 400, headers
        from reconcile.errors import TransientError

        try:
            if name is None:
                report = sweep_logged(rt, dry_run=dry_run)
                status = 503 if "error" in report else 200
                return _json({"dryRun": dry_run, "sweep": report}), status, headers
            with logs.context(externalService=name):
                result = reconcile_logged(rt, name, dry_run=dry_run)
        except TransientError as exc:
            return _json({"error": f"transient: {exc}", "retry": True}), 503, headers
        status = 404 if result.get("outcome") == "not-found" else 200
        return _json({"dryRun": dry_run, "result": result}), status, headers


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"
