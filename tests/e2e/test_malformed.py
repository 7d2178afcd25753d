"""Malformed and stale messages, through Pub/Sub and the functions: each one is acknowledged
(never redelivered), explained by one clear log line, and does no harm.

Acknowledgement is proven with ordering: every bad message is published on one ordering key and
followed by a valid sentinel on the same key; Pub/Sub delivers the sentinel only after every
earlier message on the key was acknowledged.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from core import constants as c
from core.kube import EXTERNAL_SERVICE, Kube, api_client_from_kubeconfig
from core.notice import Notice
from egressctl.pipeline import EVENT_FUNCTION, LocalPipeline
from tests.conftest import DevStack
from tests.e2e.helpers import fingerprint, log_entries, log_size
from tests.integration.helpers import children, create_es, eventually, external_service, purge

pytestmark = pytest.mark.cluster


def _body(**overrides: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    body: dict[str, Any] = {
        "v": 1,
        "name": "placeholder",
        "kind": "ExternalService",
        "change": "spec",
        "type": "MODIFIED",
        "resourceVersion": "7",
        "time": now.isoformat().replace("+00:00", "Z"),
    }
    for key, value in overrides.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _when(seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


# (case, data, attributes, expected outcome, text expected in the log message)
def cases(target: str, ghost: str) -> list[tuple[str, bytes, dict[str, str], str, str]]:
    return [
        ("not-json", b"not json at all", {}, "malformed", "not JSON"),
        ("empty", b"", {"name": target}, "malformed", "empty"),
        ("not-utf8", b"\xff\xfe\x00\x01", {}, "malformed", "not UTF-8"),
        ("json-array", b"[1, 2, 3]", {}, "malformed", "JSON object"),
        ("json-string", b'"google"', {}, "malformed", "JSON object"),
        ("missing-name", _j(_body(name=...)), {}, "malformed", "missing field(s) 'name'"),
        ("name-int", _j(_body(name=123)), {}, "malformed", "'name' must be a string"),
        ("name-invalid", _j(_body(name="Bad_Name!")), {}, "malformed", "not a Kubernetes"),
        ("name-too-long", _j(_body(name="a" * 300)), {}, "malformed", "not a Kubernetes"),
        ("unknown-field", _j(_body(name=target, spec={"x": 1})), {}, "malformed", "unknown field"),
        ("huge", _j(_body(name=target, pad="x" * 65536)), {}, "malformed", "larger than"),
        ("rv-int", _j(_body(name=target, resourceVersion=7)), {}, "malformed", "must be a string"),
        ("rv-text", _j(_body(name=target, resourceVersion="abc")), {}, "malformed", "not a number"),
        ("bad-time", _j(_body(name=target, time="yesterday")), {}, "malformed", "RFC 3339"),
        ("stale", _j(_body(name=target, time=_when(-7200))), {}, "stale", "stale notice"),
        ("future", _j(_body(name=target, time=_when(86400))), {}, "malformed", "future"),
        ("bad-type", _j(_body(name=target, type="EXPLODED")), {}, "malformed", "type 'EXPLODED'"),
        ("bad-change", _j(_body(name=target, change="vibes")), {}, "malformed", "known change"),
        ("version-2", _j(_body(name=target, v=2)), {}, "malformed", "unsupported notice version"),
        ("no-version", _j(_body(name=target, v=...)), {}, "malformed", "unsupported notice"),
        ("bool-version", _j(_body(name=target, v=True)), {}, "malformed", "unsupported notice"),
        ("null-body", b"null", {}, "malformed", "JSON object"),
        ("attr-mismatch", _j(_body(name=target)), {"name": ghost}, "malformed", "does not match"),
        ("unknown-name", _j(_body(name=ghost)), {"name": ghost}, "not-found", "not-found"),
    ]


def test_malformed_and_stale_messages_are_acknowledged_with_a_clear_log_line(
    pipeline: LocalPipeline, dev_stack: DevStack, unique: str
) -> None:
    admin = Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))
    target, ghost = f"mal-{unique}", f"ghost-{unique}"
    create_es(admin, external_service(target))
    try:
        eventually(
            lambda: (admin.get(EXTERNAL_SERVICE, target) or {}).get("status", {}).get("clusterIP"),
            30,
            "the target to converge",
        )
        before = fingerprint(children(admin, target))
        log = pipeline.log_path(EVENT_FUNCTION)
        since = log_size(log)
        key = f"malformed-{unique}"
        sent: dict[str, tuple[str, str, str]] = {}
        matrix = cases(target, ghost)
        assert len(matrix) >= 15
        for case, data, attributes, outcome, text in matrix:
            message_id = pipeline.publish("egress-events", data, key, **attributes)
            sent[message_id] = (case, outcome, text)
        sentinel = Notice(target, c.KIND, "spec", "MODIFIED", "8", dt.datetime.now(dt.UTC))
        sentinel_id = pipeline.publish("egress-events", sentinel.encode(), key, name=target)

        def by_event() -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = {}
            for entry in log_entries(log, since):
                out.setdefault(str(entry.get("eventId")), []).append(entry)
            return out

        lines = eventually(
            lambda: (found := by_event()) and sentinel_id in found and found,
            60,
            "the sentinel behind every bad message (so all were acknowledged)",
        )
        for message_id, (case, outcome, text) in sent.items():
            entries = [e for e in lines.get(message_id, []) if "outcome" in e]
            assert len(entries) == 1, f"{case}: expected one line, got {entries}"
            entry = entries[0]
            assert entry["outcome"] == outcome, (case, entry)
            assert text in entry["message"], (case, entry["message"])
            assert entry["severity"] in ("INFO", "WARNING"), (case, entry)
            assert "logging.googleapis.com/trace" in entry, (case, entry)
        assert [e["outcome"] for e in lines[sentinel_id] if "outcome" in e] == ["in-sync"]
        # No harm: nothing was written for the target, nothing created for the ghost.
        after = fingerprint(children(admin, target))
        assert after == before
        assert admin.get(EXTERNAL_SERVICE, ghost) is None and children(admin, ghost) == {}
    finally:
        purge(admin, target)


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_messages_pubsub_cannot_carry_are_acknowledged_too(
    pipeline: LocalPipeline, unique: str
) -> None:
    """Bad base64 and non-Pub/Sub CloudEvents cannot be published; post them as a push would."""
    url = pipeline.url(EVENT_FUNCTION)
    log = pipeline.log_path(EVENT_FUNCTION)
    since = log_size(log)
    push = {
        "subscription": "projects/egress-dev/subscriptions/egress-events-push",
        "message": {"data": "!!not*base64", "messageId": f"b64-{unique}", "attributes": {}},
    }
    assert _post(url, _j(push), {"Content-Type": "application/json"}) == 200
    oversize = base64.b64encode(b"x" * 1_000_000).decode()
    push["message"] = {"data": oversize, "messageId": f"big-{unique}", "attributes": {}}
    assert _post(url, _j(push), {"Content-Type": "application/json"}) == 200
    ce_headers = {
        "Content-Type": "application/json",
        "ce-id": f"ce-{unique}",
        "ce-source": "//example/test",
        "ce-type": "example.test",
        "ce-specversion": "1.0",
    }
    assert _post(url, _j({"hello": "world"}), ce_headers) == 200

    def lines() -> dict[str, str] | None:
        found = {
            str(e.get("eventId")): e["message"]
            for e in log_entries(log, since)
            if e.get("outcome") == "malformed"
        }
        wanted = (f"b64-{unique}", f"big-{unique}")
        return found if all(w in found for w in wanted) else None

    found = eventually(lines, 10, "log lines for the posted messages")
    assert "not valid base64" in found[f"b64-{unique}"]
    assert "larger than" in found[f"big-{unique}"]
    assert any(
        "not a Pub/Sub message" in e["message"]
        for e in log_entries(log, since)
        if e.get("outcome") == "malformed"
    )
