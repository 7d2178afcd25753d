"""Exporter memory while watching 1,000 and then 10,000 ExternalServices (and the time to list
and publish them), against issue 16's targets: at most 60 MB at 1,000 and 80 MB at 10,000. The
previous exporter (official Kubernetes client, gRPC Pub/Sub client, whole lists held) had
110-120 MB at 1,000 (README: 115 MB, peak 122 MB).

The ExternalServices are created through the API, concurrently (no pods are needed: nothing
reconciles them), then the real exporter process starts against them (its RBAC identity, the
Pub/Sub emulator, a topic with no subscribers so that no function runs), lists them, publishes
one notice each and watches. RSS is read from /proc once it is ready and again after 200 of
them were updated through the watch; the peak is the kernel's high-water mark (VmHWM) of the
whole run, and it is what the targets are held to. The objects of the first count stay for the
second, which adds the rest; all are deleted at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import REPO, rss_kb
from bench.stack import bench_stack

COUNTS = (1000, 10000)
TARGET_MB = {1000: 60, 10000: 80}
PREVIOUS_MB = (110, 120)  # at 1,000, issue 16
UPDATES = 200
TOPIC = "bench-exporter-events"
CONCURRENCY = 16


@dataclass(frozen=True)
class Figures:
    count: int
    ready_s: float
    rss_ready_kb: int
    rss_after_kb: int
    peak_kb: int


def poll(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            value = check()
            if value:
                return value
        time.sleep(0.05)
    raise TimeoutError(f"no {what} within {timeout_s:.0f}s")


def measure(
    env: dict[str, str], port: int, names: list[str], admin: Any, min_replicas: int, src: Path
) -> Figures:
    """Start the exporter (from ``src``) over ``names``; its figures once ready and after
    ``UPDATES`` spec changes (``minReplicas`` set to ``min_replicas``) came through its watch."""
    from core.kube import EXTERNAL_SERVICE

    env = dict(env, EGRESS_EVENTS_TOPIC=TOPIC, EXPORTER_HEALTH_PORT=str(port), PYTHONPATH=str(src))
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter"],
        env=env,
        cwd=src,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def health(path: str) -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise RuntimeError(f"the exporter exited with {proc.returncode}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return dict(json.loads(r.read())) if r.status == 200 else None

    def updates_seen() -> bool:
        watches = (health("/healthz") or {}).get("watches", {})
        return int(watches["externalservices"]["events"]) >= UPDATES

    try:
        poll(lambda: health("/readyz"), 900, f"ready exporter over {len(names)} objects")
        ready_s = time.monotonic() - t0
        rss_ready, _ = rss_kb(proc.pid)
        patch = {"spec": {"minReplicas": min_replicas}}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: admin.merge_patch(EXTERNAL_SERVICE, n, patch), names[:UPDATES]))
        poll(updates_seen, 120, f"{UPDATES} updates through the watch")
        rss_after, peak = rss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return Figures(len(names), ready_s, rss_ready, rss_after, peak)


def report(f: Figures) -> str:
    peak_mb = f.peak_kb / 1024
    target = TARGET_MB[f.count]
    low, high = PREVIOUS_MB
    return (
        f"exporter watching {f.count:,} ExternalServices: ready in {f.ready_s:.1f}s; RSS "
        f"{f.rss_ready_kb / 1024:.0f}MB when ready, {f.rss_after_kb / 1024:.0f}MB after "
        f"{UPDATES} updates, peak {peak_mb:.0f}MB: target <= {target}MB "
        f"{'met' if peak_mb <= target else 'MISSED'} ({peak_mb / target:.2f}x the target; "
        f"{peak_mb / high:.2f}-{peak_mb / low:.2f}x the previous {low}-{high}MB at 1,000)"
    )


def main(src: Path = REPO) -> list[Figures]:
    from core import constants as c
    from core.kube import EXTERNAL_SERVICE, Kube, api_client_from_kubeconfig
    from egressctl.pipeline import LocalPipeline, PipelineConfig, free_port

    with bench_stack() as env:
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))

        def create(name: str) -> None:
            body = {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND,
                "metadata": {"name": name},
                "spec": {"dnsName": f"{name}.example.com", "ports": [{"port": 443}]},
            }
            admin.create(EXTERNAL_SERVICE, body)  # None if it exists (a run stopped earlier)

        os.environ["PUBSUB_EMULATOR_HOST"] = env["PUBSUB_EMULATOR_HOST"]
        from google.api_core import exceptions as gexc
        from google.cloud import pubsub_v1

        publisher = pubsub_v1.PublisherClient()
        with contextlib.suppress(gexc.AlreadyExists):
            publisher.create_topic(name=publisher.topic_path(env["PUBSUB_PROJECT_ID"], TOPIC))
        pipeline = LocalPipeline(
            PipelineConfig(dev_env=env, state_dir=Path(env["EGRESS_DEV_DIR"]), say=lambda m: None)
        )
        exporter_env = pipeline.exporter_env()
        names: list[str] = []
        results: list[Figures] = []
        try:
            for i, count in enumerate(COUNTS):
                new = [f"bench-rss-{k:05d}" for k in range(len(names), count)]
                t0 = time.monotonic()
                with ThreadPoolExecutor(CONCURRENCY) as pool:
                    list(pool.map(create, new))
                names += new
                print(
                    f"created {len(new):,} ExternalServices in {time.monotonic() - t0:.1f}s "
                    f"({CONCURRENCY} at a time), {len(names):,} in all"
                )
                figures = measure(exporter_env, free_port(), names, admin, 2 - i % 2, src)
                results.append(figures)
                print(report(figures), flush=True)
        finally:
            t0 = time.monotonic()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(lambda n: admin.delete(EXTERNAL_SERVICE, n), names))
            print(f"deleted {len(names):,} in {time.monotonic() - t0:.1f}s")
        return results


if __name__ == "__main__":
    main()
