"""GKE credentials with Google's APIs faked at their client boundary (``google.auth.default``
and the credentials object it returns; the GKE API behind requests' transport adapter): no
network, no real Google account.

Why here as well as in tests/e2e/test_gke_credentials.py (which fakes Google's token endpoint
over HTTP and authenticates to a real API server): these pin the contract cheaply and
exhaustively: which scopes are asked for, that the endpoint and CA come from the settings,
that the Authorization header the kubernetes client builds carries the current token, that a
token is refreshed before (never after) it expires, once under concurrency, and that a bad CA
setting names the variable without echoing its value; and that the cluster's endpoint and CA are
read from the GKE API once per instance (so a rotated CA reaches new instances with no new
build), overridden by the env vars, chosen by endpoint type, and that a failed lookup says why.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from functions import credentials as creds_mod
from functions.credentials import REFRESH_MARGIN, SCOPES, GoogleTokenRefresher, api_client
from functions.settings import PipelineSettings, PipelineSettingsError

PEM = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUZmFrZQ==\n-----END CERTIFICATE-----\n"


class FakeCredentials:
    """What ``google.auth.default`` returns: token, expiry (naive UTC), refresh(request)."""

    def __init__(self, lifetime: dt.timedelta = dt.timedelta(hours=1)) -> None:
        self.token: str | None = None
        self.expiry: dt.datetime | None = None
        self.lifetime = lifetime
        self.refreshes = 0
        self.requests: list[Any] = []
        self.delay_s = 0.0

    def refresh(self, request: Any) -> None:
        time.sleep(self.delay_s)
        self.refreshes += 1
        self.requests.append(request)
        self.token = f"ya29.token-{self.refreshes}"
        # google-auth keeps expiry as a naive UTC datetime.
        self.expiry = (dt.datetime.now(dt.UTC) + self.lifetime).replace(tzinfo=None)


@pytest.fixture
def fake_default(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {"credentials": FakeCredentials()}

    def default(scopes: list[str] | None = None, **kwargs: Any) -> tuple[Any, str]:
        seen["scopes"] = scopes
        seen["calls"] = seen.get("calls", 0) + 1
        return seen["credentials"], "my-project"

    import google.auth

    monkeypatch.setattr(google.auth, "default", default)
    return seen


def gke_env(ca: str | None = None) -> dict[str, str]:
    env = {"KUBE_CREDENTIALS": "gke", "GKE_ENDPOINT": "34.1.2.3"}
    if ca is not None:
        env["GKE_CA_CERT"] = ca
    return env


def authorization(client: Any) -> str:
    """The Authorization header the kubernetes client puts on the next request."""
    headers: dict[str, str] = {}
    client.update_params_for_auth(headers, [], ["BearerToken"])
    return headers.get("authorization", "")


def test_endpoint_and_ca_come_from_settings_and_the_token_from_default_credentials(
    fake_default: dict[str, Any],
) -> None:
    env = gke_env(base64.b64encode(PEM).decode())
    settings = PipelineSettings.from_env(env)
    client = api_client(settings, env)
    config = client.configuration
    assert config.host == "https://34.1.2.3"
    assert Path(config.ssl_ca_cert).read_bytes() == PEM
    assert config.verify_ssl is True
    assert fake_default["scopes"] == list(SCOPES)
    assert fake_default["calls"] == 1
    creds = fake_default["credentials"]
    assert creds.refreshes == 0, "no token is fetched before the first request"
    assert authorization(client) == "Bearer ya29.token-1"
    assert authorization(client) == "Bearer ya29.token-1"
    assert creds.refreshes == 1, "a valid token must not be fetched again"
    # The refresh goes through google-auth's own transport (the client boundary).
    import google.auth.transport.requests

    assert isinstance(creds.requests[0], google.auth.transport.requests.Request)


def test_ca_may_be_a_file(fake_default: dict[str, Any], tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(PEM)
    env = gke_env(str(ca))
    client = api_client(PipelineSettings.from_env(env), env)
    assert client.configuration.ssl_ca_cert == str(ca)


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"secret-ish").decode()])
def test_bad_ca_names_the_variable_and_not_its_value(
    fake_default: dict[str, Any], value: str
) -> None:
    env = gke_env(value)
    with pytest.raises(PipelineSettingsError, match="GKE_CA_CERT") as info:
        api_client(PipelineSettings.from_env(env), env)
    assert value not in str(info.value)


def test_token_is_refreshed_before_it_expires(fake_default: dict[str, Any]) -> None:
    env = gke_env()
    client = api_client(PipelineSettings.from_env(env), env)
    creds = fake_default["credentials"]
    assert authorization(client) == "Bearer ya29.token-1"
    # Still valid for longer than the margin: kept.
    creds.expiry = (dt.datetime.now(dt.UTC) + REFRESH_MARGIN * 2).replace(tzinfo=None)
    assert authorization(client) == "Bearer ya29.token-1"
    # Inside the margin (not yet expired): refreshed before the request goes out.
    creds.expiry = (dt.datetime.now(dt.UTC) + REFRESH_MARGIN / 2).replace(tzinfo=None)
    assert authorization(client) == "Bearer ya29.token-2"
    # Already expired (a long-idle instance): refreshed as well.
    creds.expiry = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).replace(tzinfo=None)
    assert authorization(client) == "Bearer ya29.token-3"
    # Aware datetimes are understood too.
    creds.expiry = dt.datetime.now(dt.UTC) + REFRESH_MARGIN * 2
    assert authorization(client) == "Bearer ya29.token-3"
    assert creds.refreshes == 3


def test_concurrent_requests_refresh_once() -> None:
    creds = FakeCredentials()
    creds.delay_s = 0.05
    refresher = GoogleTokenRefresher(creds, request=object())

    class Config:
        def __init__(self) -> None:
            self.api_key: dict[str, str] = {}
            self.api_key_prefix: dict[str, str] = {}

    configs = [Config() for _ in range(8)]
    threads = [threading.Thread(target=refresher, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert creds.refreshes == 1
    assert {c.api_key["authorization"] for c in configs} == {"ya29.token-1"}
    assert {c.api_key_prefix["authorization"] for c in configs} == {"Bearer"}


def test_a_failing_refresh_propagates_and_is_retried_next_time(
    fake_default: dict[str, Any],
) -> None:
    """A token endpoint outage raises (so Pub/Sub redelivers); the next request tries again."""
    env = gke_env()
    client = api_client(PipelineSettings.from_env(env), env)
    creds = fake_default["credentials"]
    real_refresh = creds.refresh
    calls = {"n": 0}

    def flaky(request: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("token endpoint unavailable")
        real_refresh(request)

    creds.refresh = flaky
    with pytest.raises(RuntimeError, match="unavailable"):
        authorization(client)
    assert authorization(client) == "Bearer ya29.token-1"


def test_explicit_credentials_skip_default_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    import google.auth

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("google.auth.default must not be called")

    monkeypatch.setattr(google.auth, "default", boom)
    creds = FakeCredentials()
    client = creds_mod.gke_api_client(PipelineSettings.from_env(gke_env()), creds)
    assert authorization(client) == "Bearer ya29.token-1"


# -- the cluster's endpoint and CA from the GKE API ------------------------------------------
#
# Google's API is faked at the HTTP client boundary: requests hands every request to a
# transport adapter, and the adapter for https://container.googleapis.com/ is ours. Everything
# above it runs for real: google-auth's AuthorizedSession adding the token, the URL, the JSON.

CLUSTER = "projects/my-project/locations/europe-west2/clusters/prod"
PEM_B64 = base64.b64encode(PEM).decode()
NEW_PEM = PEM.replace(b"ZmFrZQ==", b"cm90YXRlZA==")


class FakeGKE:
    """container.googleapis.com v1 behind a requests transport adapter: the clusters it knows,
    every request it got."""

    def __init__(self) -> None:
        self.clusters: dict[str, dict[str, Any]] = {
            CLUSTER: {
                "name": "prod",
                "status": "RUNNING",
                "endpoint": "34.1.2.3",
                "masterAuth": {"clusterCaCertificate": PEM_B64},
                "privateClusterConfig": {"privateEndpoint": "10.0.0.2"},
                "controlPlaneEndpointsConfig": {
                    "dnsEndpointConfig": {
                        "endpoint": "gke-0123abcd.europe-west2.gke.goog",
                        "allowExternalTraffic": True,
                    },
                    "ipEndpointsConfig": {"enabled": True},
                },
            }
        }
        self.requests: list[Any] = []
        self.status: int | None = None  # force an error status

    def adapter(self) -> Any:
        import requests
        from requests.adapters import BaseAdapter

        fake = self

        class Adapter(BaseAdapter):
            def send(self, request: Any, **kwargs: Any) -> Any:
                fake.requests.append(request)
                resp = requests.Response()
                resp.request = request
                resp.url = request.url
                name = request.url.removeprefix(creds_mod.GKE_API)
                if fake.status is not None:
                    resp.status_code, body = fake.status, {"error": {"code": fake.status}}
                elif request.method == "GET" and name in fake.clusters:
                    resp.status_code, body = 200, fake.clusters[name]
                else:
                    resp.status_code, body = 404, {"error": {"code": 404}}
                resp._content = json.dumps(body).encode()
                resp.headers["Content-Type"] = "application/json"
                return resp

            def close(self) -> None:
                pass

        return Adapter()


@pytest.fixture
def gke_api(monkeypatch: pytest.MonkeyPatch, fake_default: dict[str, Any]) -> Iterator[FakeGKE]:
    import requests

    fake = FakeGKE()
    adapter = fake.adapter()
    real = requests.Session.get_adapter

    def get_adapter(self: Any, url: str) -> Any:
        if url.startswith("https://container.googleapis.com/"):
            return adapter
        return real(self, url)

    monkeypatch.setattr(requests.Session, "get_adapter", get_adapter)
    fake_default["credentials"].before_request = _before_request(fake_default["credentials"])
    creds_mod.forget_cluster_access()
    yield fake
    creds_mod.forget_cluster_access()


def _before_request(creds: FakeCredentials) -> Any:
    """What google-auth credentials do before a request: refresh if needed, add the header."""

    def before_request(request: Any, method: str, url: str, headers: dict[str, str]) -> None:
        if not creds.token:
            creds.refresh(request)
        headers["authorization"] = f"Bearer {creds.token}"

    return before_request


def cluster_env(**extra: str) -> dict[str, str]:
    return {"GKE_CLUSTER": CLUSTER, **extra}


def test_endpoint_and_ca_are_read_from_the_gke_api_once_per_instance(gke_api: FakeGKE) -> None:
    env = cluster_env()
    settings = PipelineSettings.from_env(env)
    assert settings.credential_mode(env) == "gke"
    client = api_client(settings, env)
    assert client.configuration.host == "https://34.1.2.3"
    assert Path(client.configuration.ssl_ca_cert).read_bytes() == PEM
    (req,) = gke_api.requests
    assert req.method == "GET"
    assert req.url == f"https://container.googleapis.com/v1/{CLUSTER}"
    assert req.headers["authorization"] == "Bearer ya29.token-1", "the functions' own token"
    # The same instance builds more clients (a dry-run reconciler, say): no second lookup.
    again = api_client(PipelineSettings.from_env(env), env)
    assert again.configuration.host == "https://34.1.2.3"
    assert len(gke_api.requests) == 1


def test_a_rotated_ca_reaches_the_next_instance_without_a_redeploy(gke_api: FakeGKE) -> None:
    env = cluster_env()
    old = api_client(PipelineSettings.from_env(env), env)
    # The cluster's credentials rotate: new IP, new CA.
    gke_api.clusters[CLUSTER]["endpoint"] = "34.9.9.9"
    gke_api.clusters[CLUSTER]["masterAuth"]["clusterCaCertificate"] = base64.b64encode(
        NEW_PEM
    ).decode()
    creds_mod.forget_cluster_access()  # what a new instance starts with
    new = api_client(PipelineSettings.from_env(env), env)
    assert new.configuration.host == "https://34.9.9.9"
    assert Path(new.configuration.ssl_ca_cert).read_bytes() == NEW_PEM
    assert old.configuration.host == "https://34.1.2.3"


def test_env_vars_override_the_lookup(gke_api: FakeGKE, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(NEW_PEM)
    env = cluster_env(GKE_ENDPOINT="10.9.8.7", GKE_CA_CERT=str(ca))
    client = api_client(PipelineSettings.from_env(env), env)
    assert client.configuration.host == "https://10.9.8.7"
    assert client.configuration.ssl_ca_cert == str(ca)
    assert gke_api.requests == [], "an override never asks the GKE API"


@pytest.mark.parametrize(
    ("endpoint_type", "host", "ca"),
    [
        ("public", "https://34.1.2.3", PEM),
        ("private", "https://10.0.0.2", PEM),
        ("dns", "https://gke-0123abcd.europe-west2.gke.goog", None),
    ],
)
def test_endpoint_type_chooses_the_endpoint(
    gke_api: FakeGKE, endpoint_type: str, host: str, ca: bytes | None
) -> None:
    env = cluster_env(GKE_ENDPOINT_TYPE=endpoint_type)
    config = api_client(PipelineSettings.from_env(env), env).configuration
    assert config.host == host
    if ca is None:  # the DNS endpoint's certificate is publicly trusted, not the cluster CA's
        assert config.ssl_ca_cert is None and config.verify_ssl is True
    else:
        assert Path(config.ssl_ca_cert).read_bytes() == ca


def test_a_cluster_without_ip_endpoints_is_reached_by_its_dns_name(gke_api: FakeGKE) -> None:
    gke_api.clusters[CLUSTER]["controlPlaneEndpointsConfig"]["ipEndpointsConfig"]["enabled"] = False
    env = cluster_env()
    config = api_client(PipelineSettings.from_env(env), env).configuration
    assert config.host == "https://gke-0123abcd.europe-west2.gke.goog"


@pytest.mark.parametrize(
    ("status", "message"),
    [(403, "roles/container.clusterViewer"), (404, "no such cluster"), (503, "answered 503")],
)
def test_a_failed_lookup_says_why_and_is_retried_by_the_next_client(
    gke_api: FakeGKE, status: int, message: str
) -> None:
    env = cluster_env()
    gke_api.status = status
    with pytest.raises(creds_mod.ClusterLookupError, match=message) as info:
        api_client(PipelineSettings.from_env(env), env)
    assert CLUSTER in str(info.value)
    gke_api.status = None
    assert api_client(PipelineSettings.from_env(env), env).configuration.host == "https://34.1.2.3"
    assert len(gke_api.requests) == 2


def test_a_cluster_still_provisioning_has_no_endpoint(gke_api: FakeGKE) -> None:
    gke_api.clusters[CLUSTER].update(status="PROVISIONING", endpoint="")
    env = cluster_env()
    with pytest.raises(
        creds_mod.ClusterLookupError, match=r"no endpoint yet \(status PROVISIONING\)"
    ):
        api_client(PipelineSettings.from_env(env), env)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"KUBE_CREDENTIALS": "gke"}, "GKE_CLUSTER: is required"),
        ({"GKE_CLUSTER": "prod"}, "GKE_CLUSTER: must be projects/"),
        ({"GKE_CLUSTER": CLUSTER, "GKE_ENDPOINT_TYPE": "internal"}, "GKE_ENDPOINT_TYPE"),
    ],
)
def test_bad_cluster_settings_name_the_variable(env: dict[str, str], problem: str) -> None:
    with pytest.raises(PipelineSettingsError, match=problem):
        PipelineSettings.from_env(env)
