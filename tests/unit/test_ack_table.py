"""The whole acknowledge/retry table, at the function boundary and in-process.

``handle_event``, ``handle_sweep`` and ``handle_repair`` are called as functions-framework calls
them (a ``cloudevents`` CloudEvent, a Werkzeug request), with a stub reconciler that returns or
raises what each row says and a fixed clock. Each row asserts what Pub/Sub or the caller sees
(return or raise; the HTTP status) and the one log line that says why, never which calls were
made beyond whether the reconciler was reached. ``tests/e2e/test_pipeline.py`` checks the same
decisions end to end through the emulator; these run in milliseconds.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cloudevents.http import CloudEvent
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from core.errors import PermanentError, TransientError
from core.notice import Notice, format_time
from functions.handlers import handle_event, handle_repair, handle_sweep
from functions.outcomes import Delivered
from functions.settings import PipelineSettings
from reconcile.results import Action, Change, Outcome, Result, SweepReport
from tests.unit.stubs import (
    NOW,
    Step,
    StubReconciler,
    StubRuntime,
    captured_outcomes,
    stub_runtime,
)

MAX_AGE_S = PipelineSettings().max_event_age_s
INLINE_MAX_S = PipelineSettings().inline_requeue_max_s


def runtime(*steps: Step, sweep: SweepReport | Exception | None = None) -> StubRuntime:
    stub = StubReconciler(steps=list(steps))
    if sweep is not None:
        stub.sweep_step = sweep
    return stub_runtime(stub)


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The structured lines with an ``outcome`` written during the test."""
    with captured_outcomes() as read:
        yield read


def notice_event(name: str = "google", age_s: float = 1.0) -> CloudEvent:
    when = NOW - dt.timedelta(seconds=age_s)
    data = Notice(name, "ExternalService", "spec", "MODIFIED", "7", when).encode()
    message = {"data": base64.b64encode(data).decode(), "messageId": "9", "attributes": {}}
    return CloudEvent(
        {
            "id": "9",
            "type": "google.cloud.pubsub.topic.v1.messagePublished",
            "source": "//pubsub.googleapis.com/projects/p/topics/egress-events",
        },
        {"message": message, "subscription": "projects/p/subscriptions/egress-events-push"},
    )


def sweep_event(age_s: float | None = 1.0) -> CloudEvent:
    attributes = {
        "id": "3",
        "type": "google.cloud.pubsub.topic.v1.messagePublished",
        "source": "//pubsub.googleapis.com/projects/p/topics/egress-sweep",
    }
    if age_s is not None:
        attributes["time"] = format_time(NOW - dt.timedelta(seconds=age_s))
    message = {"data": base64.b64encode(b'{"trigger":"scheduler"}').decode(), "messageId": "3"}
    return CloudEvent(attributes, {"message": message})


def repair(body: object, method: str = "POST") -> Request:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return EnvironBuilder(method=method, data=data, content_type="application/json").get_request()


CREATED = Change(Action.CREATE, "Deployment", "google", "egress-operator-system")

# -- the events topic: return acknowledges, raise asks Pub/Sub to redeliver ----------------

EVENT_ROWS = [
    # (id, reconciler steps, notice age, raises, outcome logged, severity, reconciles)
    ("in-sync", [Result("google", Outcome.IN_SYNC)], 1, None, "in-sync", "INFO", 1),
    (
        "converged",
        [Result("google", Outcome.CONVERGED, [CREATED])],
        1,
        None,
        "converged",
        "INFO",
        1,
    ),
    ("not-found", [Result("google", Outcome.NOT_FOUND)], 1, None, "not-found", "INFO", 1),
    (
        "invalid",
        [Result("google", Outcome.INVALID, message="spec.ports")],
        1,
        None,
        "invalid",
        "WARNING",
        1,
    ),
    ("conflict", [Result("google", Outcome.CONFLICT)], 1, None, "conflict", "WARNING", 1),
    ("contested", [Result("google", Outcome.CONTESTED)], 1, None, "contested", "WARNING", 1),
    ("transient", [TransientError("503", 503)], 1, TransientError, "transient-error", "ERROR", 1),
    ("permanent", [PermanentError("403", 403)], 1, None, "permanent-error", "ERROR", 1),
    ("unexpected", [RuntimeError("bug")], 1, RuntimeError, "error", "ERROR", 1),
    ("stale", [], MAX_AGE_S + 1, None, "stale", "INFO", 0),
    ("from-the-future", [], -3600, None, "malformed", "WARNING", 0),
    (
        "short-grace-waited-inline",
        [
            Result("google", Outcome.DELETING, [CREATED], requeue_after_s=INLINE_MAX_S),
            Result("google", Outcome.DELETED),
        ],
        1,
        None,
        "deleted",
        "INFO",
        2,
    ),
    (
        "long-grace-left-to-the-sweep",
        [Result("google", Outcome.DELETING, requeue_after_s=INLINE_MAX_S + 1)],
        1,
        None,
        "deleting",
        "INFO",
        1,
    ),
]


@pytest.mark.parametrize(
    ("steps", "age", "raises", "outcome", "severity", "reconciles"),
    [pytest.param(*row[1:], id=row[0]) for row in EVENT_ROWS],
)
def test_event_ack_or_retry(
    log_lines: Callable[[], list[dict[str, Any]]],
    steps: list[Step],
    age: float,
    raises: type[Exception] | None,
    outcome: str,
    severity: str,
    reconciles: int,
) -> None:
    rt = runtime(*steps)
    if raises is None:
        assert handle_event(rt, notice_event(age_s=age)) is None  # 2xx: acknowledged
    else:
        with pytest.raises(raises):  # 500: redelivered
            handle_event(rt, notice_event(age_s=age))
    [line] = log_lines()
    assert (line["outcome"], line["severity"]) == (outcome, severity), line
    assert line["function"] == "event" and line["eventId"] == "9", line
    assert rt.stub.reconciled == ["google"] * reconciles
    assert rt.stub.steps == [], "every planned step was taken"


def test_an_inline_wait_sleeps_out_the_grace_period_and_keeps_both_passes_changes(
    log_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    rt = runtime(
        Result("google", Outcome.DELETING, [CREATED], requeue_after_s=2.5),
        Result("google", Outcome.DELETED, [Change(Action.DELETE, "Service", "google", "ns")]),
    )
    handle_event(rt, notice_event())
    assert rt.slept == [pytest.approx(2.6)]
    [line] = log_lines()
    assert [c["action"] for c in line["changes"]] == ["create", "delete"], line


# -- the sweep topic: acknowledged whatever single objects did ------------------------------

SWEEP_ROWS = [
    # (id, trigger age, the sweep's step, raises, outcomes logged in order, sweeps run)
    ("fresh", 1.0, SweepReport(), None, ["swept"], 1),
    ("no-time-attribute", None, SweepReport(), None, ["swept"], 1),
    ("stale", MAX_AGE_S + 1, SweepReport(), None, ["stale"], 0),
    (
        "drift-logged-per-object",
        1.0,
        SweepReport(
            results=[Result("a", Outcome.CONVERGED, [CREATED]), Result("b", Outcome.IN_SYNC)]
        ),
        None,
        ["converged", "swept"],
        1,
    ),
    ("transient-before-anything", 1.0, TransientError("503", 503), None, ["error"], 1),
    ("permanent-before-anything", 1.0, PermanentError("403", 403), None, ["error"], 1),
    ("unexpected", 1.0, RuntimeError("bug"), RuntimeError, [], 1),
]


@pytest.mark.parametrize(
    ("age", "step", "raises", "logged", "sweeps"),
    [pytest.param(*row[1:], id=row[0]) for row in SWEEP_ROWS],
)
def test_sweep_ack_or_retry(
    log_lines: Callable[[], list[dict[str, Any]]],
    age: float | None,
    step: SweepReport | Exception,
    raises: type[Exception] | None,
    logged: list[str],
    sweeps: int,
) -> None:
    rt = runtime(sweep=step)
    if raises is None:
        handle_sweep(rt, sweep_event(age))
    else:
        with pytest.raises(raises):
            handle_sweep(rt, sweep_event(age))
    assert [line["outcome"] for line in log_lines()] == logged
    assert all(line["function"] == "sweep" for line in log_lines())
    assert rt.stub.swept == sweeps


def test_a_swept_summary_counts_outcomes_and_drift(
    log_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    report = SweepReport(
        results=[Result("a", Outcome.CONVERGED, [CREATED]), Result("b", Outcome.IN_SYNC)]
    )
    out = handle_sweep(runtime(sweep=report), sweep_event())
    assert out is not None and out["outcomes"] == {"converged": 1, "in-sync": 1}
    summary = log_lines()[-1]
    assert summary["outcome"] == Delivered.SWEPT and summary["severity"] == "WARNING"
    assert summary["drift"] == [CREATED.to_dict()]


# -- repair over HTTP: the status is the answer ---------------------------------------------

REPAIR_ROWS = [
    # (id, method, body, reconcile steps, sweep step, status, dry runs asked for)
    ("get-refused", "GET", b"", [], None, 405, []),
    ("bad-body", "POST", b"[1]", [], None, 400, []),
    (
        "one-in-sync",
        "POST",
        {"name": "google"},
        [Result("google", Outcome.IN_SYNC)],
        None,
        200,
        [False],
    ),
    (
        "one-dry-run",
        "POST",
        {"name": "google", "dryRun": True},
        [Result("google", Outcome.CONVERGED)],
        None,
        200,
        [True],
    ),
    (
        "one-not-found",
        "POST",
        {"name": "google"},
        [Result("google", Outcome.NOT_FOUND)],
        None,
        404,
        [False],
    ),
    ("one-transient", "POST", {"name": "google"}, [TransientError("503", 503)], None, 503, [False]),
    ("one-permanent", "POST", {"name": "google"}, [PermanentError("403", 403)], None, 200, [False]),
    ("sweep", "POST", b"", [], SweepReport(), 200, [False]),
    ("sweep-dry-run", "POST", {"dryRun": True}, [], SweepReport(), 200, [True]),
    ("sweep-transient", "POST", b"", [], TransientError("503", 503), 503, [False]),
]


@pytest.mark.parametrize(
    ("method", "body", "steps", "sweep", "status", "dry_runs"),
    [pytest.param(*row[1:], id=row[0]) for row in REPAIR_ROWS],
)
def test_repair_statuses(
    log_lines: Callable[[], list[dict[str, Any]]],
    method: str,
    body: object,
    steps: list[Step],
    sweep: SweepReport | Exception | None,
    status: int,
    dry_runs: list[bool],
) -> None:
    rt = runtime(*steps, sweep=sweep)
    text, got, headers = handle_repair(rt, repair(body, method))
    assert got == status, text
    assert headers["Content-Type"] == "application/json"
    answer = json.loads(text)
    if status == 503:
        assert "error" in (answer.get("sweep") or answer), answer
    if status == 200 and steps:
        assert answer["result"]["name"] == "google" and answer["dryRun"] == dry_runs[0]
    assert rt.dry_runs == dry_runs
    assert rt.stub.steps == []
