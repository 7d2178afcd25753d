"""What a reconcile or a sweep did, as handlers log it and ``egressctl`` prints it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dns.delivery import (
    DnsReport,
)
from reconcile.drift import FieldDiff
from reconcile.fights import Fight


class Outcome(StrEnum):
    """How one reconcile ended: the ``outcome`` of its result, report and log line."""

    CONVERGED = "converged"  # writes were needed and made
    IN_SYNC = "in-sync"  # nothing to write
    INVALID = "invalid"  # spec refused; condition written, gateway untouched
    CONFLICT = "conflict"  # a foreign object holds one of our names
    NOT_FOUND = "not-found"
    DELETING = "deleting"  # DNS withdrawn, waiting out the grace period
    DELETED = "deleted"
    CONTESTED = "contested"  # another field manager keeps rewriting our fields (reconcile.fights)


class Action(StrEnum):
    """What a reconcile did (or, dry, would do) to one object."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    kind: str
    name: str
    namespace: str | None
    fields: tuple[FieldDiff, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "kind": self.kind,
            "name": self.name,
            "namespace": self.namespace,
            "fields": [f.to_dict() for f in self.fields],
        }


@dataclass
class Result:
    name: str
    outcome: Outcome
    changes: list[Change] = field(default_factory=list)
    hijack_state: str | None = None
    requeue_after_s: float | None = None
    message: str = ""
    fights: list[Fight] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "outcome": self.outcome,
            "changes": [ch.to_dict() for ch in self.changes],
        }
        if self.fights:
            out["fights"] = [f.to_dict() for f in self.fights]
        if self.hijack_state is not None:
            out["hijackState"] = self.hijack_state
        if self.requeue_after_s is not None:
            out["requeueAfterSeconds"] = round(self.requeue_after_s, 1)
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class SweepReport:
    results: list[Result] = field(default_factory=list)
    pruned: list[Change] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    dns: DnsReport | None = None
    # `egressctl access` findings, when SWEEP_ACCESS_AUDIT is on (None when it is off).
    access: list[dict[str, Any]] | None = None
    # A shard's sweep (deliver=False): the Corefile import line its DNS prediction added.
    corefile_added: str = ""

    @property
    def drift(self) -> list[Change]:
        return [ch for r in self.results for ch in r.changes] + self.pruned

    @property
    def fights(self) -> list[Fight]:
        return [f for r in self.results for f in r.fights]

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        return {
            "externalServices": len(self.results),
            "outcomes": counts,
            "drift": [ch.to_dict() for ch in self.drift],
            "results": [
                r.to_dict() for r in self.results if r.changes or r.outcome != Outcome.IN_SYNC
            ],
            "errors": self.errors,
            "fights": [f.to_dict() for f in self.fights],
            "dns": self.dns.to_dict() if self.dns is not None else None,
            **({"access": self.access} if self.access is not None else {}),
        }
