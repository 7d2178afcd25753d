"""Helpers of the end-to-end tests: the pipeline's JSON logs, a holding API proxy, kubeconfigs."""

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


def log_size(path: Path) -> int:
    """Where a log ends now: pass it as ``since`` to read only what a test caused."""
    return path.stat().st_size if path.exists() else 0


def log_entries(path: Path, since: int = 0) -> list[dict[str, Any]]:
    """Every JSON line of a pipeline log from byte ``since`` (non-JSON lines are skipped).

    Logs outlive pipelines and the emulator numbers messages from 1 again after a restart, so
    tests read only what was written after they started.
    """
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with path.open("rb") as fh:
        fh.seek(since)
        text = fh.read().decode(errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


@dataclass
class HoldProxy:
    """Forwards to the API server as the kubeconfig's identity, but *holds* requests matching
    ``(method, path fragment)`` until released, and then drops them unanswered: a request that
    never completed, as when its client dies mid-reconcile."""

    kubeconfig: str
    method: str
    fragment: str
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        with open(self.kubeconfig, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        context.load_cert_chain(user["client-certificate"], user["client-key"])
        target = urlsplit(cluster["server"])
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == proxy.method and proxy.fragment in self.path:
                    proxy.held.set()
                    proxy.release.wait(120)
                    self.close_connection = True
                    return
                conn = http.client.HTTPSConnection(
                    target.hostname, target.port, context=context, timeout=60
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
        assert self.server is not None
        host, port = self.server.server_address[:2]
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": f"http://{host!s}:{port}"}}],
            "users": [{"name": "proxy", "user": {}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
            "current-context": "proxy",
        }
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def fingerprint(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What changes only when someone writes an object's spec: its generation where it has
    one (controllers keep updating Deployment and HPA status), else its resourceVersion."""
    out = {}
    for kind, obj in objects.items():
        meta = obj["metadata"]
        out[kind] = f"g{meta['generation']}" if "generation" in meta else meta["resourceVersion"]
    return out
