"""Exporter memory while watching 1,000 ExternalServices (and the time to list and publish them).

1,000 minimal ExternalServices are created, then the real exporter process starts against them
(its RBAC identity, the Pub/Sub emulator, a topic with no subscribers so that no function runs),
lists them, publishes 1,000 notices and watches. RSS is read from /proc once it is ready and
again after 200 of them were updated through the watch.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench._common import REPO, rss_kb
from bench.stack import bench_stack

COUNT = 1000
TOPIC = "bench-exporter-events"


def main() -> None:
    from core import constants as c
    from core.kube import EXTERNAL_SERVICE, Kube, api_client_from_kubeconfig
    from egressctl.pipeline import LocalPipeline, PipelineConfig, free_port

    with bench_stack() as env:
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
        names = [f"bench-rss-{i:04d}" for i in range(COUNT)]

        def create(name: str) -> None:
            body = {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND,
                "metadata": {"name": name},
                "spec": {"dnsName": f"{name}.example.com", "ports": [{"port": 443}]},
            }
            with contextlib.suppress(Exception):
                admin.request("POST", EXTERNAL_SERVICE.path(), body=body)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, names))
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
        port = free_port()
        exporter_env.update({"EGRESS_EVENTS_TOPIC": TOPIC, "EXPORTER_HEALTH_PORT": str(port)})
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter"],
            env=exporter_env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            health = f"http://127.0.0.1:{port}/readyz"
            while True:
                with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=1) as r:
                    if r.status == 200:
                        break
                time.sleep(0.05)
            ready_s = time.monotonic() - t0
            rss_ready, _ = rss_kb(proc.pid)
            with ThreadPoolExecutor(8) as pool:
                list(
                    pool.map(
                        lambda n: admin.merge_patch(
                            EXTERNAL_SERVICE, n, {"spec": {"minReplicas": 2}}
                        ),
                        names[:200],
                    )
                )

            def events() -> int:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return int(json.loads(r.read())["watches"]["externalservices"]["events"])

            while events() < 200:
                time.sleep(0.1)
            rss_after, hwm = rss_kb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: admin.delete(EXTERNAL_SERVICE, n), names))
        print(f"exporter: listed and published {COUNT} notices, ready in {ready_s:.1f}s")
        print(
            f"exporter RSS watching {COUNT} ExternalServices: {rss_ready / 1024:.0f}MB when "
            f"ready, {rss_after / 1024:.0f}MB after 200 updates, peak {hwm / 1024:.0f}MB"
        )


if __name__ == "__main__":
    main()
