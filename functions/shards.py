"""A sweep in shards: the protocol, the progress record, the per-shard summaries and their
merge, publishing.

``functions.handlers.handle_sweep`` hands the scheduler's trigger to ``coordinate`` (when
SWEEP_SHARD_SIZE is set) and each shard message to ``run_shard``; both run here, with the
record that makes the shards one sweep. This module does not import ``functions.handlers``:
what it needs of the handlers' ``Runtime`` is ``ShardedRuntime``, and what both log through
is ``functions.outcomes``.

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

import contextlib
import datetime as dt
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from core import logs
from core.errors import PermanentError, ReconcileError, TransientError
from core.kube import CONFIGMAP, EXTERNAL_SERVICE, Kube, Obj
from core.notice import clip, format_time, parse_time
from core.shards import MAX_SHARDS, SWEEP_ID, ShardMessage, shard_count, shard_of
from functions.outcomes import (
    Delivered,
    HasReconcilers,
    log,
    log_line,
    log_malformed,
    log_results,
    ms_since,
    sweep_failed,
    sweep_logged,
)
from functions.settings import MAX_CLOCK_SKEW_S

if TYPE_CHECKING:
    from functions.settings import PipelineSettings
    from reconcile.results import SweepReport

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


# -- the protocol: the coordinator and the shards ---------------------------------------------


class SweepsInShards(Protocol):
    """What a shard needs of ``reconcile.controller.Reconciler`` (tests pass a stub)."""

    def sweep(
        self, *, only: Callable[[str], bool] | None = None, deliver: bool = True
    ) -> SweepReport: ...

    def finish_sweep(self) -> SweepReport: ...


class ShardedRuntime(HasReconcilers, Protocol):
    """What a sweep in shards needs of ``functions.handlers.Runtime`` (named here, not
    imported: ``functions.handlers`` imports this module)."""

    @property
    def pipeline(self) -> PipelineSettings: ...

    @property
    def clock(self) -> Callable[[], dt.datetime]: ...

    def kube(self) -> Kube: ...

    def shard_reconciler(self) -> SweepsInShards: ...

    def progress_store(self) -> ProgressStore: ...

    def publisher(self) -> ShardPublisher: ...


def _redelivering(what: str, exc: Exception, **fields: Any) -> None:
    """A step of a sharded sweep that failed transiently: logged, then raised by the caller so
    that Pub/Sub redelivers."""
    log_line(
        logging.ERROR,
        f"{what}, raising for redelivery: {exc}",
        Delivered.TRANSIENT_ERROR,
        **fields,
    )


def _tally(report: Mapping[str, Any]) -> str:
    """The counts of a shard's summary or of the merged report, as their lines word them."""
    return (
        f"{report['externalServices']} ExternalService(s), {report['driftCount']} drift "
        f"change(s), {report['pruned']} orphan(s) pruned, {report['errorCount']} error(s)"
    )


def retention_s(rt: ShardedRuntime) -> float:
    """How long a progress record is kept: past it no delivery of its sweep can still write
    (shard messages older than SWEEP_MAX_AGE_S and triggers older than MAX_EVENT_AGE_SECONDS
    are acknowledged unrun, a finisher is taken over after FINISH_LEASE_S), and a redelivered
    trigger always finds it."""
    return max(SWEEP_MAX_AGE_S, rt.pipeline.max_event_age_s) + FINISH_LEASE_S + 60


def coordinate(rt: ShardedRuntime, event_id: str, sweep_id: str, started: float) -> dict[str, Any]:
    """The scheduler's trigger with SWEEP_SHARD_SIZE set: count, then sweep here or fan out.

    At most SWEEP_SHARD_SIZE ExternalServices: the whole sweep runs in this invocation, exactly
    as without sharding (one LIST of one item more, to count). More: a progress record for
    ``sweep_id`` and one shard message per shard on the sweep topic, each shard about
    SWEEP_SHARD_SIZE names by hash (``core.shards``). A redelivered trigger finds its record
    and publishes again only the shards not reported yet (a shard message delivered twice is
    harmless); a publish that fails raises, so that the trigger is redelivered. The
    coordinator also removes expired progress records, logging each incomplete one.

    One sharded sweep at a time: while another one is unfinished and younger than
    SWEEP_MAX_AGE_S, the trigger is acknowledged unrun (the deployed on_sweep once ran with
    max-instances 1 for the same reason: two sweeps at once do every write twice, and a backlog
    of them never catches up). The next trigger after it finishes, or expires, runs.
    """
    with logs.context(sweepId=sweep_id):
        try:
            store = rt.progress_store()
            running = _clean_up(rt, store, sweep_id)
            if running:
                return _busy(rt, running[-1], started)
            total = count_external_services(rt.kube())
        except (TransientError, PermanentError) as exc:
            return sweep_failed(exc, started)
        shards = shard_count(total, rt.pipeline.sweep_shard_size)
        if shards == 1:
            return sweep_logged(rt, dry_run=False, started=started, sweep_id=sweep_id)
        try:
            record, created = store.start(sweep_id, shards, event_id)
        except TransientError as exc:
            _redelivering(
                f"sweep {sweep_id}: cannot record its progress", exc, durationMs=ms_since(started)
            )
            raise
        except PermanentError as exc:
            return sweep_failed(exc, started, "cannot record its progress")
        if record.done is not None:
            log_line(
                logging.INFO,
                f"sweep {sweep_id}: trigger delivered again after the sweep finished; "
                "nothing to do",
                Delivered.DUPLICATE,
            )
            return {"sweepId": sweep_id, "shards": record.shards, "published": 0}
        messages = [
            ShardMessage(sweep_id, k, record.shards, record.started) for k in record.missing
        ]
        try:
            rt.publisher().publish(messages)
        except Exception as exc:
            _redelivering(
                f"sweep {sweep_id}: publishing {len(messages)} shard message(s) failed",
                exc,
                durationMs=ms_since(started),
            )
            raise
        again = "" if created else " again (trigger redelivered)"
        log_line(
            logging.INFO,
            f"sweep {sweep_id}: {total} ExternalService(s) in {record.shards} shards; published "
            f"{len(messages)} shard message(s){again}",
            Delivered.FANNED_OUT,
            externalServices=total,
            shards=record.shards,
            published=[m.shard for m in messages],
            durationMs=ms_since(started),
        )
        return {
            "sweepId": sweep_id,
            "shards": record.shards,
            "externalServices": total,
            "published": len(messages),
        }


def _busy(rt: ShardedRuntime, record: Record, started: float) -> dict[str, Any]:
    age = (rt.clock() - record.started).total_seconds()
    log_line(
        logging.INFO,
        f"sweep {record.sweep} is still running ({len(record.results)} of {record.shards} "
        f"shard(s) reported, started {age:.0f}s ago); this trigger is acknowledged unrun, a "
        "later one sweeps",
        Delivered.BUSY,
        runningSweepId=record.sweep,
        durationMs=ms_since(started),
    )
    return {"busy": record.sweep}


def _clean_up(rt: ShardedRuntime, store: ProgressStore, current: str) -> list[Record]:
    """Remove expired progress records, logging each incomplete one with what it lacks; return
    the unfinished sharded sweeps still running (not ``current``). Never fails the sweep: a
    record left now is removed by a later one."""
    try:
        expired, live = store.others(retention_s(rt), keep=current)
    except ReconcileError as exc:
        log.warning("cannot list sweep progress records: %s", exc)
        return []
    now = rt.clock()
    running = [
        r for r in live if r.done is None and (now - r.started).total_seconds() <= SWEEP_MAX_AGE_S
    ]
    for record in expired:
        if record.done is None:
            partial = merge(record.results, record.shards)
            finishing = (
                f"; shard {record.finish.shard} began its end but never finished it (DNS "
                "delivery and report)"
                if record.finish is not None
                else ""
            )
            log_line(
                logging.WARNING,
                f"sweep {record.sweep} incomplete: {len(record.results)} of {record.shards} "
                f"shard(s) reported, missing {record.missing}{finishing}; the sweeps since "
                "have covered its part",
                Delivered.INCOMPLETE,
                incompleteSweepId=record.sweep,
                partial=partial,
            )
        try:
            store.remove(record)
        except ReconcileError as exc:
            log.warning("cannot remove sweep progress record %s: %s", record.sweep, exc)
    return running


def run_shard(rt: ShardedRuntime, shard: ShardMessage, started: float) -> dict[str, Any] | None:
    """Reconcile one shard's part of a sweep and record it; the shard that completes the set
    delivers DNS and logs the merged report (``finish_shard``).

    Acknowledged: stale (older than SWEEP_MAX_AGE_S since the fan-out: the sweep stays
    incomplete and the next sweep covers its part), a sweep with no record (finished and
    removed, or never started), a shard reported already (a redelivery: nothing is
    reconciled again), and refusals that a retry cannot change. Raised for redelivery:
    transient failures of the reconciler or of the progress record (the redelivery finds
    whether this shard got recorded).
    """
    with logs.context(sweepId=shard.sweep, shard=shard.label):
        age = (rt.clock() - shard.time).total_seconds()
        if age > SWEEP_MAX_AGE_S:
            log_line(
                logging.INFO,
                f"stale shard message acknowledged ({age:.0f}s old); sweep {shard.sweep} stays "
                "incomplete and the next sweep covers this part",
                Delivered.STALE,
            )
            return None
        if age < -MAX_CLOCK_SKEW_S:
            log_malformed(
                "shard message",
                "time in the future",
                said=f"time is {-age:.0f}s in the future",
            )
            return None
        try:
            store = rt.progress_store()
            record = store.load(shard.sweep)
        except PermanentError as exc:
            log_line(logging.ERROR, f"shard {shard.label}: {exc}", Delivered.PERMANENT_ERROR)
            return None
        except TransientError as exc:
            _redelivering(f"shard {shard.label}: transient failure", exc)
            raise
        if record is None:
            log_line(
                logging.INFO,
                f"shard message of sweep {shard.sweep} acknowledged: no progress record (the "
                "sweep finished and was cleaned up, or never started here)",
                Delivered.STALE,
            )
            return None
        if record.shards != shard.shards:
            log_malformed(
                "shard message",
                f"sweep {shard.sweep} has {record.shards} shards, not {shard.shards}",
            )
            return None
        if shard.shard in record.results:
            return _reported_already(rt, store, record, shard)
        token = new_token()
        t0 = time.monotonic()
        try:
            report = rt.shard_reconciler().sweep(
                only=lambda name: shard_of(name, shard.shards) == shard.shard, deliver=False
            )
        except (TransientError, PermanentError) as exc:
            what = f"shard {shard.label} failed before reconciling anything"
            if isinstance(exc, TransientError):
                _redelivering(what, exc, durationMs=ms_since(t0))
                raise
            log_line(
                logging.ERROR,
                f"{what}; the next sweep covers it: {exc}",
                Delivered.PERMANENT_ERROR,
                durationMs=ms_since(t0),
            )
            return None
        log_results(report, False)
        summary = summarize(report, ms_since(started), token)
        try:
            state, after = store.record(shard.sweep, shard.shard, summary)
        except TransientError as exc:
            _redelivering(f"shard {shard.label}: cannot record it", exc)
            raise
        if state is Recorded.UNKNOWN or after is None:
            log_line(
                logging.WARNING,
                f"shard {shard.label} done but its sweep's progress record is gone (expired); "
                "its part is reconciled, the sweep's report is lost",
                Delivered.STALE,
            )
            return None
        if state is Recorded.DUPLICATE:
            log_line(
                logging.INFO,
                f"shard {shard.label} was reported by another delivery meanwhile; not counted "
                "again",
                Delivered.DUPLICATE,
            )
            return None
        level = logging.WARNING if summary["driftCount"] or summary["errorCount"] else logging.INFO
        log_line(
            level,
            f"sweep {shard.sweep} shard {shard.label}: {_tally(summary)}; "
            f"{len(after.results)} of {after.shards} shard(s) reported",
            Delivered.SWEPT_SHARD,
            outcomes=summary["outcomes"],
            drift=summary["drift"],
            errors=summary["errors"],
            pruned=summary["pruned"],
            externalServices=summary["externalServices"],
            shardsReported=len(after.results),
            durationMs=ms_since(started),
        )
        if state is Recorded.COMPLETES:
            return finish_shard(rt, store, after, shard, token)
        return summary


def _reported_already(
    rt: ShardedRuntime, store: ProgressStore, record: Record, shard: ShardMessage
) -> dict[str, Any] | None:
    """A delivery of a shard reported already: nothing to do, unless it was the completing
    shard and its end was abandoned (then this delivery finishes the sweep)."""
    fin = record.finish
    if record.done is None and fin is not None and fin.shard == shard.shard:
        quiet_s = (rt.clock() - fin.since).total_seconds()
        if not fin.token or quiet_s > FINISH_LEASE_S:
            token = new_token()
            if store.take_over(record, shard.shard, token):
                log_line(
                    logging.WARNING,
                    f"sweep {shard.sweep}: its end was left unfinished ({quiet_s:.0f}s); "
                    f"shard {shard.label} finishes it",
                    Delivered.SWEPT_SHARD,
                )
                return finish_shard(rt, store, record, shard, token)
        else:
            log_line(
                logging.INFO,
                f"shard {shard.label}: the sweep's end is running in another delivery "
                f"({quiet_s:.0f}s so far); raising so that Pub/Sub asks again later",
                Delivered.TRANSIENT_ERROR,
            )
            raise TransientError(f"sweep {shard.sweep} is being finished by another delivery")
    log_line(
        logging.INFO,
        f"shard {shard.label} already reported ({len(record.results)} of {record.shards}"
        f"{', sweep done' if record.done is not None else ''}); nothing done",
        Delivered.DUPLICATE,
    )
    return None


def finish_shard(
    rt: ShardedRuntime, store: ProgressStore, record: Record, shard: ShardMessage, token: str
) -> dict[str, Any]:
    """The end of a sharded sweep, run once by the delivery that completed its record: DNS
    delivered from live state after every shard reconciled its part, then the one merged
    report logged with the sweep id, then the record marked done.

    A failure raises for redelivery after releasing the claim, so that the next delivery of
    this shard finishes at once. If the instance dies instead, the claim's lease runs out and
    a redelivery takes over; DNS delivery is idempotent, and at worst (a death between the
    report line and ``done``) the report is logged twice under the same sweep id.
    """
    t0 = time.monotonic()
    try:
        end = rt.shard_reconciler().finish_sweep()
    except (TransientError, PermanentError) as exc:
        _redelivering(
            f"sweep {shard.sweep}: DNS delivery at its end failed", exc, durationMs=ms_since(t0)
        )
        with contextlib.suppress(Exception):
            store.take_over(record, shard.shard, "")  # released: the next delivery finishes
        raise TransientError(f"end of sweep {shard.sweep}: {exc}") from exc
    merged = merge(record.results, record.shards, end.dns.to_dict() if end.dns else None)
    if end.errors:
        merged["errors"] = [*merged["errors"], *end.errors]
        merged["errorCount"] += len(end.errors)
    if end.access is not None:
        merged["access"] = end.access
    sweep_s = (rt.clock() - record.started).total_seconds()
    level = (
        logging.WARNING
        if merged["driftCount"] or merged["errorCount"] or merged["fightCount"]
        else logging.INFO
    )
    log_line(
        level,
        f"sweep: {_tally(merged)}"
        + (f", {merged['fightCount']} field manager fight(s)" if merged["fightCount"] else "")
        + f"; {record.shards} shards, sweep {shard.sweep} done in {sweep_s:.1f}s",
        Delivered.SWEPT,
        **{k: v for k, v in merged.items() if k not in ("missingShards", "shardsReported")},
        finishedBy=shard.shard,
        sweepSeconds=round(sweep_s, 3),
        dryRun=False,
        durationMs=ms_since(t0),
    )
    counts = {
        k: merged[k] for k in ("externalServices", "driftCount", "pruned", "errorCount", "shards")
    }
    store.mark_done(record, {"by": shard.shard, "sweepSeconds": round(sweep_s, 3), **counts})
    return merged
