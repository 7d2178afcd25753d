"""How the function reaches the cluster: a kubeconfig, in-cluster credentials, or GKE + a token.

A Cloud Function runs outside the cluster. On GKE it authenticates with its own service
account's Google access token (GKE accepts those as bearer tokens; RBAC then binds the service
account's email). Tokens live an hour, so the client refreshes them through the kubernetes
client's ``Configuration.refresh_api_key_hook``, called before every request: a valid token costs
a comparison, an expiring one one call to Google's token endpoint.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from functions.settings import PipelineSettings, PipelineSettingsError

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# Refresh this long before expiry, so a token never expires during a request.
REFRESH_MARGIN = dt.timedelta(minutes=5)


def api_client(settings: PipelineSettings, env: Mapping[str, str]) -> Any:
    """An ApiClient for the configured mode (imports the kubernetes client: call it lazily)."""
    from reconcile.kube import api_client_from_kubeconfig, api_client_in_cluster

    mode = settings.credential_mode(env)
    if mode == "gke":
        return gke_api_client(settings)
    if mode == "in-cluster":
        return api_client_in_cluster()
    return api_client_from_kubeconfig(settings.kubeconfig, settings.kube_context)


class GoogleTokenRefresher:
    """Keeps ``configuration.api_key`` holding a fresh Google access token (thread-safe)."""

    def __init__(self, credentials: Any, request: Any) -> None:
        self.credentials = credentials
        self.request = request
        self.lock = threading.Lock()
        self.refreshes = 0

    def _expiring(self) -> bool:
        creds = self.credentials
        if not creds.token or creds.expiry is None:
            return not bool(creds.token)
        expiry = creds.expiry
        if expiry.tzinfo is None:  # google-auth keeps naive UTC datetimes
            expiry = expiry.replace(tzinfo=dt.UTC)
        return bool(dt.datetime.now(dt.UTC) + REFRESH_MARGIN >= expiry)

    def __call__(self, configuration: Any) -> None:
        with self.lock:
            if self._expiring():
                self.credentials.refresh(self.request)
                self.refreshes += 1
            # The client sends api_key["authorization"] (prefixed) as the Authorization header.
            configuration.api_key["authorization"] = self.credentials.token
            configuration.api_key_prefix["authorization"] = "Bearer"


def gke_api_client(settings: PipelineSettings, credentials: Any = None) -> Any:
    """An ApiClient for a GKE endpoint with Application Default Credentials (or ``credentials``)."""
    import google.auth
    import google.auth.transport.requests
    from kubernetes import client

    if not settings.gke_endpoint:
        raise PipelineSettingsError("GKE_ENDPOINT: is required when KUBE_CREDENTIALS=gke")
    if credentials is None:
        credentials, _ = google.auth.default(scopes=list(SCOPES))
    configuration = client.Configuration()
    configuration.host = settings.gke_endpoint
    if settings.gke_ca_cert:
        configuration.ssl_ca_cert = _ca_file(settings.gke_ca_cert)
    refresher = GoogleTokenRefresher(credentials, google.auth.transport.requests.Request())
    configuration.refresh_api_key_hook = refresher
    # auth_settings() consults the hook only for a key that exists: the first request fills it.
    configuration.api_key["authorization"] = ""
    return client.ApiClient(configuration)


def _ca_file(value: str) -> str:
    """GKE_CA_CERT is base64 PEM (as gcloud prints it) or a path; the client wants a file."""
    if os.path.isfile(value):
        return value
    try:
        pem = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PipelineSettingsError("GKE_CA_CERT: neither a file nor base64 PEM") from None
    if b"BEGIN CERTIFICATE" not in pem:
        raise PipelineSettingsError("GKE_CA_CERT: does not hold a PEM certificate")
    with tempfile.NamedTemporaryFile("wb", prefix="gke-ca-", suffix=".crt", delete=False) as fh:
        fh.write(pem)
    return fh.name
