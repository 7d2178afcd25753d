"""The DNS hijack state of a gateway, kept as a label on its Service.

A name is rewritten to the gateway only once its pods can serve it, and once rewritten it stays
rewritten through a readiness blip: flapping cluster DNS would hurt more than a short outage of
one gateway. The state is derived afresh on every reconcile from live objects, so the function
stays stateless.
"""

from __future__ import annotations

from enum import StrEnum


class HijackState(StrEnum):
    FALSE = "false"
    WAITING_FOR_PODS = "waiting-for-pods"
    TRUE = "true"

    @classmethod
    def parse(cls, label: str | None) -> HijackState | None:
        """The state a live Service label holds; None when absent or not one of ours."""
        try:
            return cls(label) if label is not None else None
        except ValueError:
            return None


def next_hijack_state(hijack_dns: bool, ready: bool, previous: HijackState | None) -> HijackState:
    """Next state from the spec, Deployment readiness (>= 1 ready replica) and the live label.

    ``previous`` is None when there is no Service yet (or its label is not a known state).
    """
    if not hijack_dns:
        return HijackState.FALSE
    if ready or previous is HijackState.TRUE:
        return HijackState.TRUE
    return HijackState.WAITING_FOR_PODS
