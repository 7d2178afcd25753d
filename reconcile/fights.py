"""Field-manager fights: another writer keeps rewriting fields the reconciler owns.

Server-side apply with ``force`` takes a field back from whoever changed it: right for a hand
edit, once. Against another controller (the original operator still running, a GitOps tool
applying an old manifest, a script), forcing means both sides rewrite the object on every
round, and a Deployment's pods roll each time. So the reconciler applies **without** force
first; the API server then refuses (409) when another field manager owns fields we set to
other values, and names each manager and field.

- The first refusal by a manager (per gateway object kind) is taken back with force, and the
  take-back is remembered on the ExternalService (annotation ``ANNOTATION_TAKEN_BACK``: the
  managers, and the time of our apply as the API server recorded it).
- A manager that, within ``FIGHT_WINDOW_S`` of that take-back, owns our fields again (its
  managedFields entry says when it last wrote) **keeps rewriting** them: the reconciler stops
  forcing that object, reports the fight (manager and fields) in the reconcile result and the
  sweep report, and sets the condition ``Conflict`` (reason ``FieldManagerConflict``) on the
  ExternalService. The object is then left as the other writer keeps it: no more rolls.
- A fight ends by itself when the fields agree again (the other writer stopped, or now writes
  what we render: nothing to apply), or when an operator takes the fields back on purpose
  (``egressctl reconcile NAME --force-conflicts``) once the other writer is stopped.

Pure functions; the reconciler does the I/O.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from core import constants as c
from core.kube import Obj

# A manager that writes our fields again within this long after we took them back from it
# keeps rewriting them. Longer than any sweep interval (Cloud Scheduler: minutes) and a GitOps
# tool's sync period, so a fight shows on the first sweep after the second write; short enough
# that a person editing the same field again weeks later is simply repaired once more.
FIGHT_WINDOW_S = 3600
# Fields named in a condition message; the sweep report has them all.
MAX_FIELDS_IN_MESSAGE = 8


def _parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class TakeBack:
    """We forced fields of one gateway object back from these managers, at ``at`` (RFC 3339,
    the API server's time of our apply)."""

    managers: tuple[str, ...]
    at: str

    def to_dict(self) -> dict[str, Any]:
        return {"managers": list(self.managers), "at": self.at}


@dataclass(frozen=True, slots=True)
class Fight:
    """Another field manager keeps rewriting fields of a gateway object that we own."""

    kind: str
    name: str
    namespace: str | None
    manager: str
    fields: tuple[str, ...]
    taken_back_at: str  # when we last took them back from this manager
    rewritten_at: str  # when the manager last wrote the object (its managedFields entry)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "namespace": self.namespace,
            "manager": self.manager,
            "fields": list(self.fields),
            "takenBackAt": self.taken_back_at,
            "rewrittenAt": self.rewritten_at,
        }

    def describe(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        shown = ", ".join(self.fields[:MAX_FIELDS_IN_MESSAGE])
        more = len(self.fields) - MAX_FIELDS_IN_MESSAGE
        if more > 0:
            shown += f" and {more} more"
        return (
            f'field manager "{self.manager}" keeps rewriting {self.kind} {where}: {shown} '
            f"(taken back at {self.taken_back_at}, rewritten at {self.rewritten_at})"
        )


def memory(es_obj: Obj) -> dict[str, TakeBack]:
    """The take-backs recorded on an ExternalService, by gateway object kind; a missing or
    unreadable annotation is an empty memory (the worst case is one more take-back)."""
    raw = ((es_obj.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_TAKEN_BACK)
    try:
        data = json.loads(raw or "{}")
    except ValueError:
        return {}
    out: dict[str, TakeBack] = {}
    if not isinstance(data, dict):
        return out
    for kind, entry in data.items():
        if not isinstance(entry, dict):
            continue
        managers = entry.get("managers")
        at = entry.get("at")
        if isinstance(managers, list) and isinstance(at, str):
            out[str(kind)] = TakeBack(tuple(str(m) for m in managers), at)
    return out


def encode(entries: dict[str, TakeBack]) -> str:
    return json.dumps(
        {kind: entries[kind].to_dict() for kind in sorted(entries)}, separators=(",", ":")
    )


def last_write(obj: Obj, manager: str) -> str:
    """When ``manager`` last wrote ``obj`` (the newest time of its managedFields entries)."""
    times = [
        str(entry.get("time") or "")
        for entry in (obj.get("metadata") or {}).get("managedFields") or []
        if entry.get("manager") == manager
    ]
    return max(times, default="")


def applied_at(applied: Obj) -> str:
    """The API server's time of our own apply, from the object it returned."""
    for entry in (applied.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == c.FIELD_MANAGER and entry.get("operation") == "Apply":
            return str(entry.get("time") or "")
    return ""


def fights(
    kind: str,
    live: Obj,
    conflicts: dict[str, list[str]],
    remembered: TakeBack | None,
    window_s: float = FIGHT_WINDOW_S,
) -> list[Fight]:
    """Which of the managers behind a refused apply keep rewriting: we took fields of this
    object back from them before, and they wrote it again within ``window_s`` of that."""
    if remembered is None:
        return []
    taken = _parse_time(remembered.at)
    if taken is None:
        return []
    meta = live.get("metadata") or {}
    out = []
    for manager in sorted(conflicts):
        if manager not in remembered.managers:
            continue
        wrote = last_write(live, manager)
        when = _parse_time(wrote)
        if when is None or not (taken <= when <= taken + dt.timedelta(seconds=window_s)):
            continue
        out.append(
            Fight(
                kind,
                str(meta.get("name", "")),
                meta.get("namespace"),
                manager,
                tuple(sorted(conflicts[manager])),
                remembered.at,
                wrote,
            )
        )
    return out


def condition_message(name: str, found: list[Fight]) -> str:
    """The Conflict condition's message: who fights over what, and how to end it."""
    return (
        "; ".join(f.describe() for f in found)
        + ". These fields are no longer forced back (no more rewrites or rolls); the object"
        " stays as the other writer keeps it. Stop that writer (or make it write what this"
        f" reconciler renders), then run `egressctl reconcile {name} --force-conflicts`."
    )
