"""Every transition of the DNS hijack state machine (SPEC §3)."""

from __future__ import annotations

import pytest

from core.hijack import HijackState, next_hijack_state

F, W, T = HijackState.FALSE, HijackState.WAITING_FOR_PODS, HijackState.TRUE

# (hijackDns, ready, previous label, expected)
TRANSITIONS = [
    (False, False, None, F),
    (False, True, None, F),
    (False, False, F, F),
    (False, True, W, F),
    (False, True, T, F),
    (False, False, T, F),
    (True, False, None, W),
    (True, True, None, T),
    (True, False, F, W),
    (True, True, F, T),
    (True, False, W, W),
    (True, True, W, T),
    (True, True, T, T),
    (True, False, T, T),
]


@pytest.mark.parametrize(
    ("hijack", "ready", "previous", "expected"),
    TRANSITIONS,
    ids=[f"hijack={h}-ready={r}-prev={p}" for h, r, p, _ in TRANSITIONS],
)
def test_transition(
    hijack: bool, ready: bool, previous: HijackState | None, expected: HijackState
) -> None:
    assert next_hijack_state(hijack, ready, previous) is expected


@pytest.mark.parametrize(
    ("label", "expected"),
    [("true", T), ("false", F), ("waiting-for-pods", W), (None, None), ("yes", None), ("", None)],
)
def test_parse_live_label(label: str | None, expected: HijackState | None) -> None:
    assert HijackState.parse(label) is expected


def test_a_hand_edited_label_is_treated_as_no_state() -> None:
    assert next_hijack_state(True, False, HijackState.parse("TRUE")) is W
