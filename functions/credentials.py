"""How the function reaches the cluster: a kubeconfig, in-cluster credentials, or GKE + a token.

A Cloud Function runs outside the cluster. On GKE it authenticates with its own service
account's Google access token (GKE accepts those as bearer tokens; RBAC then binds the service
account's email). Tokens live an hour, so the client refreshes them through the kubernetes
client's ``Configuration.refresh_api_key_hook``, called before every request: a valid token costs
a comparison, an expiring one one call to Google's token endpoint.

Where the cluster is (its endpoint and CA certificate) is read from the GKE API
(``projects.locations.clusters.get``) when an instance first needs it, with the same
credentials, and kept for the instance's life: a rotated CA or endpoint reaches every instance
started after the rotation began, with no redeploy. ``GKE_ENDPOINT`` (and ``GKE_CA_CERT``)
override the lookup.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functions.settings import PipelineSettings, PipelineSettingsError

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# Refresh this long before expiry, so a token never expires during a request.
REFRESH_MARGIN = dt.timedelta(minutes=5)
GKE_API = "https://container.googleapis.com/v1/"
GKE_API_TIMEOUT_S = 30


def api_client(settings: PipelineSettings, env: Mapping[str, str]) -> Any:
    """An ApiClient for the configured mode (imports the kubernetes client: call it lazily)."""
    from core.kube import api_client_from_kubeconfig, api_client_in_cluster

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


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """Where a GKE control plane answers and what certifies it."""

    endpoint: str  # https://host
    ca_cert: str | None  # base64 PEM or a file; None: a publicly trusted certificate (DNS)
    source: str  # "GKE API" or "GKE_ENDPOINT"


class ClusterLookupError(RuntimeError):
    """The GKE API did not tell where the cluster is; the message says why and what to grant."""


# One lookup per instance (a Cloud Functions instance is one process): cluster -> access.
_ACCESS: dict[tuple[str, str], ClusterAccess] = {}
_ACCESS_LOCK = threading.Lock()


def cluster_access(settings: PipelineSettings, credentials: Any) -> ClusterAccess:
    """GKE_ENDPOINT (and GKE_CA_CERT) if set; otherwise what the GKE API says about GKE_CLUSTER,
    asked once per instance (failures are not kept: the next call asks again)."""
    if settings.gke_endpoint:
        return ClusterAccess(settings.gke_endpoint, settings.gke_ca_cert, "GKE_ENDPOINT")
    if not settings.gke_cluster:
        raise PipelineSettingsError("GKE_CLUSTER: is required when KUBE_CREDENTIALS=gke")
    key = (settings.gke_cluster, settings.gke_endpoint_type)
    with _ACCESS_LOCK:
        if key not in _ACCESS:
            cluster = _get_cluster(settings.gke_cluster, credentials)
            _ACCESS[key] = access_from_cluster(
                cluster, settings.gke_endpoint_type, settings.gke_cluster
            )
        return _ACCESS[key]


def forget_cluster_access() -> None:
    """Drop what this instance read from the GKE API (tests; a new instance starts empty)."""
    with _ACCESS_LOCK:
        _ACCESS.clear()


def _get_cluster(name: str, credentials: Any) -> dict[str, Any]:
    """GET the cluster from the GKE API (container.googleapis.com v1) with ``credentials``."""
    import google.auth.transport.requests
    import requests

    # google-auth's session adds the token to each request (and refreshes it when needed).
    authorized_session: Any = google.auth.transport.requests.AuthorizedSession
    session = authorized_session(credentials)
    try:
        resp = session.get(GKE_API + name, timeout=GKE_API_TIMEOUT_S)
    except requests.RequestException as exc:
        raise ClusterLookupError(f"GKE_CLUSTER {name}: the GKE API did not answer: {exc}") from exc
    finally:
        session.close()
    if resp.status_code in (401, 403):
        raise ClusterLookupError(
            f"GKE_CLUSTER {name}: the GKE API refused ({resp.status_code}): the functions' "
            "service account needs container.clusters.get on it (roles/container.clusterViewer)"
        )
    if resp.status_code == 404:
        raise ClusterLookupError(f"GKE_CLUSTER {name}: no such cluster (404 from the GKE API)")
    if resp.status_code != 200:
        raise ClusterLookupError(
            f"GKE_CLUSTER {name}: the GKE API answered {resp.status_code}: {resp.text[:200]}"
        )
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ClusterLookupError(f"GKE_CLUSTER {name}: the GKE API's answer is not a cluster")
    return body


def access_from_cluster(cluster: dict[str, Any], endpoint_type: str, name: str) -> ClusterAccess:
    """The endpoint of ``endpoint_type`` and the CA, from a GKE API Cluster, choosing as
    ``gcloud container clusters get-credentials`` does (``--internal-ip`` for private,
    ``--dns-endpoint`` for dns; the DNS name also when the cluster has no IP endpoints)."""
    endpoints = cluster.get("controlPlaneEndpointsConfig") or {}
    ip_config = endpoints.get("ipEndpointsConfig") or {}
    dns_config = endpoints.get("dnsEndpointConfig") or {}
    if endpoint_type == "dns" or ip_config.get("enabled") is False:
        host = dns_config.get("endpoint")
        if not host:
            raise ClusterLookupError(f"GKE_CLUSTER {name}: the cluster has no DNS endpoint")
        if dns_config.get("allowExternalTraffic") is False:
            raise ClusterLookupError(
                f"GKE_CLUSTER {name}: its DNS endpoint does not allow external traffic "
                "(gcloud container clusters update --enable-dns-access)"
            )
        # Served with a publicly trusted certificate: the cluster CA does not sign it.
        return ClusterAccess(f"https://{host}", None, "GKE API")
    if endpoint_type == "private":
        host = (cluster.get("privateClusterConfig") or {}).get("privateEndpoint")
        host = host or ip_config.get("privateEndpoint")
        if not host:
            raise ClusterLookupError(f"GKE_CLUSTER {name}: the cluster has no private endpoint")
    else:
        host = cluster.get("endpoint")
        if not host:
            raise ClusterLookupError(
                f"GKE_CLUSTER {name}: the cluster has no endpoint yet "
                f"(status {cluster.get('status', 'unknown')})"
            )
    ca = (cluster.get("masterAuth") or {}).get("clusterCaCertificate")
    if not ca:
        raise ClusterLookupError(f"GKE_CLUSTER {name}: the GKE API gave no CA certificate")
    return ClusterAccess(f"https://{host}", str(ca), "GKE API")


def gke_api_client(settings: PipelineSettings, credentials: Any = None) -> Any:
    """An ApiClient for a GKE cluster with Application Default Credentials (or ``credentials``),
    its endpoint and CA from the GKE API (or GKE_ENDPOINT and GKE_CA_CERT)."""
    import google.auth
    import google.auth.transport.requests
    from kubernetes import client

    if not settings.gke_endpoint and not settings.gke_cluster:
        raise PipelineSettingsError(
            "GKE_CLUSTER: is required when KUBE_CREDENTIALS=gke (or GKE_ENDPOINT)"
        )
    if credentials is None:
        credentials, _ = google.auth.default(scopes=list(SCOPES))
    access = cluster_access(settings, credentials)
    configuration = client.Configuration()
    configuration.host = access.endpoint
    if access.ca_cert:
        source = "GKE_CA_CERT" if access.source == "GKE_ENDPOINT" else "the GKE API's CA"
        configuration.ssl_ca_cert = _ca_file(access.ca_cert, source)
    refresher = GoogleTokenRefresher(credentials, google.auth.transport.requests.Request())
    configuration.refresh_api_key_hook = refresher
    # auth_settings() consults the hook only for a key that exists: the first request fills it.
    configuration.api_key["authorization"] = ""
    return client.ApiClient(configuration)


def _ca_file(value: str, source: str = "GKE_CA_CERT") -> str:
    """The CA is base64 PEM (as gcloud and the GKE API give it) or a path; the client wants a
    file. Errors name ``source`` and never echo the value."""
    if os.path.isfile(value):
        return value
    try:
        pem = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PipelineSettingsError(f"{source}: neither a file nor base64 PEM") from None
    if b"BEGIN CERTIFICATE" not in pem:
        raise PipelineSettingsError(f"{source}: does not hold a PEM certificate")
    # Named by content: a new client for the same cluster (each credential refresh, each test)
    # reuses the file instead of leaving one more in the temporary directory.
    path = Path(tempfile.gettempdir()) / f"gke-ca-{hashlib.sha256(pem).hexdigest()[:16]}.crt"
    if not path.is_file() or path.read_bytes() != pem:
        with tempfile.NamedTemporaryFile(
            "wb", dir=path.parent, prefix=".gke-ca-", delete=False
        ) as fh:
            fh.write(pem)
        os.replace(fh.name, path)
    return str(path)
