"""A sweep in shards: the progress record, the per-shard summaries and their merge, publishing.

``functions.handlers`` runs the protocol; this module holds its state and its pure parts.

**The progress record** is one ConfigMap per sweep, ``egress-sweep.<sweep id>`` in the gateway
namespace, labelled ``egress.monzo.com/sweep-progress=<sweep id>``. Why there: the functions are
stateless and share nothing but the cluster, the reconciler may already get, list, create,
patch and delete ConfigMaps in that namespace (``infra/rbac/reconciler.yaml``: no new grant,
least privilege unchanged), and the API server gives race-safe updates: every write is a merge
patch carrying the ``metadata.resourceVersion`` it was computed from, which the server refuses
with 409 if anyone wrote in between (then: read again, decide again). The name holds a dot, so
it can never be a gateway's (ExternalService names are DNS-1035 labels) and the record has no
gateway label: sweeps never take it for a gateway object or an orphan.

Keys: ``sweep`` (the plan: shard count, start, trigger id) written once by the coordinator;
``shard-NN`` per shard that finished its part (its bounded summary and a random token naming
the delivery that wrote it); ``finish`` (which shard completes the sweep, since when) written
*in the same patch* as the last shard's summary, so exactly one delivery completes the set; and
``done`` once DNS is delivered and the merged report logged.

- A redelivered or concurrent duplicate shard finds its key and changes nothing (its reconciles,
  if it got that far, were idempotent writes of the same desired state). The token tells a
  delivery whose own write succeeded but whose answer was lost from a duplicate.
- The completing delivery runs DNS delivery and logs the merged report. If it dies first, its
  message is redelivered (it was never acknowledged) and a delivery of that shard takes over
  once ``finish`` is older than FINISH_LEASE_S; before that it raises, so Pub/Sub retries
  later, rather than delivering DNS a second time beside a finisher still at work.
- A shard that never reports (lost, or refused for good) leaves the record without ``done``;
  the coordinator of a later sweep removes records older than ``retention_s`` and logs each
  incomplete one with what it lacks (and its partial report). Every later sweep reconciles
  everything anyway, so nothing stays unswept.

**Summaries** are bounded (counts, plus at most SAMPLE entries of drift, errors and fights per
shard; MERGED_SAMPLE in the merged report): the record must stay well under a ConfigMap's 1 MiB
with core.shards.MAX_SHARDS shards, and the merged log line readable. Each shard's own lines
name every object it changed, as a whole sweep's do, so nothing is lost by the bound.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import PermanentError, TransientError
from core.kube import CONFIGMAP, EXTERNAL_SERVICE, Kube, Obj
from core.notice import clip, format_time, parse_time
from core.shards import MAX_SHARDS, SWEEP_ID, ShardMessage

if TYPE_CHECKING:
    from reconcile.controller import SweepReport

PREFIX = "egress-sweep."
LABEL_SWEEP = "egress.monzo.com/sweep-progress"
# At most this many drift changes, errors and fights kept per shard, and in the merged report.
SAMPLE = 10
MERGED_SAMPLE = 50
MAX_ERROR_CHARS = 300
# A completing shard's DNS delivery and report take seconds; a `finish` older than this was
# abandoned (its instance died) and another delivery of that shard may take over.
FINISH_LEASE_S = 120
# How long a sharded sweep may take from fan-out to its last shard: a shard message older than
# this is acknowledged unrun (the sweep stays incomplete, the next one covers its part), and no
# other sharded sweep starts while an unfinished younger one exists. Longer than a trigger's
# MAX_EVENT_AGE_SECONDS: shards may wait for instances (more shards than max-instances wait for
# Pub/Sub's redelivery backoff) or run up to the 540 s timeout each, in waves. The sweep
# subscription keeps messages at least this long (cloudbuild.yaml).
SWEEP_MAX_AGE_S = 1800
# Writes race only between the shards of one sweep: each round lets one of them through.
MAX_WRITE_ATTEMPTS = MAX_SHARDS + 8
HEADER_KEY = "sweep"
FINISH_KEY = "finish"
DONE_KEY = "done"


def record_name(sweep: str) -> str:
    return f"{PREFIX}{sweep}"


def shard_key(shard: int) -> str:
    return f"shard-{shard:02d}"


# -- summaries ----------------------------------------------------------------------------


def summarize(report: SweepReport, duration_ms: float, token: str) -> dict[str, Any]:
    """What one shard's report contributes to the merged one, bounded (module docstring)."""
    full = report.to_dict()
    drift = [_brief_change(ch) for ch in full["drift"]]
    errors = [
        {"name": clip(str(e.get("name", "")), 80), "error": clip(str(e.get("error", "")), 300)}
        for e in full["errors"]
    ]
    return {
        "externalServices": full["externalServices"],
        "outcomes": full["outcomes"],
        "driftCount": len(drift),
        "drift": drift[:SAMPLE],
        "pruned": len(report.pruned),
        "errorCount": len(errors),
        "errors": errors[:SAMPLE],
        "fightCount": len(full["fights"]),
        "fights": full["fights"][:SAMPLE],
        "corefileAdded": report.corefile_added,
        "durationMs": duration_ms,
        "token": token,
    }


def _brief_change(change: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: change.get(k) for k in ("action", "kind", "name")}
    fields = change.get("fields") or []
    if fields:
        out["fields"] = [clip(str(f.get("field", "")), 80) for f in fields[:5]]
    return out


def merge(
    summaries: Mapping[int, Mapping[str, Any]], shards: int, dns: Any = None
) -> dict[str, Any]:
    """One report from the shards' summaries (in shard order), as a sweep's log line has it.

    ``dns`` is the DNS report's dict of the completing shard, None while incomplete."""
    outcomes: dict[str, int] = {}
    drift: list[Any] = []
    errors: list[Any] = []
    fights: list[Any] = []
    totals = {"externalServices": 0, "driftCount": 0, "pruned": 0, "errorCount": 0}
    fight_count = 0
    corefile = ""
    for shard in sorted(summaries):
        s = summaries[shard]
        for outcome, n in (s.get("outcomes") or {}).items():
            outcomes[outcome] = outcomes.get(outcome, 0) + int(n)
        for key in totals:
            totals[key] += int(s.get(key) or 0)
        fight_count += int(s.get("fightCount") or 0)
        drift += s.get("drift") or []
        errors += s.get("errors") or []
        fights += s.get("fights") or []
        corefile = corefile or str(s.get("corefileAdded") or "")
    if dns is not None and corefile:
        dns = {**dns, "drift": [*dns.get("drift", []), f"Corefile: added {corefile}"]}
    missing = [k for k in range(shards) if k not in summaries]
    return {
        **totals,
        "outcomes": dict(sorted(outcomes.items())),
        "drift": drift[:MERGED_SAMPLE],
        "errors": errors[:MERGED_SAMPLE],
        "fightCount": fight_count,
        "fights": fights[:MERGED_SAMPLE],
        "shards": shards,
        "shardsReported": len(summaries),
        "missingShards": missing,
        "shardDurationsMs": [summaries[k].get("durationMs") for k in sorted(summaries)],
        "dns": dns,
    }


# -- the progress record ------------------------------------------------------------------


@dataclass
class Finish:
    shard: int
    token: str
    since: dt.datetime


@dataclass
class Record:
    """One sweep's progress record, as read (see the module docstring)."""

    sweep: str
    shards: int
    started: dt.datetime
    trigger: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish: Finish | None = None
    done: dict[str, Any] | None = None
    uid: str = ""
    resource_version: str = ""

    @property
    def missing(self) -> list[int]:
        return [k for k in range(self.shards) if k not in self.results]


class BadRecord(PermanentError):
    """The progress record cannot be read (someone edited it): the sweep cannot complete."""


def parse_record(obj: Obj) -> Record:
    meta = obj.get("metadata") or {}
    data = obj.get("data") or {}
    name = str(meta.get("name", ""))
    try:
        header = json.loads(data[HEADER_KEY])
        shards = header["shards"]
        if not isinstance(shards, int) or not 2 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards {shards!r}")
        record = Record(
            sweep=str(header["sweep"]),
            shards=shards,
            started=parse_time(header["started"]),
            trigger=str(header.get("trigger", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
        )
        if record_name(record.sweep) != name or not SWEEP_ID.match(record.sweep):
            raise ValueError(f"sweep {record.sweep!r} in {name}")
        for key, value in data.items():
            if key.startswith("shard-"):
                shard = int(key.removeprefix("shard-"))
                if not 0 <= shard < shards:
                    raise ValueError(f"key {key}")
                summary = json.loads(value)
                if not isinstance(summary, dict):
                    raise ValueError(f"key {key}")
                record.results[shard] = summary
        if FINISH_KEY in data:
            fin = json.loads(data[FINISH_KEY])
            record.finish = Finish(int(fin["shard"]), str(fin["token"]), parse_time(fin["since"]))
        if DONE_KEY in data:
            done = json.loads(data[DONE_KEY])
            record.done = done if isinstance(done, dict) else {}
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BadRecord(f"progress record {name} cannot be read: {clip(str(exc), 200)}") from exc
    return record


class Recorded(StrEnum):
    """How a shard's attempt to record its summary ended."""

    RECORDED = "recorded"  # first to report this shard
    COMPLETES = "completes"  # ... and the last one missing: this delivery finishes the sweep
    DUPLICATE = "duplicate"  # the shard was reported already (by another delivery)
    UNKNOWN = "unknown"  # no record: never started here, or cleaned up long since


class ProgressStore:
    """The progress records of one gateway namespace (module docstring)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        *,
        clock: Callable[[], dt.datetime],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.clock = clock
        self.sleep = sleep

    def load(self, sweep: str) -> Record | None:
        obj = self.kube.get(CONFIGMAP, record_name(sweep), self.namespace)
        return None if obj is None else parse_record(obj)

    def start(self, sweep: str, shards: int, trigger: str) -> tuple[Record, bool]:
        """The record of a new sweep, created now; or the existing one (a redelivered trigger).

        Returns the record and whether this call created it."""
        header = {
            "v": 1,
            "sweep": sweep,
            "shards": shards,
            "started": format_time(self.clock()),
            "trigger": clip(trigger, 200),
        }
        body: Obj = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": record_name(sweep),
                "namespace": self.namespace,
                "labels": {LABEL_SWEEP: sweep},
            },
            "data": {HEADER_KEY: json.dumps(header, sort_keys=True)},
        }
        created = self.kube.create(CONFIGMAP, body)
        if created is not None:
            return parse_record(created), True
        existing = self.load(sweep)
        if existing is None:  # created and removed in between: cannot happen within retention
            raise TransientError(f"progress record {record_name(sweep)} vanished; retry")
        return existing, False

    def record(
        self, sweep: str, shard: int, summary: dict[str, Any]
    ) -> tuple[Recorded, Record | None]:
        """Add one shard's summary; the write that completes the set also claims ``finish``.

        Race-safe: computed from the record as read and written under its resourceVersion."""
        token = str(summary["token"])
        for attempt in range(MAX_WRITE_ATTEMPTS):
            record = self.load(sweep)
            if record is None:
                return Recorded.UNKNOWN, None
            mine = record.results.get(shard)
            if mine is not None:
                if mine.get("token") != token:
                    return Recorded.DUPLICATE, record
                # Our own write, whose answer was lost: carry on as its author.
                fin = record.finish
                finishing = fin is not None and fin.token == token
                return (Recorded.COMPLETES if finishing else Recorded.RECORDED), record
            data = {shard_key(shard): json.dumps(summary, sort_keys=True)}
            completes = len(record.results) + 1 == record.shards
            if completes:
                data[FINISH_KEY] = json.dumps(
                    {"shard": shard, "token": token, "since": format_time(self.clock())}
                )
            if self._write(record, data):
                record.results[shard] = summary
                if completes:
                    record.finish = Finish(shard, token, self.clock())
                return (Recorded.COMPLETES if completes else Recorded.RECORDED), record
            self._back_off(attempt)
        raise TransientError(f"progress record of sweep {sweep} kept changing; retry")

    def take_over(self, record: Record, shard: int, token: str) -> bool:
        """Claim ``finish`` from a finisher gone quiet for FINISH_LEASE_S; False if another
        delivery got there first (or the sweep is done)."""
        data = {
            FINISH_KEY: json.dumps(
                {"shard": shard, "token": token, "since": format_time(self.clock())}
            )
        }
        if not self._write(record, data):
            return False
        record.finish = Finish(shard, token, self.clock())
        return True

    def mark_done(self, record: Record, report: Mapping[str, Any]) -> None:
        """Say the sweep is finished; only the finisher writes this, but other shards' duplicate
        deliveries may not write at all, so a conflict is just read again."""
        done = {"at": format_time(self.clock()), **report}
        for attempt in range(MAX_WRITE_ATTEMPTS):
            if self._write(record, {DONE_KEY: json.dumps(done, sort_keys=True)}):
                record.done = done
                return
            self._back_off(attempt)
            fresh = self.load(record.sweep)
            if fresh is None or fresh.done is not None:
                return
            record = fresh
        raise TransientError(f"progress record of sweep {record.sweep} kept changing; retry")

    def others(self, retention_s: float, keep: str = "") -> tuple[list[Record], list[Record]]:
        """Every record but ``keep``'s, oldest first: (expired: started more than
        ``retention_s`` ago, or unreadable; the rest)."""
        items, _ = self.kube.list_all(CONFIGMAP, self.namespace, label_selector=LABEL_SWEEP)
        now = self.clock()
        expired: list[Record] = []
        live: list[Record] = []
        for item in items:
            name = (item.get("metadata") or {}).get("name", "")
            if not str(name).startswith(PREFIX) or name == record_name(keep):
                continue
            try:
                record = parse_record(item)
            except BadRecord:
                meta = item.get("metadata") or {}
                created = parse_time(str(meta.get("creationTimestamp") or format_time(now)))
                record = Record(str(name).removeprefix(PREFIX), MAX_SHARDS, created, "")
                record.uid = str(meta.get("uid", ""))
                record.done = {"unreadable": True}
                expired.append(record)
                continue
            old = (now - record.started).total_seconds() > retention_s
            (expired if old else live).append(record)
        return sorted(expired, key=lambda r: r.started), sorted(live, key=lambda r: r.started)

    def remove(self, record: Record) -> bool:
        return self.kube.delete(
            CONFIGMAP, record_name(record.sweep), self.namespace, uid=record.uid
        )

    def _write(self, record: Record, data: dict[str, str]) -> bool:
        """Merge ``data`` in under the record's resourceVersion; False on a conflict."""
        patch = {"metadata": {"resourceVersion": record.resource_version}, "data": data}
        try:
            written = self.kube.merge_patch(
                CONFIGMAP,
                record_name(record.sweep),
                patch,
                self.namespace,
                final_statuses=frozenset({409}),
            )
        except PermanentError as exc:
            if exc.status == 409:
                return False
            raise
        record.resource_version = str(written["metadata"]["resourceVersion"])
        return True

    def _back_off(self, attempt: int) -> None:
        self.sleep(min(1.0, 0.02 * (attempt + 1)) * (0.5 + random.random()))


def new_token() -> str:
    return uuid.uuid4().hex


# -- counting and publishing ----------------------------------------------------------------


def count_external_services(kube: Kube) -> int:
    """How many ExternalServices exist, cheaply (``Kube.count``: one LIST of one item)."""
    return kube.count(EXTERNAL_SERVICE)


class ShardPublisher(Protocol):
    def publish(self, messages: Iterable[ShardMessage]) -> None:
        """Publish every message, or raise (TransientError) having published perhaps some."""


class PubSubShardPublisher:
    """Shard messages onto the sweep topic (unordered: shards run in parallel).

    Built on first fan-out only: instances that never fan out never import the client. Locally
    the client talks to the emulator named by PUBSUB_EMULATOR_HOST."""

    def __init__(self, project: str, topic: str, timeout_s: float = 60.0) -> None:
        from google.cloud import pubsub_v1

        self.client = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.01)
        )
        self.topic = self.client.topic_path(project, topic)
        self.timeout_s = timeout_s

    def publish(self, messages: Iterable[ShardMessage]) -> None:
        futures = [self.client.publish(self.topic, m.encode(), **m.attributes()) for m in messages]
        try:
            for future in futures:
                future.result(timeout=self.timeout_s)
        except Exception as exc:
            raise TransientError(f"publishing shard messages failed: {exc}") from exc
