"""The functions' handlers on input they cannot parse: always acknowledged, never retried.

Pub/Sub redelivers whatever ends in a 500 until the dead-letter topic takes it, so a message
that can never be parsed must end in one structured log line and a 2xx, and a repair body that
cannot be parsed in a 400; only failures of the reconciler itself may still raise. The handlers
run with a reconciler double (the Kubernetes side is not under test here: the integration and
e2e suites cover it) that records every call, so a malformed message that reached the reconciler
fails the test. The Google side is real: CloudEvents from the ``cloudevents`` package, requests
from Werkzeug, and ``main.py`` served by functions-framework's own app.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloudevents.http import CloudEvent
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from core import logs
from core.errors import TransientError
from core.notice import FIELDS, Notice, format_time
from functions.handlers import (
    MAX_REPAIR_BODY_BYTES,
    handle_event,
    handle_repair,
    handle_sweep,
)
from reconcile.results import Outcome
from tests.unit.stubs import (
    NOW,
    StubReconciler,
    StubRuntime,
    captured,
    outcome_lines,
    stub_runtime,
)

REPO = Path(__file__).resolve().parents[2]
# A refusal quotes a few hundred characters of the input at most, however large it is.
MAX_LINE_CHARS = 2000


def runtime(fail: Exception | None = None) -> StubRuntime:
    return stub_runtime(StubReconciler(fail=fail))


def outcomes(stream: io.StringIO) -> list[dict[str, Any]]:
    return outcome_lines(stream, max_chars=MAX_LINE_CHARS)


def notice_body(**overrides: Any) -> dict[str, Any]:
    body = Notice("google", "ExternalService", "spec", "MODIFIED", "7", NOW).to_json()
    body.update(overrides)
    return body


def j(value: Any) -> bytes:
    return json.dumps(value).encode()


def pubsub_event(data: object, attributes: object = None, **ce: object) -> CloudEvent:
    """A CloudEvent as functions-framework makes it from a Pub/Sub push (or Eventarc sends it).

    ``data`` bytes are base64-encoded like Pub/Sub does; anything else is put as is.
    """
    raw = base64.b64encode(data).decode() if isinstance(data, bytes) else data
    message: dict[str, object] = {"data": raw, "messageId": "17", "attributes": attributes or {}}
    return cloud_event({"message": message, "subscription": "projects/p/subscriptions/s"}, **ce)


def cloud_event(data: object, **ce: object) -> CloudEvent:
    attributes: dict[str, Any] = {
        "id": "17",
        "type": "google.cloud.pubsub.topic.v1.messagePublished",
        "source": "//pubsub.googleapis.com/projects/p/topics/egress-events",
        "time": format_time(NOW),
        **ce,
    }
    return CloudEvent(attributes, data)


def repair_request(body: bytes, **headers: str) -> Request:
    environ = EnvironBuilder(
        method="POST", data=body, content_type="application/json", headers=list(headers.items())
    )
    return environ.get_request()


def assert_acknowledged_malformed(rt: StubRuntime, stream: io.StringIO, reason: str) -> None:
    [entry] = outcomes(stream)
    assert entry["outcome"] == "malformed", entry
    assert entry["severity"] == "WARNING", entry
    assert reason in entry["reason"] and reason in entry["message"], entry
    assert entry["function"] == "event" and "logging.googleapis.com/trace" in entry, entry
    assert rt.stub.calls == []


# -- reproductions: each used to raise (500, redelivered, dead-lettered) -------------------

DEEP = [
    pytest.param(b"[" * 4000, id="array-4000-deep"),
    pytest.param(b'{"a":[' * 680, id="objects-and-arrays-1360-deep"),
    pytest.param(b"[" * 2000 + b"]" * 2000, id="closed-array-2000-deep"),
]
OUT_OF_RANGE_TIMES = [
    pytest.param("0001-01-01T00:00:00+01:00", "out of range", id="year-1-east"),
    pytest.param("9999-12-31T23:59:59-01:00", "out of range", id="year-9999-west"),
    pytest.param("99999-01-01T00:00:00Z", "RFC 3339", id="year-99999"),
    pytest.param("1" * 30, "RFC 3339", id="epoch-number-as-text"),
    pytest.param("0000-01-01T00:00:00Z", "RFC 3339", id="year-0"),
]


@pytest.mark.parametrize("data", DEEP)
def test_deeply_nested_notice_is_acknowledged(data: bytes) -> None:
    rt = runtime()
    with captured() as stream:
        handle_event(rt, pubsub_event(data))
    assert_acknowledged_malformed(rt, stream, "nested too deeply")


@pytest.mark.parametrize(("when", "reason"), OUT_OF_RANGE_TIMES)
def test_out_of_range_notice_time_is_acknowledged(when: str, reason: str) -> None:
    rt = runtime()
    with captured() as stream:
        handle_event(rt, pubsub_event(j(notice_body(time=when))))
    assert_acknowledged_malformed(rt, stream, reason)


def test_extreme_but_representable_times_are_stale_or_future() -> None:
    rt = runtime()
    for when, outcome in [("0001-01-01T00:00:00Z", "stale"), ("9999-12-31T23:59:59Z", "malformed")]:
        with captured() as stream:
            handle_event(rt, pubsub_event(j(notice_body(time=when))))
        assert [e["outcome"] for e in outcomes(stream)] == [outcome]
    assert rt.stub.calls == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe\x00\x01", "not UTF-8"),
        ('{"v": 1}'.encode("utf-16"), "not UTF-8"),
        (b"\x00" * 64, "not JSON"),
        (b"[]", "JSON object"),
        (b"null", "JSON object"),
        (b"12", "JSON object"),
        (b'"google"', "JSON object"),
        (b"NaN", "JSON object"),
    ],
)
def test_binary_and_non_object_notices_are_acknowledged(data: bytes, reason: str) -> None:
    rt = runtime()
    with captured() as stream:
        handle_event(rt, pubsub_event(data))
    assert_acknowledged_malformed(rt, stream, reason)


WRONG_VALUES: list[object] = [None, True, 7, 1.5, [], {}, ["google"], {"name": "google"}]


@pytest.mark.parametrize("key", sorted(FIELDS))
@pytest.mark.parametrize("value", WRONG_VALUES, ids=lambda v: type(v).__name__ + json.dumps(v))
def test_every_field_of_the_wrong_type_is_acknowledged(key: str, value: object) -> None:
    rt = runtime()
    with captured() as stream:
        handle_event(rt, pubsub_event(j(notice_body(**{key: value}))))
    reason = "unsupported notice version" if key == "v" else f"{key!r} must be a string"
    assert_acknowledged_malformed(rt, stream, reason)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (cloud_event(None), "not a Pub/Sub message"),
        (cloud_event(b"\xff" * 10), "not a Pub/Sub message"),
        (cloud_event([[[[]]]]), "not a Pub/Sub message"),
        (cloud_event({"message": "x"}), "not a Pub/Sub message"),
        (pubsub_event(b"{}", attributes=["name"]), "attributes are not a map"),
        (pubsub_event(7), "must be base64 text"),
        (pubsub_event({"nested": [1]}), "must be base64 text"),
        (pubsub_event("%%%"), "not valid base64"),
        (pubsub_event(j(notice_body()), attributes={"name": [[1]] * 50}), "does not match"),
        (pubsub_event(j(notice_body()), attributes={"name": "x" * 100_000}), "does not match"),
    ],
)
def test_envelopes_that_carry_no_notice_are_acknowledged(event: CloudEvent, reason: str) -> None:
    rt = runtime()
    with captured() as stream:
        handle_event(rt, event)
    assert_acknowledged_malformed(rt, stream, reason)


HOSTILE_ATTRIBUTES: list[dict[str, object]] = [
    {"id": 10**5000},  # str() of it raises ValueError
    {"id": [[[[1]]]] * 1000},
    {"id": "9" * 100_000},
    {"traceparent": {"a": 1}},
    {"time": "0001-01-01T00:00:00+01:00"},
    {"time": 10**5000},
    {"time": "9999-12-31T23:59:59-01:00", "traceparent": 10**5000},
]


@pytest.mark.parametrize("attributes", HOSTILE_ATTRIBUTES, ids=lambda a: ",".join(a))
def test_hostile_cloudevent_attributes_are_logged_bounded(attributes: dict[str, object]) -> None:
    rt = runtime()
    with captured() as stream:
        handle_event(rt, pubsub_event(b"nope", **attributes))
    assert_acknowledged_malformed(rt, stream, "not JSON")
    rt = runtime()
    with captured() as stream:
        handle_sweep(rt, cloud_event({"message": {}}, **attributes))
    assert [e["outcome"] for e in outcomes(stream)] == ["swept"]
    assert rt.stub.calls == ["*sweep*"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 60_000, "nested too deeply"),
        (b'{"name":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"name":' + b"[" * 200 + b"]" * 200 + b"}", "name must be"),
        (b"[" * 100_000, "larger than"),
        (b"\xff\xfe\x00", "not UTF-8"),
        ('{"name": "google"}'.encode("utf-16"), "not UTF-8"),
        (b'{"dryRun": ' + b"9" * 5000 + b"}", "not JSON"),
        (b'{"dryRun": 1e999}', "dryRun must be"),
        (b'{"dryRun": null}', "dryRun must be"),
        (b'{"name": 5}', "name must be"),
        (b'{"name": {"a": "b"}}', "name must be"),
        (b'{"name": "' + b"a" * 50_000 + b'"}', "name must be"),
        (j({f"k{i}": i for i in range(2000)}), "and 1995 more"),
        (b"[1]", "JSON object"),
        (b"null", "JSON object"),
    ],
)
def test_repair_bodies_that_cannot_be_parsed_are_400(body: bytes, reason: str) -> None:
    rt = runtime()
    with captured() as stream:
        text, status, headers = handle_repair(rt, repair_request(body))
    assert status == 400, text
    assert headers["Content-Type"] == "application/json"
    assert reason in json.loads(text)["error"] and len(text) < 1000, text
    [entry] = outcomes(stream)
    assert entry["outcome"] == "bad-request" and entry["severity"] == "WARNING", entry
    assert reason in entry["reason"], entry
    assert rt.stub.calls == []


def test_repair_accepts_a_byte_order_mark() -> None:
    rt = runtime()
    with captured():
        _, status, _ = handle_repair(rt, repair_request(b'\xef\xbb\xbf{"name": "google"}'))
    assert status == 200 and rt.stub.calls == ["google"]


def test_reconciler_failures_still_raise_for_redelivery() -> None:
    """Only parsing is acknowledged: a failing reconcile of a good notice still asks for a retry."""
    for failure in (TransientError("apiserver 503", 503), RuntimeError("bug")):
        rt = runtime(fail=failure)
        with captured() as stream, pytest.raises(type(failure)):
            handle_event(rt, pubsub_event(j(notice_body())))
        assert rt.stub.calls == ["google"]
        assert [e["outcome"] for e in outcomes(stream)] in (["transient-error"], ["error"])
    rt = runtime(fail=TransientError("apiserver 503", 503))
    with captured():
        _, status, _ = handle_repair(rt, repair_request(b'{"name": "google"}'))
    assert status == 503


# -- through functions-framework: what Pub/Sub and the caller actually see ----------------


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, tuple[FlaskClient, StubRuntime]]]:
    """``main.py``'s entry points in functions-framework's app, each with a recording runtime."""
    import functions_framework

    create_app: Any = functions_framework.create_app
    logger = logging.getLogger(logs.LOGGER_NAME)
    handlers, path = list(logger.handlers), list(sys.path)
    clients: dict[str, tuple[FlaskClient, StubRuntime]] = {}
    try:
        for target in ("on_event", "repair"):
            app = create_app(target, str(REPO / "main.py"))
            rt = runtime()
            main: Any = sys.modules["main"]  # this app's own copy of main.py
            main.RUNTIME = rt
            clients[target] = (app.test_client(), rt)
        yield clients
    finally:
        sys.modules.pop("main", None)
        sys.path[:] = path
        logger.handlers[:] = handlers  # main.py's logs.setup pointed them at stdout


def push(data: bytes) -> dict[str, object]:
    message = {"data": base64.b64encode(data).decode(), "messageId": "5", "attributes": {}}
    return {"message": message, "subscription": "projects/p/subscriptions/egress-events-push"}


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 4000,
        j(notice_body(time="0001-01-01T00:00:00+01:00")),
        b"\xff\xfe\x00\x01",
        j(notice_body(name=["google"])),
    ],
    ids=["deep", "time-out-of-range", "binary", "name-list"],
)
def test_malformed_pushes_are_answered_2xx(
    served: dict[str, tuple[FlaskClient, StubRuntime]], data: bytes
) -> None:
    client, rt = served["on_event"]
    with captured() as stream:
        response = client.post("/", json=push(data))
    assert response.status_code == 200, response.data
    assert [e["outcome"] for e in outcomes(stream)] == ["malformed"]
    assert rt.stub.calls == []


def test_a_transient_failure_is_still_answered_500(
    served: dict[str, tuple[FlaskClient, StubRuntime]],
) -> None:
    client, rt = served["on_event"]
    rt.stub.fail = TransientError("apiserver 503", 503)
    try:
        with captured():
            response = client.post("/", json=push(j(notice_body(time=format_time(NOW)))))
    finally:
        rt.stub.fail = None
    assert response.status_code == 500


def test_deep_repair_body_is_answered_400(
    served: dict[str, tuple[FlaskClient, StubRuntime]],
) -> None:
    client, rt = served["repair"]
    with captured():
        response = client.post("/", data=b"[" * 60_000, content_type="application/json")
    assert response.status_code == 400
    assert "nested too deeply" in response.get_json()["error"]
    assert rt.stub.calls == []


# -- fuzz -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


hostile_values = st.one_of(
    st.integers(4400, 5000).map(lambda n: 10**n),  # more digits than str() will write
    st.integers(1, 3000).map(nested),
    st.integers(1000, 50_000).map(lambda n: "x" * n),
    st.binary(max_size=8),
)
attribute_values = st.none() | st.text(max_size=60) | json_values | hostile_values
offsets = st.timedeltas(-dt.timedelta(hours=23, minutes=59), dt.timedelta(hours=23, minutes=59))
any_times = st.datetimes(
    min_value=dt.datetime(1, 1, 1), timezones=st.builds(dt.timezone, offsets)
).map(dt.datetime.isoformat)
near_times = st.integers(-900, 900).map(lambda s: format_time(NOW + dt.timedelta(seconds=s)))
deep = st.integers(1, 5000).flatmap(
    lambda n: st.sampled_from([b"[" * n, b'{"a":' * n, b"[" * n + b"]" * n, b'{"v":[' * n])
)


def mostly(usual: st.SearchStrategy[Any], *others: st.SearchStrategy[Any]) -> Any:
    """``usual`` four times as often as each of ``others``: deep paths get examples too."""
    pick = st.integers(0, 3 + len(others))
    return pick.flatmap(lambda i: usual if i < 4 else others[i - 4])


@st.composite
def notices(draw: st.DrawFn) -> bytes:
    """Notice-shaped JSON: each field valid, anything, or missing; sometimes extra fields."""
    valid = notice_body()
    body: dict[str, object] = {}
    for key in sorted(FIELDS):
        choice = draw(st.sampled_from(["valid"] * 6 + ["other", "missing"]))
        if choice == "valid":
            body[key] = draw(near_times | any_times) if key == "time" else valid[key]
        elif choice == "other":
            body[key] = draw(json_values | any_times | hostile_values.filter(_is_json))
    body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=1)))
    try:
        return json.dumps(body).encode()
    except (RecursionError, ValueError):  # too deep to write, or 10**5000 (no decimal text)
        return b"{}"


def _is_json(value: object) -> bool:
    return not isinstance(value, bytes)


notice_data = mostly(notices(), st.binary(max_size=300), json_values.map(j), deep)
message_data = mostly(
    notice_data.map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=40),
    json_values,
    st.integers(5000, 9000).map(lambda n: "A" * n),  # base64 of more than a notice may be
)
messages = mostly(
    st.fixed_dictionaries(
        {"data": message_data},
        optional={
            "attributes": st.one_of(
                st.just({"name": "google"}),
                st.fixed_dictionaries({}, optional={"name": attribute_values}),
                json_values,
            ),
            "messageId": attribute_values,
        },
    ),
    json_values,
)
payloads = mostly(
    st.fixed_dictionaries({"message": messages}, optional={"subscription": json_values}),
    json_values,
    st.binary(max_size=100),
)
ce_attributes = st.fixed_dictionaries(
    {},
    optional={
        "id": attribute_values,
        "time": attribute_values | any_times | near_times,
        "traceparent": attribute_values,
    },
)
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(payload=payloads, attributes=ce_attributes)
def test_fuzz_event_handler_acknowledges_or_reconciles_never_raises(
    payload: object, attributes: dict[str, object]
) -> None:
    rt = runtime()
    with captured() as stream:
        handle_event(rt, cloud_event(payload, **attributes))
    [entry] = outcomes(stream)  # exactly one line says how the message ended
    if entry["outcome"] == "malformed":
        assert entry["severity"] == "WARNING", entry  # never the parser-bug ERROR
        assert rt.stub.calls == []
    else:
        assert entry["outcome"] in ("stale", Outcome.IN_SYNC), entry
        assert len(rt.stub.calls) == (entry["outcome"] == Outcome.IN_SYNC)


@FUZZ
@given(payload=payloads, attributes=ce_attributes)
def test_fuzz_sweep_trigger_never_raises(payload: object, attributes: dict[str, object]) -> None:
    rt = runtime()
    with captured() as stream:
        handle_sweep(rt, cloud_event(payload, **attributes))
    assert [e["outcome"] for e in outcomes(stream)] in (["swept"], ["stale"])


repair_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(j),
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(json_values, st.just("google"), st.from_regex(r"\A[a-z]{1,9}\Z")),
            "dryRun": json_values,
        },
    ).map(j),
    deep,
    st.integers(MAX_REPAIR_BODY_BYTES - 2, MAX_REPAIR_BODY_BYTES + 2).map(lambda n: b" " * n),
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@FUZZ
@given(body=repair_bodies, traceparent=header_text, cloud_trace=header_text)
def test_fuzz_repair_answers_2xx_or_400_never_500(
    body: bytes, traceparent: str, cloud_trace: str
) -> None:
    rt = runtime()
    request = repair_request(
        body, traceparent=traceparent, **{"X-Cloud-Trace-Context": cloud_trace}
    )
    with captured() as stream:
        text, status, _ = handle_repair(rt, request)
    answer = json.loads(text)
    if status == 400:
        assert answer["error"] and len(text) < 1000, text
        assert rt.stub.calls == []
        [entry] = outcomes(stream)
        assert entry["outcome"] == "bad-request" and entry["severity"] == "WARNING", entry
    else:
        assert status == 200, text
        assert len(rt.stub.calls) == 1
