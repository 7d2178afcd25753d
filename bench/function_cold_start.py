"""Cold start of the event function: process start → listening (imports of main.py) → first
reconcile answered (lazy kubernetes import, client, one reconcile), and its peak RSS.

Each trial is a fresh functions-framework process (gunicorn master + one worker, as Cloud Run
runs it) fed one Pub/Sub push body naming an existing ExternalService, exactly what the
emulator's push subscription sends.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench._common import REPO, children_of, rss_kb, summary
from bench.stack import bench_stack

TRIALS = 5
NAME = "bench-cold"


def main() -> None:
    from core import constants as c
    from core.kube import EXTERNAL_SERVICE, Kube, api_client_from_kubeconfig
    from core.notice import EventType, Notice, NoticeChange, NoticeKind
    from egressctl.pipeline import LocalPipeline, PipelineConfig, free_port

    with bench_stack() as env:
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
        body = {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "metadata": {"name": NAME},
            "spec": {"dnsName": "cold.example.com", "ports": [{"port": 443}]},
        }
        if admin.get(EXTERNAL_SERVICE, NAME) is None:
            admin.request("POST", EXTERNAL_SERVICE.path(), body=body)
        pipeline = LocalPipeline(
            PipelineConfig(dev_env=env, state_dir=Path(env["EGRESS_DEV_DIR"]), say=lambda m: None)
        )
        fn_env = pipeline.functions_env()
        listen, first, total, worker_rss, all_rss = [], [], [], [], []
        try:
            for trial in range(TRIALS):
                port = free_port()
                argv = [
                    sys.executable, "-m", "functions_framework", "--target=on_event",
                    "--signature-type=cloudevent", f"--source={REPO / 'main.py'}",
                    "--host=127.0.0.1", f"--port={port}",
                ]  # fmt: skip
                t0 = time.monotonic()
                proc = subprocess.Popen(
                    argv, env=fn_env, cwd=REPO, start_new_session=True,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                        break
                    except OSError:
                        time.sleep(0.005)
                t_listen = time.monotonic()
                notice = Notice(
                    NAME,
                    NoticeKind.EXTERNAL_SERVICE,
                    NoticeChange.SPEC,
                    EventType.MODIFIED,
                    str(trial + 1),
                    dt.datetime.now(dt.UTC),
                )
                push = {
                    "subscription": "projects/p/subscriptions/s",
                    "message": {
                        "data": base64.b64encode(notice.encode()).decode(),
                        "messageId": f"cold-{trial}",
                        "attributes": notice.attributes(),
                    },
                }
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/",
                    data=json.dumps(push).encode(),
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                with urllib.request.urlopen(request, timeout=60) as resp:
                    assert resp.status == 200
                t_done = time.monotonic()
                workers = children_of(proc.pid)
                worker = rss_kb(workers[0])[1] / 1024 if workers else 0.0
                master = rss_kb(proc.pid)[1] / 1024
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                listen.append((t_listen - t0) * 1000)
                first.append((t_done - t_listen) * 1000)
                total.append((t_done - t0) * 1000)
                worker_rss.append(worker)
                all_rss.append(worker + master)
        finally:
            admin.merge_patch(EXTERNAL_SERVICE, NAME, {"metadata": {"finalizers": None}})
            admin.delete(EXTERNAL_SERVICE, NAME)
        print(f"process start + imports (listening): {summary(listen)}")
        print(f"first event (kubernetes import, client, reconcile): {summary(first)}")
        print(f"cold start total: {summary(total)}")
        print(f"peak RSS of the worker: {summary(worker_rss, 'MB')}")
        print(f"peak RSS master + worker: {summary(all_rss, 'MB')}")


if __name__ == "__main__":
    main()
