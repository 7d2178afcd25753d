"""The exporter's footprint: it ships and imports only what it runs, and what it runs instead of
the official Kubernetes client and the gRPC Pub/Sub client keeps their semantics.

- exporter/requirements.txt (what its image installs) is pinned in step with constraints.txt
  and requirements.txt, holds neither client nor functions-framework, and covers every module
  the exporter loads when it runs;
- core.kubehttp reads kubeconfigs and the service account, and speaks ``call_api`` as
  ``core.kube.Kube`` uses it (checked against a local HTTP server playing the API server, with
  paginated lists and a watch stream, through the real Exporter);
- the REST publisher keeps one request in flight per ordering key, in publish order, batches a
  key's queued notices, retries what Pub/Sub calls retryable within the deadline, reports
  everything else (and everything after) as fatal, and bounds what it holds.
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib.metadata
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from core import constants as c
from core.errors import HttpError, classify
from core.kube import EXTERNAL_SERVICE, Gone, Kube
from core.kubehttp import Endpoint, KubeConfigError, KubeHttp, endpoint_from_kubeconfig
from core.notice import EventType, Notice, NoticeChange, NoticeKind
from exporter.publisher import PubSubPublisher
from exporter.settings import ExporterSettings
from exporter.watch import Exporter, SeenExternalService
from tests.unit.test_packaging import distribution_closure

REPO = Path(__file__).resolve().parents[2]
EXPORTER_REQUIREMENTS = REPO / "exporter" / "requirements.txt"
# What the exporter must never ship: the clients it replaced, and the functions' runtime.
NOT_SHIPPED = {
    "kubernetes",
    "google-cloud-pubsub",
    "grpcio",
    "google-api-core",
    "protobuf",
    "functions-framework",
}
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def pins(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            out[canonicalize_name(req.name)] = spec.version
    return out


# -- what the image installs -------------------------------------------------------------------


def test_exporter_requirements_are_pinned_in_step() -> None:
    mine = pins(EXPORTER_REQUIREMENTS)
    constraints = pins(REPO / "constraints.txt")
    shared = pins(REPO / "requirements.txt")
    for name, version in mine.items():
        assert constraints.get(name) == version, f"{name}: constraints.txt has another pin"
        if name in shared:
            assert shared[name] == version, f"{name}: requirements.txt has another pin"
    # And the whole installed closure is pinned, so that the image build is reproducible.
    unpinned = distribution_closure(list(mine)) - set(constraints)
    assert not unpinned, f"not in constraints.txt: {sorted(unpinned)}"


def test_exporter_image_ships_neither_client_nor_the_functions_runtime() -> None:
    shipped = distribution_closure(list(pins(EXPORTER_REQUIREMENTS)))
    assert not shipped & NOT_SHIPPED, sorted(shipped & NOT_SHIPPED)


def test_exporter_loads_only_what_its_requirements_install(tmp_path: Path) -> None:
    """Everything the running exporter loads (its modules, its clients built, the
    credentials modules it uses on GKE) comes from exporter/requirements.txt's closure, and
    neither the official Kubernetes client nor gRPC is ever imported."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    script = textwrap.dedent(
        f"""
        import json, sys
        import exporter.main
        from core.kube import Kube
        from core.kubehttp import KubeHttp
        from exporter.publisher import PubSubPublisher
        from exporter.settings import ExporterSettings
        from exporter.watch import Exporter
        import google.auth._default, google.auth.compute_engine  # what google.auth.default() uses
        kube = Kube(KubeHttp.from_kubeconfig({str(kubeconfig)!r}))
        pub = PubSubPublisher("p", "t", timeout_s=1, on_fatal=print,
                              env={{"PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}})
        Exporter(kube, pub, ExporterSettings(project="p"))
        pub.stop()
        files = sorted({{getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}})
        print(json.dumps({{"modules": sorted(sys.modules), "files": files}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout.splitlines()[-1])
    heavy = [m for m in loaded["modules"] if m.split(".")[0] in ("kubernetes", "grpc")]
    heavy += [m for m in loaded["modules"] if m.startswith(("google.cloud.", "google.api_core"))]
    assert not heavy, heavy[:10]
    allowed = distribution_closure(list(pins(EXPORTER_REQUIREMENTS))) | {"pip", "setuptools"}
    owners: dict[str, set[str]] = {}
    allowed_dirs: set[str] = set()
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file))).resolve()
            owners.setdefault(str(path), set()).add(name)
            if name in allowed:
                allowed_dirs |= {str(d) for d in path.parents}

    def elsewhere(file: str) -> set[str]:
        path = Path(file).resolve()
        by = owners.get(str(path), set())
        # A namespace root's __init__.py that another package of the dev venv wrote (here
        # google/): the image, without that package, has a namespace package there.
        if by & allowed or (path.name == "__init__.py" and str(path.parent) in allowed_dirs):
            return set()
        return by

    outside = sorted(
        f"{f} ({', '.join(sorted(by))})" for f in loaded["files"] if f and (by := elsewhere(f))
    )
    assert not outside, "the exporter loads modules from elsewhere:\n" + "\n".join(outside)


# -- core.kubehttp -------------------------------------------------------------------------------


def kubeconfig(user: dict[str, Any], cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://10.0.0.1:6443"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [
            {"name": "x", "context": {"cluster": "c", "user": "u"}},
            {"name": "y", "context": {"cluster": "c"}},
        ],
        "current-context": "x",
    }


def test_kubeconfig_files_are_relative_to_it_and_data_becomes_private_files(
    tmp_path: Path,
) -> None:
    cfg = kubeconfig(
        {"client-certificate": "pki/me.crt", "client-key": "/abs/me.key"},
        {"server": "https://a:1", "certificate-authority": "ca.crt", "tls-server-name": "k"},
    )
    ep = endpoint_from_kubeconfig(cfg, tmp_path)
    assert ep == Endpoint(
        server="https://a:1",
        ca_file=str(tmp_path / "ca.crt"),
        tls_server_name="k",
        cert_file=str(tmp_path / "pki/me.crt"),
        key_file="/abs/me.key",
    )
    b64 = base64.b64encode
    cfg = kubeconfig(
        {"client-certificate-data": b64(b"CERT").decode(), "client-key-data": b64(b"KEY").decode()},
        {"server": "https://a:1", "certificate-authority-data": b64(b"CA").decode()},
    )
    ep = endpoint_from_kubeconfig(cfg, tmp_path)
    assert ep.ca_data == "CA" and ep.ca_file is None
    assert ep.cert_file and Path(ep.cert_file).read_bytes() == b"CERT"
    assert ep.key_file and Path(ep.key_file).read_bytes() == b"KEY"
    assert Path(ep.key_file).stat().st_mode & 0o077 == 0


def test_kubeconfig_tokens_contexts_and_refusals(tmp_path: Path) -> None:
    assert endpoint_from_kubeconfig(kubeconfig({"token": "abc"}), tmp_path).token == "abc"
    assert endpoint_from_kubeconfig(kubeconfig({"tokenFile": "t"}), tmp_path).token_file == str(
        tmp_path / "t"
    )
    insecure = kubeconfig({}, {"server": "https://a", "insecure-skip-tls-verify": True})
    assert endpoint_from_kubeconfig(insecure, tmp_path).verify is False
    assert endpoint_from_kubeconfig(kubeconfig({"token": "a"}), tmp_path, "y").token is None
    for user, reason in (
        ({"exec": {"command": "gke-gcloud-auth-plugin"}}, "'exec' credentials"),
        ({"auth-provider": {"name": "gcp"}}, "'auth-provider' credentials"),
        ({"client-certificate": "a.crt"}, "needs its key"),
    ):
        with pytest.raises(KubeConfigError, match=reason):
            endpoint_from_kubeconfig(kubeconfig(user), tmp_path)
    with pytest.raises(KubeConfigError, match="no context named 'z'"):
        endpoint_from_kubeconfig(kubeconfig({}), tmp_path, "z")
    with pytest.raises(KubeConfigError, match="name one file"):
        KubeHttp.from_kubeconfig(f"{tmp_path}/a:{tmp_path}/b")


def test_in_cluster_reads_the_service_account_and_rereads_its_token(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="not in a pod"):
        KubeHttp.in_cluster({}, tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(KubeConfigError, match="no service account token"):
        KubeHttp.in_cluster(env, tmp_path)
    (tmp_path / "token").write_text("one\n")
    (tmp_path / "ca.crt").write_text("")
    api = KubeHttp.in_cluster(env, tmp_path)
    assert api.endpoint.server == "https://[fd00::1]:443"
    assert api.endpoint.ca_file == str(tmp_path / "ca.crt")
    assert api._current_token() == "one"
    (tmp_path / "token").write_text("two\n")  # the kubelet rotated it
    assert api._current_token() == "one"  # read again only after a minute
    api._token_read_at -= 61
    assert api._current_token() == "two"


class FakeApiServer:
    """A local HTTP server playing the API server's answers to the exporter's requests:
    paginated LISTs of ExternalServices (as many a page as the client's limit) and one watch
    stream."""

    def __init__(self, names: list[str], watch_lines: list[dict[str, Any]]) -> None:
        self.names = names
        self.watch_lines = watch_lines
        self.requests: list[tuple[str, str, dict[str, list[str]], dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                server.requests.append(("GET", url.path, query, dict(self.headers)))
                if url.path == "/apis/apps/v1/namespaces/egress-operator-system/deployments":
                    self.reply(200, {"metadata": {"resourceVersion": "7"}, "items": []})
                elif url.path != EXTERNAL_SERVICE.path():
                    self.reply(404, {"kind": "Status", "code": 404, "message": "nope"})
                elif query.get("watch") == ["true"]:
                    self.stream(server.watch_lines)
                else:
                    start = int((query.get("continue") or ["0"])[0])
                    chunk = server.names[start : start + int(query["limit"][0])]
                    more = start + len(chunk) < len(server.names)
                    meta: dict[str, Any] = {"resourceVersion": "42"}
                    if more:
                        meta["continue"] = str(start + len(chunk))
                    items = [es(n, rv=str(10 + i)) for i, n in enumerate(chunk)]
                    self.reply(200, {"metadata": meta, "items": items})

            def reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def stream(self, lines: list[dict[str, Any]]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for line in lines:
                    data = json.dumps(line).encode() + b"\n"
                    # Split mid-line: the reader must join chunks into lines.
                    for part in (data[:7], data[7:]):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def es(name: str, rv: str = "1", generation: int = 1, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "generation": generation,
            "resourceVersion": rv,
            **meta,
        },
        "spec": {"dnsName": f"{name}.example.com", "ports": [{"port": 443}]},
    }


@pytest.fixture
def fake_api() -> Iterator[Callable[..., FakeApiServer]]:
    servers: list[FakeApiServer] = []

    def make(names: list[str], watch_lines: list[dict[str, Any]] | None = None) -> FakeApiServer:
        servers.append(FakeApiServer(names, watch_lines or []))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_call_api_sends_the_token_and_raises_http_errors_as_classified(
    fake_api: Callable[..., FakeApiServer],
) -> None:
    server = fake_api(["a"])
    kube = Kube(KubeHttp(Endpoint(server=server.url, token="secret")))
    items, rv = kube.list_all(EXTERNAL_SERVICE)
    assert [i["metadata"]["name"] for i in items] == ["a"] and rv == "42"
    assert server.requests[0][3]["Authorization"] == "Bearer secret"
    with pytest.raises(HttpError) as info:
        kube.api.call_api("/api/v1/nothing", "GET", _preload_content=False)
    failure = classify(info.value)
    assert failure.status == 404 and not failure.transient and "nope" in failure.message
    assert classify(HttpError(503, "busy", {"Retry-After": "2"})).retry_after_s == 2.0
    assert kube.get(EXTERNAL_SERVICE, "missing") is None


def test_kube_watch_yields_events_and_bookmarks_and_raises_gone_on_410(
    fake_api: Callable[..., FakeApiServer],
) -> None:
    lines = [
        {"type": "ADDED", "object": es("a", rv="50")},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "51"}}},
        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}},
    ]
    server = fake_api([], watch_lines=lines)
    kube = Kube(KubeHttp(Endpoint(server=server.url)))
    seen: list[tuple[str, str]] = []
    with pytest.raises(Gone, match="too old"), kube.watch(EXTERNAL_SERVICE, "49") as events:
        for event_type, obj in events:
            seen.append((event_type, obj["metadata"]["resourceVersion"]))
    assert seen == [("ADDED", "50"), ("BOOKMARK", "51")]
    query = server.requests[-1][2]
    assert query["resourceVersion"] == ["49"] and query["allowWatchBookmarks"] == ["true"]
    assert kube.counters.calls[("WATCH", EXTERNAL_SERVICE.path())] == 1


class Recorder:
    def __init__(self) -> None:
        self.notices: list[Notice] = []

    def publish(self, notice: Notice) -> None:
        self.notices.append(notice)

    def flush(self, timeout_s: float) -> bool:
        return True


def test_exporter_relists_page_by_page_holding_only_seen_state(
    fake_api: Callable[..., FakeApiServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"es-{i}" for i in range(5)]
    lines = [
        {"type": "MODIFIED", "object": es("es-1", rv="60", generation=2)},
        {"type": "MODIFIED", "object": es("es-2", rv="61")},  # a status write: no notice
        {"type": "DELETED", "object": es("es-3", rv="62")},
    ]
    server = fake_api(names, watch_lines=lines)
    monkeypatch.setattr("exporter.watch.LIST_PAGE_SIZE", 2)
    recorder = Recorder()
    exporter = Exporter(
        Kube(KubeHttp(Endpoint(server=server.url))),
        recorder,
        ExporterSettings(project="p"),
        clock=lambda: NOW,
    )
    exporter.es_seen["gone-meanwhile"] = SeenExternalService("u", 1, False, ())
    assert exporter.relist("externalservices") == "42"
    lists = [r for r in server.requests if "limit" in r[2]]
    assert len(lists) == 3, "five objects in pages of two"
    assert [(n.name, n.change) for n in recorder.notices] == [
        *[(n, NoticeChange.RELIST) for n in names],
        ("gone-meanwhile", NoticeChange.DELETED),
    ]
    assert set(exporter.es_seen) == set(names)
    assert exporter.es_seen["es-0"].uid == "uid-es-0"
    recorder.notices.clear()
    assert exporter.stream("externalservices", "42") == "62"
    assert [(n.name, n.change, n.resource_version) for n in recorder.notices] == [
        ("es-1", NoticeChange.SPEC, "60"),
        ("es-3", NoticeChange.DELETED, "62"),
    ]
    assert "es-3" not in exporter.es_seen


# -- the REST publisher --------------------------------------------------------------------------


class FakeResponse:
    def __init__(self, status: int, text: str = "{}") -> None:
        self.status_code = status
        self.text = text


class FakeSession:
    """Records publish requests; ``answers`` gives the status of each (200 when exhausted);
    ``gate``, when set, holds every request until it is set."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [])
        self.bodies: list[dict[str, Any]] = []
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()
        self.in_flight: dict[str, int] = {}
        self.overlap = False

    def post(self, url: str, json: dict[str, Any], timeout: float) -> FakeResponse:
        keys = {m["orderingKey"] for m in json["messages"]}
        assert len(keys) == 1, "one ordering key a request"
        (key,) = keys
        with self.lock:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
            self.overlap |= self.in_flight[key] > 1
            self.bodies.append(json)
            status = self.answers.pop(0) if self.answers else 200
        try:
            if self.gate is not None:
                assert self.gate.wait(10)
            return FakeResponse(status, '{"error": {"status": "X"}}' if status >= 300 else "{}")
        finally:
            with self.lock:
                self.in_flight[key] -= 1


def notice(name: str, rv: str = "1") -> Notice:
    return Notice(name, NoticeKind.EXTERNAL_SERVICE, NoticeChange.SPEC, EventType.MODIFIED, rv, NOW)


def publisher(
    session: FakeSession, fatal: list[tuple[BaseException, Notice]], **kwargs: Any
) -> PubSubPublisher:
    return PubSubPublisher(
        "proj",
        "topic",
        timeout_s=kwargs.pop("timeout_s", 5),
        on_fatal=lambda exc, n: fatal.append((exc, n)),
        session=session,
        endpoint="http://emulator",
        sleep=lambda s: None,
        **kwargs,
    )


def sent(session: FakeSession) -> list[tuple[str, str]]:
    out = []
    for body in session.bodies:
        for m in body["messages"]:
            data = json.loads(base64.b64decode(m["data"]))
            assert m["attributes"] == {"name": data["name"], "change": "spec", "type": "MODIFIED"}
            out.append((m["orderingKey"], data["resourceVersion"]))
    return out


def test_publisher_keeps_each_keys_order_batches_it_and_never_overlaps_a_key() -> None:
    session = FakeSession()
    session.gate = threading.Event()
    fatal: list[tuple[BaseException, Notice]] = []
    pub = publisher(session, fatal, workers=4)
    try:
        for i in range(30):
            pub.publish(notice(f"k{i % 3}", str(i)))
        session.gate.set()
        assert pub.flush(10)
        assert pub.url == "http://emulator/v1/projects/proj/topics/topic:publish"
    finally:
        pub.stop()
    assert not fatal and not session.overlap and pub.published == 30
    for key in ("k0", "k1", "k2"):
        order = [int(rv) for k, rv in sent(session) if k == key]
        assert order == sorted(order) and len(order) == 10
    # The first request of each key left alone; the rest of the key went in one batch.
    assert len(session.bodies) <= 6


def test_publisher_retries_retryable_answers_and_dies_on_the_others() -> None:
    session = FakeSession([503, 429, 200])
    fatal: list[tuple[BaseException, Notice]] = []
    pub = publisher(session, fatal)
    pub.publish(notice("a"))
    assert pub.flush(5) and pub.requests == 3 and not fatal
    pub.stop()

    session = FakeSession([404])
    pub = publisher(session, fatal)
    pub.publish(notice("a"))
    assert not pub.flush(5)
    assert pub.requests == 1, "a missing topic is not retried"
    assert [n.name for _, n in fatal] == ["a"] and "404" in str(fatal[0][0])
    pub.publish(notice("b"))  # after a failure, everything is reported, nothing sent
    assert [n.name for _, n in fatal] == ["a", "b"] and pub.requests == 1
    pub.stop()


def test_publisher_gives_up_at_its_deadline() -> None:
    session = FakeSession([503] * 10_000)
    fatal: list[tuple[BaseException, Notice]] = []
    pub = publisher(session, fatal, timeout_s=0.3)
    t0 = time.monotonic()
    pub.publish(notice("a"))
    assert not pub.flush(5)
    assert time.monotonic() - t0 < 3
    assert fatal and "503" in str(fatal[0][0])
    pub.stop()


def test_publisher_blocks_at_its_bound_until_pubsub_acknowledges() -> None:
    session = FakeSession()
    session.gate = threading.Event()
    fatal: list[tuple[BaseException, Notice]] = []
    pub = publisher(session, fatal, max_outstanding=3)
    try:
        for i in range(3):
            pub.publish(notice(f"k{i}"))
        blocked = threading.Thread(target=pub.publish, args=(notice("k9"),), daemon=True)
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive(), "a fourth outstanding notice waits"
        session.gate.set()
        blocked.join(5)
        assert not blocked.is_alive()
        assert pub.flush(5) and pub.published == 4
    finally:
        session.gate.set()
        pub.stop()


def test_publish_concurrency_is_a_setting() -> None:
    base = {"GOOGLE_CLOUD_PROJECT": "p"}
    assert ExporterSettings.from_env(base).publish_concurrency == 32
    env = {**base, "EXPORTER_PUBLISH_CONCURRENCY": "4"}
    assert ExporterSettings.from_env(env).publish_concurrency == 4
    with pytest.raises(ValueError, match="EXPORTER_PUBLISH_CONCURRENCY"):
        ExporterSettings.from_env({**base, "EXPORTER_PUBLISH_CONCURRENCY": "0"})


def test_flush_waits_for_a_draining_backlog_and_gives_up_on_a_stall() -> None:
    class Slow(FakeSession):
        def post(self, url: str, json: dict[str, Any], timeout: float) -> FakeResponse:
            time.sleep(0.05)  # Pub/Sub's latency, not synchronisation
            return super().post(url, json, timeout)

    fatal: list[tuple[BaseException, Notice]] = []
    pub = publisher(Slow(), fatal, workers=1)
    for i in range(12):
        pub.publish(notice(f"k{i}"))
    # 12 requests of 50 ms each take longer than the timeout, but every one makes progress.
    assert pub.flush(0.3) and pub.published == 12
    pub.stop()

    stalled = FakeSession()
    stalled.gate = threading.Event()
    pub = publisher(stalled, fatal)
    pub.publish(notice("a"))
    assert not pub.flush(0.2), "no acknowledgement within the timeout"
    stalled.gate.set()
    assert pub.flush(5)
    pub.stop()
    assert not fatal
