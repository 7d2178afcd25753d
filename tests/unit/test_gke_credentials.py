"""GKE credentials with Google's APIs faked at their client boundary (``google.auth.default``
and the credentials object it returns): no network, no real Google account.

Why here as well as in tests/e2e/test_gke_credentials.py (which fakes Google's token endpoint
over HTTP and authenticates to a real API server): these pin the contract cheaply and
exhaustively: which scopes are asked for, that the endpoint and CA come from the settings,
that the Authorization header the kubernetes client builds carries the current token, that a
token is refreshed before (never after) it expires, once under concurrency, and that a bad CA
setting names the variable without echoing its value.
"""

from __future__ import annotations

import base64
import datetime as dt
import threading
import time
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
