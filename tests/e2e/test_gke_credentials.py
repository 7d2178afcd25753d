"""The GKE credentials mode, against the real API server, with only Google's token endpoint faked.

The function authenticates to GKE with its service account's Google access token. Here the
"Google" token endpoint (the only fake: an HTTP server speaking the OAuth2 JWT-bearer grant
that google-auth's service-account credentials call) hands out a real Kubernetes
ServiceAccount token, so the API server really authenticates every request the hook decorates.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from core.kube import Kube, Resource, api_client_from_kubeconfig
from functions.credentials import api_client
from functions.settings import PipelineSettings
from tests.conftest import DevStack

pytestmark = pytest.mark.cluster
SERVICE_ACCOUNT = Resource("v1", "ServiceAccount", "serviceaccounts")
SELF_REVIEW = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


class FakeGoogleTokenEndpoint:
    def __init__(self, access_token: str) -> None:
        self.access_token = access_token
        self.expires_in = 3600
        self.grants: list[dict[str, list[str]]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                endpoint.grants.append(form)
                ok = form.get("grant_type") == [
                    "urn:ietf:params:oauth:grant-type:jwt-bearer"
                ] and bool(form.get("assertion"))
                body = (
                    {
                        "access_token": endpoint.access_token,
                        "expires_in": endpoint.expires_in,
                        "token_type": "Bearer",
                    }
                    if ok
                    else {"error": "invalid_grant"}
                )
                payload = json.dumps(body).encode()
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def k8s_sa_token(dev_stack: DevStack, unique: str) -> Iterator[tuple[str, str]]:
    admin = Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))
    name = f"gke-fn-{unique}"
    admin.request(
        "POST",
        SERVICE_ACCOUNT.path("default"),
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )
    review = admin.request(
        "POST",
        SERVICE_ACCOUNT.path("default", name) + "/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    yield name, review["status"]["token"]
    admin.delete(SERVICE_ACCOUNT, name, "default")


def _service_account_file(path: Path, token_uri: str) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "egress-dev",
        "private_key_id": "test",
        "private_key": pem,
        "client_email": "egress-reconciler@egress-dev.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return path


def test_gke_mode_sends_a_refreshed_google_token(
    dev_stack: DevStack,
    k8s_sa_token: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sa_name, token = k8s_sa_token
    fake = FakeGoogleTokenEndpoint(token)
    try:
        creds_file = _service_account_file(tmp_path / "sa.json", fake.url)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(creds_file))
        ca = Path(dev_stack.env["EGRESS_DEV_DIR"]) / "pki" / "ca.crt"
        env = {
            "KUBE_CREDENTIALS": "auto",
            "GKE_ENDPOINT": dev_stack.env["EGRESS_DEV_API_SERVER"].removeprefix("https://"),
            "GKE_CA_CERT": base64.b64encode(ca.read_bytes()).decode(),
        }
        settings = PipelineSettings.from_env(env)
        assert settings.credential_mode(env) == "gke"
        kube = Kube(api_client(settings, env))
        whoami: Callable[[], str] = lambda: kube.request(  # noqa: E731
            "POST",
            SELF_REVIEW,
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )["status"]["userInfo"]["username"]

        assert whoami() == f"system:serviceaccount:default:{sa_name}"
        assert whoami() == f"system:serviceaccount:default:{sa_name}"
        assert len(fake.grants) == 1, "a valid token was refreshed again"

        # Tokens about to expire are refreshed before the request that would outlive them.
        fake.expires_in = 60
        hook = kube.api.configuration.refresh_api_key_hook
        hook.credentials.expiry = None
        hook.credentials.token = None
        whoami()
        whoami()
        assert len(fake.grants) == 3, "an expiring token was not refreshed before each request"
        assert hook.refreshes == 3
    finally:
        fake.stop()
