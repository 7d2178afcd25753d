"""Which failures are retried, and how: the one place that decides (core.errors)."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from core.errors import PermanentError, RetryPolicy, TransientError, classify, with_retries


def api_error(status: int, retry_after: str | None = None) -> ApiException:
    exc = ApiException(status=status, reason="x")
    exc.headers = {"Retry-After": retry_after} if retry_after else {}
    exc.body = b'{"message": "nope"}'
    return exc


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (409, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (400, False),
        (403, False),
        (404, False),
        (422, False),
    ],
)
def test_classify_statuses(status: int, transient: bool) -> None:
    failure = classify(api_error(status))
    assert failure.transient is transient
    assert failure.status == status


def test_network_errors_are_transient() -> None:
    assert classify(ProtocolError("connection dropped")).transient
    assert classify(ConnectionResetError()).transient
    assert not classify(ValueError("bug")).transient


def test_retry_after_is_read_and_capped() -> None:
    assert classify(api_error(429, "2")).retry_after_s == 2.0
    assert classify(api_error(429, "3600")).retry_after_s == 10.0


def test_transient_failures_are_retried_then_raised_as_transient() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def always_503() -> None:
        calls.append(1)
        raise api_error(503)

    with pytest.raises(TransientError) as info:
        with_retries(always_503, RetryPolicy(attempts=3, base_delay_s=0.1), sleep=slept.append)
    assert len(calls) == 3 and len(slept) == 2
    assert info.value.status == 503
    assert all(0.05 <= s <= 0.2 for s in slept)


def test_success_after_retries_returns_the_value() -> None:
    answers = iter([api_error(429, "1"), api_error(500), "ok"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    slept: list[float] = []
    assert with_retries(flaky, RetryPolicy(attempts=4), sleep=slept.append) == "ok"
    assert slept[0] == 1.0


def test_permanent_failures_are_not_retried() -> None:
    calls: list[int] = []

    def forbidden() -> None:
        calls.append(1)
        raise api_error(403)

    with pytest.raises(PermanentError) as info:
        with_retries(forbidden, sleep=lambda _: None)
    assert calls == [1] and info.value.status == 403


def test_expected_statuses_are_final_at_once() -> None:
    calls: list[int] = []

    def conflict() -> None:
        calls.append(1)
        raise api_error(409)

    with pytest.raises(PermanentError) as info:
        with_retries(conflict, sleep=lambda _: None, final_statuses=frozenset({409}))
    assert calls == [1] and info.value.status == 409
