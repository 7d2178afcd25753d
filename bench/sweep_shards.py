"""Benchmark: a sweep of 10,000 ExternalServices as one invocation vs N shards in parallel.

Both run through the local pipeline's function as deployed: ``on_sweep`` served by
functions-framework gets Cloud Scheduler's trigger as a Pub/Sub push; sharded, its coordinator
publishes the shard messages to the sweep topic of the Pub/Sub emulator, and each is pushed back
to ``on_sweep``. The bench does the pushing itself (``Sweeps``: the emulator's own push sends at
most two messages at a time and redelivers one unanswered after 600 s, doubling a long shard;
``tests/e2e/test_sweep_shards.py`` proves that path). A sweep's time is from the trigger's push to
its report line in the function's log (the merged report, for shards); requests are the API
server's own counts (``bench._apiserver``).

``on_sweep`` runs as N gunicorn worker processes of one request each (functions-framework reads
WORKERS and THREADS): each worker is one function instance (Cloud Functions 2nd gen serves one
request per instance by default), processes rather than threads so that shards do not share one
interpreter lock. All N shards are pushed at once, but the machine has 2 cores, shared with the
API server and etcd (and whatever else runs): in Google Cloud each shard has a CPU of its own and
the API server is elsewhere, so the wall-time ratio here is a floor on what sharding gains there.
What sharding is for holds either way: the longest invocation, which must fit the function's
540 s timeout, is one shard's, not the whole sweep's.

BENCH_SHARDS_N (default 10,000) ExternalServices are created through the API (no pods: the
controller-manager, kube-proxy and kube-router of the bench stack are paused, so that the 2 cores
measure the reconciler and the API server, not the node's agents reacting to 10,000 gateways).
Then, for each state, one invocation (SWEEP_SHARD_SIZE=0) and BENCH_SHARDS shards (default 5:
SWEEP_SHARD_SIZE=ceil(N/shards), 2,000 at 10,000):

- in sync: nothing to write;
- drift: every gateway's ConfigMap deleted (one write per ExternalService to repair);
- rebuild (BENCH_SHARDS_REBUILD=1, off by default): every gateway object deleted (five to six
  writes per ExternalService). Off because at this scale it measures the local API server's
  ClusterIP allocator, not the sweep: with 8,000 Services it took 0.1-0.25 s per allocation
  under one lock (``kube_apiserver_clusterip_allocator_allocation_duration_seconds``), so 10,000
  new Services take half an hour whatever the shards (Service applies averaged 14 s with 80
  queued). Run it with a smaller BENCH_SHARDS_N.

From the single invocation's time per object in each state it extrapolates (linearly, and says
so) how many ExternalServices one invocation sweeps within the deployed 540 s timeout.

Run: `make bench` (or `.venv/bin/python -m bench.sweep_shards`).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._apiserver import delete_all, node_paused, ours, request_total, verbs_text
from bench._common import children_of, rss_kb
from bench.stack import bench_stack
from core import constants as c
from core.kube import CONFIGMAP, EXTERNAL_SERVICE, GATEWAY_KINDS, Kube, api_client_from_kubeconfig
from core.notice import format_time
from egressctl.pipeline import SWEEP_FUNCTION, SWEEP_SUBSCRIPTION, LocalPipeline, PipelineConfig
from functions.shards import LABEL_SWEEP
from tests.e2e.helpers import log_entries, log_size

PREFIX = "shard-"
GATEWAY_NS = "egress-operator-system"
BENCH_LABEL = "egress.dev/bench"
BENCH_VALUE = "shards"
FUNCTION_TIMEOUT_S = 540  # cloudbuild.yaml deploys on_sweep with --timeout=540s
PASS_DEADLINE_S = 3600.0
TRIGGER = b'{"trigger":"scheduler"}'  # Cloud Scheduler's body (never read)


def _create(admin: Kube, n: int) -> float:
    from tests.integration.helpers import external_service

    def one(i: int) -> None:
        body = external_service(f"{PREFIX}{i:05d}", dnsName=f"svc{i:05d}.example.com")
        body["metadata"]["labels"] = {BENCH_LABEL: BENCH_VALUE}
        admin.request("POST", EXTERNAL_SERVICE.path(), body=body)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - start


def _delete(admin: Kube, kinds: tuple[Any, ...]) -> float:
    """Delete every gateway object of these kinds (a collection delete per kind)."""
    start = time.perf_counter()
    for resource in kinds:
        delete_all(admin, resource.path(GATEWAY_NS), c.LABEL_GATEWAY)
    return time.perf_counter() - start


def _cleanup(admin: Kube) -> None:
    """This benchmark's ExternalServices (finalizers released), gateways and progress records."""
    selector = f"{BENCH_LABEL}={BENCH_VALUE}"
    delete_all(admin, EXTERNAL_SERVICE.path(), selector)
    items, _ = admin.list_all(EXTERNAL_SERVICE, label_selector=selector)
    stuck = [i["metadata"]["name"] for i in items if i["metadata"].get("finalizers")]

    def release(name: str) -> None:
        admin.merge_patch(EXTERNAL_SERVICE, name, {"metadata": {"finalizers": None}})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(release, stuck))
    _delete(admin, GATEWAY_KINDS)
    delete_all(admin, CONFIGMAP.path(GATEWAY_NS), LABEL_SWEEP)


class Sweeps:
    """Sweeps through the local pipeline: on_sweep configured per pass, every message pushed to
    it as Pub/Sub pushes (the raw push body, which functions-framework turns into the
    CloudEvent), shard messages taken from the emulator's sweep subscription.

    The bench is its own push: the sweep subscription is switched to pull, and ``relay`` pulls
    what the coordinator published and POSTs every shard at once (retrying a failed POST, as
    Pub/Sub redelivers). The emulator's own push sends at most two messages of a subscription
    at a time and redelivers one left unanswered for 600 s, which would run a long shard (or a
    long whole sweep) a second time beside the first; tests/e2e/test_sweep_shards.py covers
    that path."""

    def __init__(self, pipeline: LocalPipeline, admin: Kube) -> None:
        self.pipeline = pipeline
        self.admin = admin
        self.log = pipeline.log_path(SWEEP_FUNCTION)
        self.posted = 0
        pipeline.detach_push()  # pull: the relay delivers
        self.subscriber = pipeline._clients()[1]
        self.subscription = pipeline.subscription(SWEEP_SUBSCRIPTION)
        self._drain()

    def configure(self, shard_size: int, workers: int) -> None:
        if SWEEP_FUNCTION in self.pipeline.procs:
            self.pipeline.kill_function(SWEEP_FUNCTION)
        self.pipeline.start_function(
            SWEEP_FUNCTION,
            {"SWEEP_SHARD_SIZE": str(shard_size), "WORKERS": str(workers), "THREADS": "1"},
        )

    def run(self, shards: int) -> dict[str, Any]:
        """One sweep from Cloud Scheduler's trigger to its report line (the merged one)."""
        since = log_size(self.log)
        before = request_total(self.admin)
        start = time.monotonic()
        posts = [self._push(TRIGGER, {}, f"bench-{os.getpid()}-{self.posted}")]
        self.posted += 1
        if shards > 1:
            posts += self._relay(shards, start)
        report = self._wait(since, start)
        wall = time.monotonic() - start
        for post in posts:
            post.join(timeout=60)
        after = request_total(self.admin)
        lines = log_entries(self.log, since)
        sweep_id = report.get("sweepId")
        return {
            "wallSeconds": round(wall, 1),
            "report": report,
            "server": ours(before, after),
            "redelivered": any(
                e.get("outcome") in ("duplicate", "transient-error")
                and e.get("sweepId") == sweep_id
                for e in lines
            ),
            "workerPeakRssMiB": self._worker_peak_rss(),
        }

    def _relay(self, shards: int, start: float) -> list[threading.Thread]:
        posts: list[threading.Thread] = []
        while len(posts) < shards:
            if time.monotonic() - start > PASS_DEADLINE_S:
                raise RuntimeError(f"only {len(posts)} of {shards} shard messages published")
            response = self.subscriber.pull(
                subscription=self.subscription, max_messages=shards, timeout=30
            )
            received = list(response.received_messages)
            if received:
                self.subscriber.acknowledge(
                    subscription=self.subscription, ack_ids=[m.ack_id for m in received]
                )
            for m in received:
                attributes = dict(m.message.attributes)
                if attributes.get("kind") == "SweepShard":
                    posts.append(self._push(m.message.data, attributes, m.message.message_id))
        return posts

    def _push(self, data: bytes, attributes: dict[str, str], message_id: str) -> threading.Thread:
        body = {
            "message": {
                "data": base64.b64encode(data).decode(),
                "messageId": message_id,
                "publishTime": format_time(dt.datetime.now(dt.UTC)),
                "attributes": attributes,
            },
            "subscription": self.subscription,
        }
        thread = threading.Thread(target=self._post, args=(json.dumps(body).encode(),))
        thread.start()
        return thread

    def _post(self, body: bytes) -> None:
        for attempt in range(3):
            request = urllib.request.Request(
                self.pipeline.url(SWEEP_FUNCTION),
                data=body,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=PASS_DEADLINE_S) as response:
                    response.read()
                return
            except OSError as exc:  # a 500 (the handler raised) or a dropped connection
                print(f"[bench] push failed ({exc}); pushing again", file=sys.stderr)
                time.sleep(1.0 + attempt)

    def _drain(self) -> None:
        """Acknowledge what earlier runs left on the sweep subscription."""
        while True:
            response = self.subscriber.pull(
                subscription=self.subscription, max_messages=100, timeout=5
            )
            if not response.received_messages:
                return
            self.subscriber.acknowledge(
                subscription=self.subscription,
                ack_ids=[m.ack_id for m in response.received_messages],
            )

    def close(self) -> None:
        self.subscriber.close()

    def _wait(self, since: int, start: float) -> dict[str, Any]:
        while time.monotonic() - start < PASS_DEADLINE_S:
            for entry in log_entries(self.log, since):
                if entry.get("outcome") == "swept":
                    return entry
                if entry.get("outcome") == "error":
                    raise RuntimeError(f"sweep failed: {entry.get('message')}")
            time.sleep(0.5)  # polling the log against a deadline
        raise RuntimeError(f"no sweep report within {PASS_DEADLINE_S:.0f}s; see {self.log}")

    def _worker_peak_rss(self) -> float:
        record = self.pipeline.procs.get(SWEEP_FUNCTION)
        if record is None:
            return 0.0
        peaks = []
        for pid in children_of(record.pid):
            try:
                peaks.append(rss_kb(pid)[1])
            except (FileNotFoundError, ProcessLookupError, KeyError):
                continue
        return round(max(peaks, default=0) / 1024, 1)


def _longest_s(fig: dict[str, Any]) -> float:
    """The longest single invocation of a sweep: what must fit the function's timeout (a
    shard's time is from its delivery to its record written; the whole sweep's from its
    trigger's delivery to its report)."""
    report = fig["report"]
    durations = report.get("shardDurationsMs") or [report.get("durationMs") or 0]
    return float(max(durations)) / 1000


def _line(label: str, fig: dict[str, Any]) -> str:
    server = fig["server"]
    report = fig["report"]
    shards = (
        f", shard times {', '.join(f'{ms / 1000:.1f}' for ms in report['shardDurationsMs'])} s"
        if report.get("shardDurationsMs")
        else ""
    )
    drift = report.get("driftCount", len(report.get("drift") or []))
    again = " REDELIVERED: a second delivery ran meanwhile" if fig["redelivered"] else ""
    return (
        f"{label}: {fig['wallSeconds']:.1f} s, {report.get('externalServices')} ExternalServices, "
        f"{drift} drift change(s); {server['total']} requests ({verbs_text(server)}; "
        f"{server['writes']} writes); worker peak RSS {fig['workerPeakRssMiB']} MiB{shards}{again}"
    )


def main() -> int:
    n = int(os.environ.get("BENCH_SHARDS_N", "10000"))
    shards = int(os.environ.get("BENCH_SHARDS", "5"))
    rebuild = os.environ.get("BENCH_SHARDS_REBUILD", "0") == "1"
    # Stopped (SIGTERM), it still resumes the paused node and removes its objects.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shard_size = math.ceil(n / shards)
    with bench_stack() as env:
        os.environ.update(env)
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]), timeout_s=600)
        load = Path("/proc/loadavg").read_text().split()[0]
        print(f"machine: {os.cpu_count()} CPUs, load average {load} at the start")
        _cleanup(admin)
        pipeline = LocalPipeline(
            PipelineConfig(
                dev_env=env,
                state_dir=Path(env["EGRESS_DEV_DIR"]),
                sweep_interval_s=None,
                say=lambda _msg: None,
            )
        )
        pipeline.ensure_pubsub()  # on_sweep only: no exporter, no on_event
        sweeps = Sweeps(pipeline, admin)
        figures: dict[str, dict[str, dict[str, Any]]] = {}
        try:
            with node_paused() as stopped:
                print(f"paused on the bench node: {', '.join(stopped) or 'nothing'}")
                created_s = _create(admin, n)
                print(f"setup: created {n} ExternalServices through the API in {created_s:.1f} s")
                sharded = f"{shards} shards of ~{shard_size}"
                sweeps.configure(shard_size, shards)
                first = sweeps.run(shards)
                print(_line(f"setup: first converge, {sharded}", first))
                states: list[tuple[str, Callable[[], float]]] = [
                    ("in sync", lambda: 0.0),
                    ("drift (every ConfigMap deleted)", lambda: _delete(admin, (CONFIGMAP,))),
                ]
                if rebuild:
                    states.append(
                        (
                            "rebuild (every gateway object deleted)",
                            lambda: _delete(admin, GATEWAY_KINDS),
                        )
                    )
                for state, prepare in states:
                    figures[state] = {}
                    for label, size, workers in (
                        ("one invocation", 0, 1),
                        (sharded, shard_size, shards),
                    ):
                        prepared = prepare()
                        sweeps.configure(size, workers)
                        fig = sweeps.run(1 if size == 0 else shards)
                        figures[state][label] = fig
                        extra = f" (after {prepared:.1f} s of deleting)" if prepared else ""
                        print(_line(f"{state}, {label}{extra}", fig))
                    one, many = figures[state]["one invocation"], figures[state][sharded]
                    longest_one = _longest_s(one)
                    longest_many = _longest_s(many)
                    print(
                        f"ratio {state}: {sharded} / one invocation: wall time "
                        f"x{many['wallSeconds'] / max(one['wallSeconds'], 1e-9):.2f}, longest "
                        f"invocation {longest_many:.1f} s vs {longest_one:.1f} s "
                        f"(x{longest_many / max(longest_one, 1e-9):.2f}), requests "
                        f"x{many['server']['total'] / max(one['server']['total'], 1):.2f}, "
                        f"writes {many['server']['writes']} vs {one['server']['writes']}"
                    )
        finally:
            if SWEEP_FUNCTION in pipeline.procs:
                pipeline.stop_process(SWEEP_FUNCTION)
            sweeps.close()
            _cleanup(admin)
        print(
            f"where one invocation exceeds the {FUNCTION_TIMEOUT_S} s timeout "
            f"(linear extrapolation from the {n} measured here, per-object cost = time / {n}):"
        )
        for state, by_label in figures.items():
            one = by_label["one invocation"]
            per_object_ms = one["wallSeconds"] * 1000 / n
            limit = FUNCTION_TIMEOUT_S * n / one["wallSeconds"]
            shard_s = one["wallSeconds"] * shard_size / n
            print(
                f"  {state}: {per_object_ms:.1f} ms per ExternalService -> about {limit:,.0f} "
                f"ExternalServices in {FUNCTION_TIMEOUT_S} s; a shard of {shard_size}: "
                f"~{shard_s:.0f} s"
            )
        return 0


if __name__ == "__main__":
    sys.exit(main())
