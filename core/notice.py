"""The notice: the small JSON message the exporter publishes and the event function reads.

A notice names an ExternalService and says what happened; it never carries the spec, because
the function always reads live state (a notice may be late, duplicated or out of order). Both
sides use this module, so the format is defined once; decoding is strict and every refusal has
a reason fit for a log line, because a malformed message is acknowledged, never retried.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from core.names import DNS1123_SUBDOMAIN

VERSION = 1
# Topics for notices and sweep triggers, unless EGRESS_EVENTS_TOPIC/EGRESS_SWEEP_TOPIC say.
DEFAULT_EVENTS_TOPIC = "egress-events"
DEFAULT_SWEEP_TOPIC = "egress-sweep"


class NoticeKind(StrEnum):
    """Which object moved: the ExternalService itself, or its gateway Deployment (readiness)."""

    EXTERNAL_SERVICE = "ExternalService"
    DEPLOYMENT = "Deployment"


class EventType(StrEnum):
    """The watch event's type, or RELIST for every object found by a (re-)list."""

    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    RELIST = "RELIST"


class NoticeChange(StrEnum):
    """What happened to the object, as the exporter saw it."""

    CREATED = "created"  # first seen
    SPEC = "spec"  # generation moved
    DELETING = "deleting"  # deletionTimestamp set
    FINALIZERS = "finalizers"  # finalizers changed
    DELETED = "deleted"  # gone from the API
    READINESS = "readiness"  # gateway Deployment's ready replicas moved
    GATEWAY_DELETED = "gateway-deleted"  # the gateway Deployment was deleted (drift)
    RELIST = "relist"  # found by a list after start-up or a 410


FIELDS = frozenset({"v", "name", "kind", "change", "type", "resourceVersion", "time"})
_RV = re.compile(r"^[0-9]{1,20}$")


class Malformed(ValueError):
    """Input that can never be processed, however often it is retried; the text says why."""


class BadNotice(Malformed):
    """The message can never be processed; the text says why (it goes to the log)."""


@dataclass(frozen=True, slots=True)
class Notice:
    name: str
    kind: NoticeKind
    change: NoticeChange
    type: EventType
    resource_version: str
    time: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "name": self.name,
            "kind": str(self.kind),
            "change": str(self.change),
            "type": str(self.type),
            "resourceVersion": self.resource_version,
            "time": format_time(self.time),
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()

    def attributes(self) -> dict[str, str]:
        """Pub/Sub attributes: filterable without decoding the body."""
        return {"name": self.name, "change": str(self.change), "type": str(self.type)}


def format_time(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> dt.datetime:
    """An RFC 3339 time in UTC; OverflowError if UTC cannot hold it (year 1 east of Greenwich)."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("no time zone")
    return value.astimezone(dt.UTC)


def message_body(
    body: object, what: str, version: int, fields: frozenset[str], error: type[Malformed]
) -> dict[str, Any]:
    """A decoded message's JSON object: of ``version`` and holding exactly ``fields``."""
    if not isinstance(body, dict):
        raise error(f"{what} must be a JSON object, got {type(body).__name__}")
    got = body.get("v")
    if got != version or isinstance(got, bool):
        raise error(f"unsupported {what} version {got!r} (this function reads v{version})")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise error(f"unknown field(s) {', '.join(map(repr, unknown))}")
    missing = sorted(fields - set(body))
    if missing:
        raise error(f"missing field(s) {', '.join(map(repr, missing))}")
    return body


def message_time(text: str, error: type[Malformed]) -> dt.datetime:
    """A message's ``time`` field (``parse_time``), refused with ``error`` saying why."""
    try:
        return parse_time(text)
    except OverflowError:
        raise error(f"time {text[:40]!r} is out of range") from None
    except ValueError:
        raise error(f"time {text[:40]!r} is not an RFC 3339 timestamp") from None


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def preview(value: object, limit: int = 80) -> str:
    """A value taken from a message, as bounded JSON text for a refusal or a log line.

    Never the whole payload (it may be huge, or carry something that is not ours to log) and
    never an exception: a refusal that cannot be worded must still be a refusal.
    """
    try:
        return clip(json.dumps(value[: limit + 1] if isinstance(value, str) else value), limit)
    except (RecursionError, TypeError, ValueError):
        return f"<{type(value).__name__}>"


def load_json(
    data: bytes, what: str, error: type[Malformed] = Malformed, encoding: str = "utf-8"
) -> object:
    """JSON from untrusted bytes; every way it can fail raises ``error`` naming ``what``."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{what} is JSON nested too deeply") from None
    except ValueError as exc:
        # Also Python's limit on integer digits, which is not a JSON rule but is still a refusal.
        raise error(f"{what} is not JSON: {clip(str(exc), 120)}") from None


def valid_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 253 and bool(DNS1123_SUBDOMAIN.match(name))


def decode_data(raw: object, max_bytes: int) -> bytes:
    """The message body from the base64 text of a Pub/Sub message (push body or CloudEvent)."""
    if raw is None:
        raise BadNotice("message has no data")
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode("ascii", errors="replace")
    if not isinstance(raw, str):
        raise BadNotice(f"message data must be base64 text, got {type(raw).__name__}")
    # base64 grows 4/3: refuse before decoding anything huge.
    if len(raw) > (max_bytes * 4) // 3 + 4:
        raise BadNotice(f"message is larger than {max_bytes} bytes ({len(raw) * 3 // 4} bytes)")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadNotice(f"message data is not valid base64: {exc}") from None
    if len(data) > max_bytes:
        raise BadNotice(f"message is larger than {max_bytes} bytes ({len(data)} bytes)")
    return data


def parse_notice(data: bytes) -> Notice:
    """Decode and validate a notice body; raises BadNotice with the reason."""
    if not data:
        raise BadNotice("message data is empty")
    body = message_body(
        load_json(data, "message data", BadNotice), "notice", VERSION, FIELDS, BadNotice
    )
    for key in FIELDS - {"v"}:
        if not isinstance(body[key], str):
            raise BadNotice(f"field {key!r} must be a string, got {type(body[key]).__name__}")
    name = body["name"]
    if not valid_name(name):
        raise BadNotice(f"name {name[:80]!r} is not a Kubernetes object name")
    if body["kind"] not in set(NoticeKind):
        raise BadNotice(f"kind {body['kind'][:40]!r} is not one of {_one_of(NoticeKind)}")
    if body["type"] not in set(EventType):
        raise BadNotice(f"type {body['type'][:40]!r} is not one of {_one_of(EventType)}")
    if body["change"] not in set(NoticeChange):
        raise BadNotice(f"change {body['change'][:40]!r} is not a known change")
    if not _RV.match(body["resourceVersion"]):
        raise BadNotice(f"resourceVersion {body['resourceVersion'][:40]!r} is not a number")
    when = message_time(body["time"], BadNotice)
    return Notice(
        name,
        NoticeKind(body["kind"]),
        NoticeChange(body["change"]),
        EventType(body["type"]),
        body["resourceVersion"],
        when,
    )


def _one_of(values: type[StrEnum]) -> str:
    return ", ".join(sorted(str(v) for v in values))
