"""A small HTTP proxy in front of the real API server that injects failures on request.

Tests point a client at ``http://127.0.0.1:<port>``; the proxy forwards over TLS with the
identity's client certificate, except for requests matching a queued fault, which get a
synthetic status (409, 429 with Retry-After, 500...) or a dropped connection instead. It
records every request it receives (``seen``): what the client sent, counted outside the client.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml


@dataclass
class Fault:
    method: str
    path_contains: str
    status: int | None  # None: drop the connection
    times: int = 1
    retry_after: str | None = None
    # With both set: signal ``held`` and wait for ``release`` before dropping the connection,
    # a request that never completes (as when its client dies mid-flight).
    held: threading.Event | None = None
    release: threading.Event | None = None


@dataclass
class FaultProxy:
    upstream: str
    context: ssl.SSLContext
    faults: list[Fault] = field(default_factory=list)
    injected: list[tuple[str, str, int | None]] = field(default_factory=list)
    # Every request that reached the proxy, (method, path with query), in order.
    seen: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @classmethod
    def from_kubeconfig(cls, path: str) -> FaultProxy:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        context.load_cert_chain(user["client-certificate"], user["client-key"])
        return cls(upstream=cluster["server"], context=context)

    def inject(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def _take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.path_contains in path and fault.times > 0:
                    fault.times -= 1
                    self.injected.append((method, path, fault.status))
                    return fault
        return None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        proxy = self
        target = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.seen.append((self.command, self.path))
                fault = proxy._take(self.command, self.path)
                if fault is not None:
                    if fault.held is not None and fault.release is not None:
                        fault.held.set()
                        fault.release.wait(120)
                    if fault.status is None:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    payload = json.dumps(
                        {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "code": fault.status,
                        }
                    ).encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if fault.retry_after:
                        self.send_header("Retry-After", fault.retry_after)
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPSConnection(
                    target.hostname, target.port, context=proxy.context, timeout=30
                )
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "authorization")
                }
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def write_kubeconfig(self, path: Path) -> str:
        """A kubeconfig that reaches the API server through this proxy."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
            "users": [{"name": "proxy", "user": {}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
            "current-context": "proxy",
        }
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    def stop(self) -> None:
        for fault in self.faults:
            if fault.release is not None:
                fault.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
