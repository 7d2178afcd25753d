"""Process entry of the exporter: settings, client, health endpoint, watch threads, exit codes.

Exit 0 on SIGTERM/SIGINT after flushing pending notices; exit 1 when a notice could not be
published within the bounded retries (the Deployment restarts it, and the restart re-lists);
exit 2 on bad settings.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from core import logs
from core.notice import Notice
from exporter.publisher import PubSubPublisher
from exporter.settings import ExporterSettings, ExporterSettingsError
from exporter.watch import Exporter

log = logs.get("exporter")


def health_server(
    exporter: Exporter,
    fatal: threading.Event,
    threads: list[threading.Thread],
    host: str,
    port: int,
) -> Any:
    """``/healthz`` (liveness: watch threads alive, publishing not failed) and ``/readyz``
    (both initial lists published)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            alive = not fatal.is_set() and all(t.is_alive() for t in threads)
            body: dict[str, Any] = {
                "alive": alive,
                "ready": exporter.ready,
                "watches": {
                    key: {
                        "resourceVersion": w.resource_version,
                        "listed": w.listed,
                        "relists": w.relists,
                        "events": w.events,
                    }
                    for key, w in exporter.watches.items()
                },
            }
            if self.path.startswith("/healthz"):
                ok = alive
            elif self.path.startswith("/readyz"):
                ok = alive and exporter.ready
            else:
                self.send_error(404)
                return
            payload = json.dumps(body).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def run(env: Mapping[str, str]) -> int:
    try:
        settings = ExporterSettings.from_env(env)
    except ExporterSettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.project)
    from core.kube import Kube
    from core.kubehttp import KubeConfigError, KubeHttp

    # core.kubehttp, not the official client: its import alone would be most of our memory.
    try:
        if settings.kubeconfig or not env.get("KUBERNETES_SERVICE_HOST"):
            api = KubeHttp.from_kubeconfig(settings.kubeconfig)
        else:
            api = KubeHttp.in_cluster(env)
    except KubeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fatal = threading.Event()
    failure: list[str] = []

    def on_fatal(exc: BaseException, notice: Notice) -> None:
        failure.append(f"publishing {notice.name} ({notice.change}) failed: {exc}")
        fatal.set()

    publisher = PubSubPublisher(
        settings.project,
        settings.events_topic,
        timeout_s=settings.publish_timeout_s,
        on_fatal=on_fatal,
        workers=settings.publish_concurrency,
        env=env,
    )
    exporter = Exporter(Kube(api), publisher, settings)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threads = [
        threading.Thread(target=exporter.watch_loop, args=(key,), name=f"watch-{key}", daemon=True)
        for key in exporter.watches
    ]
    server = health_server(exporter, fatal, threads, settings.health_host, settings.health_port)
    logs.log(
        log,
        logging.INFO,
        f"exporter started: topic {settings.events_topic}, health on port "
        f"{server.server_address[1]}",
        healthPort=server.server_address[1],
    )
    for thread in threads:
        thread.start()
    while not stop.is_set() and not fatal.is_set():
        stop.wait(0.5)
    exporter.stop()
    if fatal.is_set():
        logs.log(
            log,
            logging.CRITICAL,
            f"{failure[0] if failure else 'publishing failed'}; exiting so that the restart "
            "re-lists and republishes everything",
        )
        sys.stdout.flush()
        os._exit(1)
    flushed = publisher.flush(10.0)
    logs.log(log, logging.INFO, "exporter stopping", flushed=flushed)
    sys.stdout.flush()
    if not flushed:
        os._exit(1)
    publisher.stop()
    for thread in threads:
        thread.join(timeout=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(os.environ)
