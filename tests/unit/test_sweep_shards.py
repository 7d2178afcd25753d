"""A sweep in shards, without a cluster: assignment, the shard message, merging, the progress
record's race safety, and the whole protocol through ``handle_sweep`` with a stub reconciler.

The API server is an in-memory ConfigMap store that enforces what the real one does for the
record (create refuses an existing name; a merge patch carrying ``metadata.resourceVersion``
is refused with 409 if the object moved on). ``tests/e2e/test_sweep_shards.py`` runs the same
protocol through the Pub/Sub emulator, functions-framework and the real API server.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import itertools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cloudevents.http import CloudEvent

from core.errors import PermanentError, TransientError
from core.kube import CONFIGMAP, EXTERNAL_SERVICE
from core.notice import BadNotice, format_time
from core.settings import Settings
from core.shards import (
    MAX_SHARDS,
    SHARD_KIND,
    BadShard,
    ShardMessage,
    looks_like_shard,
    parse_shard_message,
    shard_count,
    shard_of,
    sweep_id_of,
)
from functions.handlers import Runtime, handle_sweep
from functions.settings import PipelineSettings
from functions.shards import (
    FINISH_LEASE_S,
    LABEL_SWEEP,
    SAMPLE,
    SWEEP_MAX_AGE_S,
    ProgressStore,
    Recorded,
    merge,
    record_name,
    retention_s,
    summarize,
)
from reconcile.results import Action, Change, Outcome, Result, SweepReport
from tests.unit.stubs import NOW, captured_outcomes

NS = "egress-operator-system"
SWEEP = "0123456789abcdef"

# -- assignment -------------------------------------------------------------------------------


def test_assignment_is_pinned_across_processes_and_releases() -> None:
    # SHA-256 of the name: these values must never change, or a sweep whose shards run on
    # instances of two releases would lose or double names.
    assert [shard_of(n, 8) for n in ("google", "github", "dns-google", "example")] == [2, 7, 6, 7]
    assert shard_of("a", 64) == 10
    # The first 8 bytes of SHA-256, big-endian, modulo the shard count:
    # sha256("google") starts bbdefa2950f49882.
    assert shard_of("google", 8) == 0xBBDEFA2950F49882 % 8
    assert {shard_of(f"gw-{i}", 1) for i in range(100)} == {0}
    with pytest.raises(ValueError):
        shard_of("x", 0)


def test_assignment_covers_every_name_once_and_evenly() -> None:
    names = [f"bench-{i:05d}" for i in range(10_000)]
    for shards in (2, 5, 16, MAX_SHARDS):
        parts = Counter(shard_of(n, shards) for n in names)
        assert set(parts) == set(range(shards))
        assert sum(parts.values()) == len(names)
        mean = len(names) / shards
        assert max(parts.values()) < mean * 1.25 and min(parts.values()) > mean * 0.75, parts


def test_a_name_s_shard_depends_on_nothing_but_the_name() -> None:
    # Creating or deleting other ExternalServices mid-sweep moves no name (a range split would).
    before = {n: shard_of(n, 4) for n in ("alpha", "bravo", "charlie")}
    assert {n: shard_of(n, 4) for n in ("charlie", "alpha", "bravo", "zulu")} | before == {
        **before,
        "zulu": shard_of("zulu", 4),
    }


@pytest.mark.parametrize(
    ("objects", "size", "shards"),
    [
        (0, 2000, 1),
        (2000, 2000, 1),
        (2001, 2000, 2),
        (10_000, 2000, 5),
        (10_000, 0, 1),
        (10_000, 3, MAX_SHARDS),
        (7, 3, 3),
    ],
)
def test_shard_count(objects: int, size: int, shards: int) -> None:
    assert shard_count(objects, size) == shards


def test_sweep_id_is_one_per_trigger_message() -> None:
    a = sweep_id_of("123", "2026-01-02T03:04:05Z")
    assert a == sweep_id_of("123", "2026-01-02T03:04:05Z")  # a redelivery: the same sweep
    assert a != sweep_id_of("123", "2026-01-02T03:09:05Z")  # an emulator restart reused the id
    assert a != sweep_id_of("124", "2026-01-02T03:04:05Z")
    assert len(a) == 16 and int(a, 16) >= 0
    assert sweep_id_of("", "") != sweep_id_of("", "")  # no id: a new sweep each time


# -- the shard message --------------------------------------------------------------------------


def message(shard: int = 1, shards: int = 4, when: dt.datetime = NOW) -> ShardMessage:
    return ShardMessage(SWEEP, shard, shards, when)


def body(**overrides: Any) -> bytes:
    out = message().to_json()
    out.update(overrides)
    for key in [k for k, v in overrides.items() if v is DROP]:
        del out[key]
    return json.dumps(out).encode()


DROP = object()


def test_shard_message_round_trip() -> None:
    m = message()
    assert parse_shard_message(m.encode(), m.attributes()) == ShardMessage(SWEEP, 1, 4, NOW)
    assert parse_shard_message(m.encode()) == m  # attributes are optional, the body is enough
    assert m.attributes() == {"kind": SHARD_KIND, "sweep": SWEEP, "shard": "1"}
    assert len(m.encode()) < 150


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"{", "not JSON"),
        (b"[1]", "JSON object"),
        (b"\xff", "not UTF-8"),
        (b"[" * 5000, "larger than"),
        (body(v=2), "version"),
        (body(v=True), "version"),
        (body(extra=1), "unknown field"),
        (body(time=DROP), "missing field"),
        (body(kind="Notice"), "is not 'SweepShard'"),
        (body(sweep="ZZZZ"), "not a sweep id"),
        (body(sweep=5), "must be a string"),
        (body(shard="1"), "must be an integer"),
        (body(shard=True), "must be an integer"),
        (body(shards=1, shard=0), "from 2 to"),
        (body(shards=MAX_SHARDS + 1), "from 2 to"),
        (body(shard=4), "from 0 to 3"),
        (body(shard=-1), "from 0 to 3"),
        (body(shard=10**400), "from 0 to 3"),
        (body(time="yesterday"), "RFC 3339"),
        (body(time="0001-01-01T00:00:00+01:00"), "out of range"),
    ],
)
def test_malformed_shard_messages_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadNotice, match=reason):
        parse_shard_message(data)


def test_attributes_must_agree_with_the_body() -> None:
    m = message()
    with pytest.raises(BadShard, match="attribute shard"):
        parse_shard_message(m.encode(), {**m.attributes(), "shard": "2"})
    with pytest.raises(BadShard, match="attribute sweep"):
        parse_shard_message(m.encode(), {"sweep": "f" * 16})
    with pytest.raises(BadShard, match="not a map"):
        parse_shard_message(m.encode(), ["kind"])


@pytest.mark.parametrize(
    ("attributes", "data", "shard"),
    [
        (None, b'{"trigger":"scheduler"}', False),  # Cloud Scheduler's body, as before
        ({}, b"", False),
        (None, None, False),
        ({"kind": SHARD_KIND}, b"", True),  # then refused: it has no body
        ({"kind": "other"}, b'{"kind":"SweepShard"}', True),  # a shard that lost its attributes
        (None, b'{"kind":"SweepShard"', False),  # not JSON: a trigger's body is never read
        (None, b'["SweepShard"]', False),
        (None, b" " * 5000 + b'{"kind":"SweepShard"}', False),
    ],
)
def test_what_counts_as_a_shard_message(
    attributes: object, data: bytes | None, shard: bool
) -> None:
    assert looks_like_shard(attributes, data) is shard


# -- summaries and the merged report ----------------------------------------------------------


def change(name: str, action: Action = Action.UPDATE, kind: str = "ConfigMap") -> Change:
    return Change(action, kind, name, NS)


def report_of(names: Iterable[str], drifted: Iterable[str] = (), pruned: int = 0) -> SweepReport:
    drifted = set(drifted)
    report = SweepReport()
    for name in names:
        if name in drifted:
            report.results.append(Result(name, Outcome.CONVERGED, [change(name)]))
        else:
            report.results.append(Result(name, Outcome.IN_SYNC))
    report.pruned = [change(f"orphan-{i}", Action.DELETE) for i in range(pruned)]
    return report


def test_summary_is_bounded_and_merge_adds_up() -> None:
    names = [f"gw-{i}" for i in range(40)]
    big = summarize(report_of(names, drifted=names[:30], pruned=2), 12.5, "t0")
    assert big["externalServices"] == 40 and big["driftCount"] == 32 and big["pruned"] == 2
    assert len(big["drift"]) == SAMPLE and big["outcomes"] == {"converged": 30, "in-sync": 10}
    small = summarize(report_of(["x", "y"], drifted=["y"]), 3.0, "t1")
    small["errorCount"], small["errors"] = 1, [{"name": "z", "error": "boom"}]
    merged = merge({2: small, 0: big}, 3)
    assert merged["externalServices"] == 42
    assert merged["outcomes"] == {"converged": 31, "in-sync": 11}
    assert merged["driftCount"] == 33 and merged["pruned"] == 2 and merged["errorCount"] == 1
    assert merged["drift"][0]["name"] == "gw-0", "shard order, then the shard's own order"
    assert merged["drift"][-1]["name"] == "y"
    assert merged["missingShards"] == [1] and merged["shardsReported"] == 2
    assert merged["shardDurationsMs"] == [12.5, 3.0] and merged["dns"] is None
    assert json.dumps(merged)  # a log line


def test_merged_dns_drift_says_what_a_shard_added_to_the_corefile() -> None:
    s = summarize(report_of(["a"]), 1.0, "t")
    s["corefileAdded"] = "import /etc/coredns/x/*.override"
    merged = merge({0: s, 1: summarize(report_of(["b"]), 1.0, "u")}, 2, {"drift": []})
    assert merged["dns"]["drift"] == ["Corefile: added import /etc/coredns/x/*.override"]


def test_a_full_record_fits_a_configmap() -> None:
    # The worst a shard can write: every sample full, long names and errors.
    names = [f"{'n' * 50}-{i}" for i in range(100)]
    report = report_of(names, drifted=names, pruned=50)
    report.errors = [{"name": n, "error": "e" * 2000} for n in names]
    one = json.dumps(summarize(report, 1.0, "t" * 32))
    assert len(one) * MAX_SHARDS < 1_000_000 * 0.6


# -- the progress record against an API server that enforces preconditions --------------------


class FakeKube:
    """ConfigMaps of one namespace and a count of ExternalServices, with the API server's
    create/patch preconditions; ``fail`` injects an error into the next matching call."""

    def __init__(self, external_services: int = 0, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.objects: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.rv = itertools.count(100)
        self.external_services = external_services
        self.fail: dict[str, Exception] = {}
        self.calls: Counter[str] = Counter()

    def _maybe_fail(self, what: str) -> None:
        self.calls[what] += 1
        exc = self.fail.pop(what, None)
        if exc is not None:
            raise exc

    def get(self, resource: Any, name: str, namespace: str | None = None) -> Any:
        assert resource is CONFIGMAP and namespace == NS
        self._maybe_fail("get")
        with self.lock:
            obj = self.objects.get(name)
            read = copy.deepcopy(obj) if obj is not None else None
        if self.delay_s:
            time.sleep(self.delay_s * random.random())  # what was read goes stale: writes race
        return read

    def create(self, resource: Any, obj: dict[str, Any], **_: Any) -> Any:
        assert resource is CONFIGMAP
        self._maybe_fail("create")
        with self.lock:
            name = obj["metadata"]["name"]
            if name in self.objects:
                return None
            stored = copy.deepcopy(obj)
            stored["metadata"].update(
                uid=f"uid-{name}",
                resourceVersion=str(next(self.rv)),
                creationTimestamp=format_time(NOW),
            )
            self.objects[name] = stored
            return copy.deepcopy(stored)

    def merge_patch(
        self,
        resource: Any,
        name: str,
        patch: dict[str, Any],
        namespace: str | None = None,
        *,
        final_statuses: frozenset[int] = frozenset(),
        **_: Any,
    ) -> Any:
        assert resource is CONFIGMAP and 409 in final_statuses
        self._maybe_fail("patch")
        with self.lock:
            obj = self.objects.get(name)
            if obj is None:
                raise PermanentError("404 not found", 404)
            want = (patch.get("metadata") or {}).get("resourceVersion")
            if want is not None and want != obj["metadata"]["resourceVersion"]:
                raise PermanentError("409 the object has been modified", 409)
            obj.setdefault("data", {}).update(patch.get("data") or {})
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            return copy.deepcopy(obj)

    def delete(
        self, resource: Any, name: str, namespace: str | None = None, *, uid: str = ""
    ) -> bool:
        self._maybe_fail("delete")
        with self.lock:
            obj = self.objects.get(name)
            if obj is None or (uid and obj["metadata"]["uid"] != uid):
                return False
            del self.objects[name]
            return True

    def list_all(
        self,
        resource: Any,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        keep: Callable[[Any], Any] | None = None,
        **_: Any,
    ) -> tuple[list[Any], str]:
        self._maybe_fail("list")
        if resource is EXTERNAL_SERVICE:
            items = [{"metadata": {"name": f"es-{i}"}} for i in range(self.external_services)]
            return [keep(i) if keep else i for i in items], "1"
        assert resource is CONFIGMAP and label_selector == LABEL_SWEEP
        with self.lock:
            return [
                copy.deepcopy(o)
                for o in self.objects.values()
                if LABEL_SWEEP in (o["metadata"].get("labels") or {})
            ], "1"

    def count(self, resource: Any, namespace: str | None = None) -> int:
        assert resource is EXTERNAL_SERVICE
        self._maybe_fail("count")
        return self.external_services


class FakeApi:
    """``ApiClient.call_api`` answering LISTs of ExternalServices page by page."""

    def __init__(self, total: int, remaining_count: bool) -> None:
        self.total = total
        self.remaining_count = remaining_count
        self.queries: list[dict[str, str]] = []

    def call_api(self, path: str, method: str, **kwargs: Any) -> Any:
        query = dict(kwargs["query_params"])
        self.queries.append(query)
        start = int(query.get("continue", "0"))
        end = min(self.total, start + int(query["limit"]))
        meta: dict[str, Any] = {"resourceVersion": "5"}
        if end < self.total:
            meta["continue"] = str(end)
            if self.remaining_count:
                meta["remainingItemCount"] = self.total - end
        page = {"items": [{"metadata": {"name": f"es-{i}"}} for i in range(start, end)]}
        page["metadata"] = meta

        class Response:
            data = json.dumps(page).encode()

        return Response()


@pytest.mark.parametrize("total", [0, 1, 2, 1234])
@pytest.mark.parametrize("remaining_count", [True, False])
def test_the_count_is_one_small_list_when_the_server_says_the_rest(
    total: int, remaining_count: bool
) -> None:
    from core.kube import Kube

    api = FakeApi(total, remaining_count)
    assert Kube(api, page_size=500).count(EXTERNAL_SERVICE) == total
    if remaining_count or total <= 1:
        assert [q["limit"] for q in api.queries] == ["1"]
    else:  # the fallback: a full paginated LIST
        assert len(api.queries) == 1 + -(-total // 500)


@dataclass
class Clock:
    now: dt.datetime = NOW

    def __call__(self) -> dt.datetime:
        return self.now


def store(kube: FakeKube, clock: Clock | None = None) -> ProgressStore:
    return ProgressStore(kube, NS, clock=clock or Clock(), sleep=lambda _s: None)  # type: ignore[arg-type]


def test_record_counts_each_shard_once_and_one_write_completes() -> None:
    kube = FakeKube()
    s = store(kube)
    record, created = s.start(SWEEP, 3, "trigger-1")
    assert created and record.missing == [0, 1, 2]
    again, created = s.start(SWEEP, 3, "trigger-1")  # a redelivered trigger
    assert not created and again.shards == 3
    summary = {"externalServices": 1, "token": "a"}
    assert s.record(SWEEP, 1, summary)[0] is Recorded.RECORDED
    assert s.record(SWEEP, 1, {**summary, "token": "b"})[0] is Recorded.DUPLICATE
    # The same delivery again (its answer was lost): still its own write, not a duplicate.
    assert s.record(SWEEP, 1, summary)[0] is Recorded.RECORDED
    assert s.record(SWEEP, 0, {**summary, "token": "c"})[0] is Recorded.RECORDED
    state, final = s.record(SWEEP, 2, {**summary, "token": "d"})
    assert state is Recorded.COMPLETES and final is not None
    assert final.finish is not None and (final.finish.shard, final.finish.token) == (2, "d")
    assert s.record(SWEEP, 2, {**summary, "token": "d"})[0] is Recorded.COMPLETES
    assert s.record(SWEEP, 2, {**summary, "token": "e"})[0] is Recorded.DUPLICATE
    assert s.record("f" * 16, 0, summary)[0] is Recorded.UNKNOWN
    loaded = s.load(SWEEP)
    assert loaded is not None and sorted(loaded.results) == [0, 1, 2] and loaded.done is None
    s.mark_done(loaded, {"by": 2})
    done = s.load(SWEEP)
    assert done is not None and done.done is not None and done.done["by"] == 2


def test_concurrent_shards_complete_the_set_exactly_once() -> None:
    kube = FakeKube(delay_s=0.005)
    s = store(kube)
    shards = 24
    s.start(SWEEP, shards, "t")
    results: dict[int, Recorded] = {}
    barrier = threading.Barrier(shards * 2)

    def one(shard: int, copy_: int) -> None:
        barrier.wait()
        state, _ = s.record(SWEEP, shard, {"token": f"{shard}-{copy_}"})
        results[shard * 10 + copy_] = state

    threads = [threading.Thread(target=one, args=(k, c)) for k in range(shards) for c in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(results.values())
    # Every shard twice (a duplicate delivery each): 24 recorded, 24 duplicates, one of the
    # recorded ones completes the set.
    assert counts[Recorded.COMPLETES] == 1
    assert counts[Recorded.RECORDED] == shards - 1
    assert counts[Recorded.DUPLICATE] == shards
    record = s.load(SWEEP)
    assert record is not None and record.missing == [] and record.finish is not None
    assert kube.calls["patch"] > shards, "no conflicts: the test raced nothing"


def test_a_conflict_storm_gives_up_for_redelivery() -> None:
    kube = FakeKube()
    s = store(kube)
    s.start(SWEEP, 2, "t")
    original = kube.merge_patch

    def always_conflicts(*args: Any, **kwargs: Any) -> Any:
        raise PermanentError("409", 409)

    kube.merge_patch = always_conflicts  # type: ignore[method-assign]
    with pytest.raises(TransientError, match="kept changing"):
        s.record(SWEEP, 0, {"token": "a"})
    kube.merge_patch = original  # type: ignore[method-assign]
    assert s.record(SWEEP, 0, {"token": "a"})[0] is Recorded.RECORDED


def test_expired_records_are_found_and_unreadable_ones_too() -> None:
    kube = FakeKube()
    clock = Clock()
    s = store(kube, clock)
    s.start(SWEEP, 2, "t")
    clock.now = NOW + dt.timedelta(seconds=100)
    s.start("a" * 16, 2, "u")
    kube.objects[record_name("b" * 16)] = {
        "metadata": {
            "name": record_name("b" * 16),
            "labels": {LABEL_SWEEP: "b" * 16},
            "uid": "x",
            "resourceVersion": "1",
            "creationTimestamp": format_time(NOW),
        },
        "data": {"sweep": "not json"},
    }
    clock.now = NOW + dt.timedelta(seconds=150)
    expired, live = s.others(120, keep="a" * 16)
    assert {r.sweep for r in expired} == {"b" * 16, SWEEP} and live == []
    expired_, live = s.others(120, keep=SWEEP)
    assert expired_ == [r for r in expired if r.sweep == "b" * 16]
    assert [r.sweep for r in live] == ["a" * 16]
    for record in expired:
        assert s.remove(record)
    assert list(kube.objects) == [record_name("a" * 16)]


# -- the whole protocol through handle_sweep ----------------------------------------------------


@dataclass
class ShardStub:
    """Stands in for the Reconciler: a fixed set of ExternalServices and orphans."""

    names: list[str]
    orphans: list[str] = field(default_factory=list)
    drifted: set[str] = field(default_factory=set)
    reconciled: Counter[str] = field(default_factory=Counter)
    pruned: Counter[str] = field(default_factory=Counter)
    whole_sweeps: int = 0
    finishes: int = 0
    fail_sweep: Exception | None = None
    fail_finish: Exception | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reconcile(self, name: str) -> Result:
        raise AssertionError("a sweep reconciles nothing one by one")

    def sweep(
        self, *, only: Callable[[str], bool] | None = None, deliver: bool = True
    ) -> SweepReport:
        if self.fail_sweep is not None:
            exc, self.fail_sweep = self.fail_sweep, None
            raise exc
        mine = [n for n in self.names if only is None or only(n)]
        report = report_of(mine, drifted=self.drifted)
        report.pruned = [change(o, Action.DELETE) for o in self.orphans if only is None or only(o)]
        with self.lock:
            self.reconciled.update(mine)
            self.pruned.update(ch.name for ch in report.pruned)
            if only is None:
                assert deliver
                self.whole_sweeps += 1
            else:
                assert not deliver, "a shard never delivers DNS"
        return report

    def finish_sweep(self) -> SweepReport:
        if self.fail_finish is not None:
            exc, self.fail_finish = self.fail_finish, None
            raise exc
        with self.lock:
            self.finishes += 1
        return SweepReport()


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[ShardMessage] = []
        self.fail: Exception | None = None

    def publish(self, messages: Iterable[ShardMessage]) -> None:
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        self.published.extend(messages)


@dataclass
class ShardRuntime(Runtime):
    fake_kube: FakeKube = field(default_factory=FakeKube)
    stub: ShardStub = field(default_factory=lambda: ShardStub([]))
    fake_publisher: FakePublisher = field(default_factory=FakePublisher)

    def kube(self) -> Any:
        return self.fake_kube

    def reconciler(self, dry_run: bool = False) -> Any:
        assert not dry_run
        return self.stub

    def publisher(self) -> Any:
        return self.fake_publisher


def shard_runtime(
    names: int, shard_size: int = 10, orphans: int = 0, drifted: int = 0
) -> ShardRuntime:
    clock = Clock()
    all_names = [f"gw-{i:03d}" for i in range(names)]
    rt = ShardRuntime(
        Settings.from_env({}),
        PipelineSettings(sweep_shard_size=shard_size),
        env={},
        clock=clock,
        sleep=lambda _s: None,
        fake_kube=FakeKube(external_services=names),
        stub=ShardStub(
            all_names, [f"orphan-{i}" for i in range(orphans)], set(all_names[:drifted])
        ),
    )
    return rt


def trigger(message_id: str = "42", time: dt.datetime = NOW) -> CloudEvent:
    data = base64.b64encode(b'{"trigger":"scheduler"}').decode()
    return CloudEvent(
        {
            "id": message_id,
            "type": "google.cloud.pubsub.topic.v1.messagePublished",
            "source": "//pubsub.googleapis.com/projects/p/topics/egress-sweep",
            "time": format_time(time),
        },
        {"message": {"data": data, "messageId": message_id}},
    )


def shard_event(m: ShardMessage | bytes, attributes: dict[str, str] | None = None) -> CloudEvent:
    data = m.encode() if isinstance(m, ShardMessage) else m
    attrs = (
        attributes
        if attributes is not None
        else (m.attributes() if isinstance(m, ShardMessage) else {})
    )
    return CloudEvent(
        {
            "id": str(random.randrange(10**9)),
            "type": "google.cloud.pubsub.topic.v1.messagePublished",
            "source": "//pubsub.googleapis.com/projects/p/topics/egress-sweep",
            "time": format_time(NOW),
        },
        {"message": {"data": base64.b64encode(data).decode(), "attributes": attrs}},
    )


def test_below_the_threshold_the_sweep_runs_whole_in_one_invocation() -> None:
    rt = shard_runtime(10, shard_size=10)
    with captured_outcomes() as read:
        out = handle_sweep(rt, trigger())
    assert out is not None and out["externalServices"] == 10
    assert rt.stub.whole_sweeps == 1 and rt.fake_publisher.published == []
    [line] = read()
    assert line["outcome"] == "swept" and line["sweepId"] == sweep_id_of("42", format_time(NOW))
    assert not rt.fake_kube.objects, "no progress record for a whole sweep"


def test_without_sharding_not_one_request_more() -> None:
    rt = shard_runtime(50, shard_size=0)
    with captured_outcomes() as read:
        handle_sweep(rt, trigger())
    assert rt.stub.whole_sweeps == 1 and sum(rt.fake_kube.calls.values()) == 0
    assert [e["outcome"] for e in read()] == ["swept"]


def run_shards(rt: ShardRuntime, messages: list[ShardMessage]) -> list[Any]:
    return [handle_sweep(rt, shard_event(m)) for m in messages]


def test_fan_out_then_every_name_once_by_its_shard_dns_once_one_report() -> None:
    rt = shard_runtime(95, shard_size=20, orphans=7, drifted=4)
    sweep_id = sweep_id_of("42", format_time(NOW))
    with captured_outcomes() as read:
        out = handle_sweep(rt, trigger())
        assert out is not None and out["shards"] == 5 and out["published"] == 5
        messages = rt.fake_publisher.published
        assert [m.shard for m in messages] == [0, 1, 2, 3, 4]
        assert {(m.sweep, m.shards) for m in messages} == {(sweep_id, 5)}
        order = messages[:]
        random.Random(7).shuffle(order)
        # Out of order, and two of them delivered twice (once after the end).
        run_shards(rt, [*order[:3], order[0], *order[3:], order[1]])
    stub = rt.stub
    assert stub.whole_sweeps == 0
    assert stub.reconciled == Counter(stub.names), "each name exactly once"
    assert stub.pruned == Counter(stub.orphans), "each orphan exactly once"
    assert stub.finishes == 1, "DNS delivered once"
    lines = read()
    assert all(e["sweepId"] == sweep_id for e in lines)
    by_outcome = Counter(e["outcome"] for e in lines)
    assert by_outcome["fanned-out"] == 1 and by_outcome["swept-shard"] == 5
    assert by_outcome["duplicate"] == 2 and by_outcome["swept"] == 1
    [merged] = [e for e in lines if e["outcome"] == "swept"]
    assert merged["externalServices"] == 95 and merged["shards"] == 5
    assert merged["driftCount"] == 4 + 7 and merged["pruned"] == 7
    assert merged["outcomes"] == {"converged": 4, "in-sync": 91}
    assert lines.index(merged) > max(
        i for i, e in enumerate(lines) if e["outcome"] == "swept-shard"
    ), "the report comes after every shard"
    shard_lines = [e for e in lines if e["outcome"] == "swept-shard"]
    assert sorted(e["shard"] for e in shard_lines) == [f"{k}/5" for k in range(5)]
    # Drift lines of single objects carry the sweep id and their shard too.
    drift_lines = [e for e in lines if e["outcome"] == "converged"]
    assert len(drift_lines) == 4
    for e in drift_lines:
        assert e["shard"] == f"{shard_of(e['externalService'], 5)}/5"
    record = rt.progress_store().load(sweep_id)
    assert (
        record is not None
        and record.done is not None
        and record.done["by"] == int(merged["finishedBy"])
    )


def test_a_redelivered_trigger_publishes_only_what_is_missing_and_then_nothing() -> None:
    rt = shard_runtime(40, shard_size=10)
    with captured_outcomes() as read:
        handle_sweep(rt, trigger())
        first = list(rt.fake_publisher.published)
        run_shards(rt, first[:2])
        rt.fake_publisher.published.clear()
        out = handle_sweep(rt, trigger())  # the same Pub/Sub message again
        assert out is not None and [m.shard for m in rt.fake_publisher.published] == [2, 3]
        assert rt.fake_publisher.published[0].time == first[0].time, "ages from the fan-out"
        run_shards(rt, rt.fake_publisher.published)
        rt.fake_publisher.published.clear()
        handle_sweep(rt, trigger())
        assert rt.fake_publisher.published == []
    assert rt.stub.finishes == 1 and rt.stub.reconciled == Counter(rt.stub.names)
    assert [e["outcome"] for e in read()].count("swept") == 1


def test_a_failed_publish_raises_so_that_the_trigger_comes_again() -> None:
    rt = shard_runtime(40, shard_size=10)
    rt.fake_publisher.fail = TransientError("unavailable")
    with captured_outcomes() as read, pytest.raises(TransientError):
        handle_sweep(rt, trigger())
    assert read()[-1]["outcome"] == "transient-error"
    handle_sweep(rt, trigger())
    assert len(rt.fake_publisher.published) == 4


def test_a_lost_shard_leaves_the_sweep_incomplete_until_a_later_sweep_reports_it() -> None:
    rt = shard_runtime(40, shard_size=10)
    assert isinstance(rt.clock, Clock)
    with captured_outcomes() as read:
        handle_sweep(rt, trigger("1"))
        run_shards(rt, rt.fake_publisher.published[1:])  # shard 0 is never delivered
        assert rt.stub.finishes == 0
        rt.clock.now = NOW + dt.timedelta(seconds=retention_s(rt) + 1)
        rt.fake_publisher.published.clear()
        handle_sweep(rt, trigger("2", rt.clock.now))
    lines = read()
    [incomplete] = [e for e in lines if e["outcome"] == "incomplete"]
    assert incomplete["severity"] == "WARNING"
    assert incomplete["incompleteSweepId"] == sweep_id_of("1", format_time(NOW))
    assert "missing [0]" in incomplete["message"]
    assert incomplete["partial"]["shardsReported"] == 3
    assert record_name(sweep_id_of("1", format_time(NOW))) not in rt.fake_kube.objects
    assert len(rt.fake_publisher.published) == 4, "the next sweep is a whole new one"


def test_stale_unknown_and_mismatched_shard_messages_are_acknowledged_unrun() -> None:
    rt = shard_runtime(40, shard_size=10)
    with captured_outcomes() as read:
        handle_sweep(rt, trigger())
        m = rt.fake_publisher.published[0]
        old = ShardMessage(m.sweep, 0, 4, NOW - dt.timedelta(seconds=SWEEP_MAX_AGE_S + 1))
        handle_sweep(rt, shard_event(old))
        handle_sweep(rt, shard_event(ShardMessage("f" * 16, 0, 4, NOW)))
        handle_sweep(rt, shard_event(ShardMessage(m.sweep, 0, 5, NOW)))
        future = ShardMessage(m.sweep, 0, 4, NOW + dt.timedelta(hours=1))
        handle_sweep(rt, shard_event(future))
    assert sum(rt.stub.reconciled.values()) == 0
    assert [e["outcome"] for e in read()][1:] == ["stale", "stale", "malformed", "malformed"]


@pytest.mark.parametrize(
    ("data", "attributes", "reason"),
    [
        (body(shard=9), None, "from 0 to 3"),
        (b"not json", {"kind": SHARD_KIND}, "not JSON"),
        (body(), {"kind": SHARD_KIND, "shard": "2"}, "does not match"),
        (body(extra=1), None, "unknown field"),
        (b"", {"kind": SHARD_KIND}, "no data"),
    ],
)
def test_malformed_shard_messages_are_logged_and_acknowledged(
    data: bytes, attributes: dict[str, str] | None, reason: str
) -> None:
    rt = shard_runtime(40, shard_size=10)
    event = shard_event(data, attributes or {})
    if data == b"":
        event.data["message"].pop("data")
    with captured_outcomes() as read:
        assert handle_sweep(rt, event) is None
    [line] = read()
    assert line["outcome"] == "malformed" and line["severity"] == "WARNING", line
    assert reason in line["reason"], line
    assert sum(rt.stub.reconciled.values()) == 0 and rt.stub.whole_sweeps == 0


def test_a_shard_that_fails_transiently_is_redelivered_and_then_counted_once() -> None:
    rt = shard_runtime(20, shard_size=10)
    handle_sweep(rt, trigger())
    first, second = rt.fake_publisher.published
    rt.stub.fail_sweep = TransientError("503 from the API server")
    with pytest.raises(TransientError):
        handle_sweep(rt, shard_event(first))
    # The record write fails after the reconciles: raised, redelivered, recorded once.
    rt.fake_kube.fail["patch"] = TransientError("timeout")
    with pytest.raises(TransientError):
        handle_sweep(rt, shard_event(first))
    run_shards(rt, [first, second])
    assert rt.stub.finishes == 1
    record = rt.progress_store().load(first.sweep)
    assert record is not None and sorted(record.results) == [0, 1]


def test_the_end_is_retried_at_once_after_a_failure_and_taken_over_after_a_death() -> None:
    rt = shard_runtime(20, shard_size=10)
    assert isinstance(rt.clock, Clock)
    with captured_outcomes() as read:
        handle_sweep(rt, trigger())
        first, second = rt.fake_publisher.published
        handle_sweep(rt, shard_event(first))
        rt.stub.fail_finish = TransientError("DNS ConfigMaps kept changing")
        with pytest.raises(TransientError):
            handle_sweep(rt, shard_event(second))
        # Released: its redelivery finishes at once.
        handle_sweep(rt, shard_event(second))
        assert rt.stub.finishes == 1
        assert [e["outcome"] for e in read()].count("swept") == 1

    # An instance that dies mid-end leaves the claim; a duplicate waits out the lease.
    rt = shard_runtime(20, shard_size=10)
    assert isinstance(rt.clock, Clock)
    handle_sweep(rt, trigger())
    first, second = rt.fake_publisher.published
    handle_sweep(rt, shard_event(first))
    rt.stub.fail_finish = KeyboardInterrupt()  # not caught: the instance is gone
    with pytest.raises(KeyboardInterrupt):
        handle_sweep(rt, shard_event(second))
    with pytest.raises(TransientError, match="being finished"):
        handle_sweep(rt, shard_event(second))
    assert rt.stub.finishes == 0
    rt.clock.now = NOW + dt.timedelta(seconds=FINISH_LEASE_S + 1)
    with captured_outcomes() as read:
        handle_sweep(rt, shard_event(second))
        handle_sweep(rt, shard_event(second))
    assert rt.stub.finishes == 1
    assert [e["outcome"] for e in read()] == ["swept-shard", "swept", "duplicate"]
    assert rt.stub.reconciled == Counter(rt.stub.names)


def test_one_sharded_sweep_at_a_time() -> None:
    rt = shard_runtime(40, shard_size=10)
    assert isinstance(rt.clock, Clock)
    with captured_outcomes() as read:
        handle_sweep(rt, trigger("1"))
        first = list(rt.fake_publisher.published)
        run_shards(rt, first[:3])
        rt.fake_publisher.published.clear()
        rt.clock.now = NOW + dt.timedelta(seconds=300)
        out = handle_sweep(rt, trigger("2", rt.clock.now))  # the next schedule, too early
        assert out == {"busy": first[0].sweep} and rt.fake_publisher.published == []
        run_shards(rt, first[3:])
        handle_sweep(rt, trigger("3", rt.clock.now))  # the one after: runs
        assert len(rt.fake_publisher.published) == 4
    outcomes = [e["outcome"] for e in read()]
    assert outcomes.count("busy") == 1 and outcomes.count("fanned-out") == 2
    assert rt.stub.reconciled == Counter(rt.stub.names), "no name reconciled twice meanwhile"
