"""A small Kubernetes REST transport, for a process that must stay small: the exporter.

Importing the official client costs about 65 MB of resident memory: ``kubernetes.client`` loads
its ~700 model classes and every API class whether or not they are used, and any
``kubernetes.*`` import loads it. ``core.kube.Kube`` needs none of that: it sends plain JSON
through ``ApiClient.call_api`` and reads the unread urllib3 response. ``KubeHttp`` serves that
one call over urllib3 (the official client's own HTTP library) with the same answer, and
raises a non-2xx answer as ``core.errors.HttpError``, which ``core.errors`` classifies like the
official client's ``ApiException``.

Credentials, for the two ways the exporter runs:

- in a pod (``in_cluster``): the service account, as the official client reads it
  (``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``, its ``ca.crt``, its token read
  again every minute, since the kubelet rotates it);
- from a kubeconfig (``from_kubeconfig``): the named or current context's cluster (``server``,
  ``certificate-authority[-data]``, ``insecure-skip-tls-verify``, ``tls-server-name``) and
  user (``client-certificate[-data]`` with ``client-key[-data]``, ``token``, ``tokenFile``).
  ``exec`` plugins and ``auth-provider`` users are refused by name, as is a ``$KUBECONFIG``
  list: give the exporter a certificate or token identity (in production it runs in a pod).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
import yaml

from core.errors import HttpError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# How long a token read from a file is used before the file is read again.
TOKEN_REREAD_S = 60.0


class KubeConfigError(ValueError):
    """A kubeconfig or service account this transport cannot use; the text says why."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the API server is and how to authenticate to it."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None
    verify: bool = True
    tls_server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None


class KubeHttp:
    """``ApiClient.call_api`` as ``core.kube.Kube`` uses it, over one urllib3 pool."""

    def __init__(self, endpoint: Endpoint, *, pool_size: int = 4) -> None:
        self.endpoint = endpoint
        kwargs: dict[str, Any] = {"maxsize": pool_size}
        if endpoint.verify:
            kwargs["cert_reqs"] = "CERT_REQUIRED"
            if endpoint.ca_file:
                kwargs["ca_certs"] = endpoint.ca_file
            if endpoint.ca_data:
                kwargs["ca_cert_data"] = endpoint.ca_data
        else:
            kwargs["cert_reqs"] = "CERT_NONE"
        if endpoint.tls_server_name:
            kwargs["server_hostname"] = endpoint.tls_server_name
        if endpoint.cert_file:
            kwargs["cert_file"] = endpoint.cert_file
            kwargs["key_file"] = endpoint.key_file
        self.pool = urllib3.PoolManager(**kwargs)
        self._token_lock = threading.Lock()
        self._token = endpoint.token
        self._token_read_at = -TOKEN_REREAD_S

    @classmethod
    def in_cluster(
        cls, env: Mapping[str, str] | None = None, account_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> KubeHttp:
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise KubeConfigError(
                "not in a pod: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are unset"
            )
        for name in ("token", "ca.crt"):
            if not (account_dir / name).is_file():
                raise KubeConfigError(f"no service account {name} in {account_dir}")
        host = f"[{host}]" if ":" in host else host
        return cls(
            Endpoint(
                server=f"https://{host}:{port}",
                ca_file=str(account_dir / "ca.crt"),
                token_file=str(account_dir / "token"),
            )
        )

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None) -> KubeHttp:
        """From ``path``, else ``$KUBECONFIG``, else ``~/.kube/config``."""
        path = path or os.environ.get("KUBECONFIG") or "~/.kube/config"
        if os.pathsep in path:
            raise KubeConfigError(f"KUBECONFIG {path!r}: name one file, not a list")
        file = Path(path).expanduser()
        try:
            config = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"kubeconfig {file}: {exc}") from None
        return cls(endpoint_from_kubeconfig(config, file.parent, context))

    # -- the one call ----------------------------------------------------------------------

    def call_api(
        self,
        resource_path: str,
        method: str,
        *,
        query_params: Sequence[tuple[str, str]] | None = None,
        header_params: Mapping[str, str] | None = None,
        body: Any = None,
        auth_settings: Sequence[str] | None = None,
        _preload_content: bool = True,
        _request_timeout: float | tuple[float, float] | None = None,
    ) -> Any:
        """Send one request; the urllib3 response (unread unless ``_preload_content``), or
        ``HttpError`` for a status other than 2xx (its body read)."""
        url = self.endpoint.server.rstrip("/") + resource_path
        if query_params:
            url += "?" + urlencode(list(query_params))
        headers = dict(header_params or {})
        token = self._current_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.pool.urlopen(
            method,
            url,
            body=data,
            headers=headers,
            preload_content=_preload_content,
            timeout=_timeout(_request_timeout),
            redirect=False,
        )
        if not 200 <= response.status < 300:
            payload = response.data
            response.release_conn()
            raise HttpError(response.status, response.reason or "", response.headers, payload)
        return response

    def _current_token(self) -> str | None:
        file = self.endpoint.token_file
        if not file:
            return self._token
        with self._token_lock:
            now = time.monotonic()
            if now - self._token_read_at >= TOKEN_REREAD_S:
                self._token = Path(file).read_text().strip()
                self._token_read_at = now
            return self._token


def _timeout(value: float | tuple[float, float] | None) -> urllib3.Timeout | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return urllib3.Timeout(connect=value[0], read=value[1])
    return urllib3.Timeout(total=value)


def endpoint_from_kubeconfig(config: Any, base: Path, context: str | None = None) -> Endpoint:
    """The cluster and user of ``context`` (else the current one) of a parsed kubeconfig;
    relative file names are relative to ``base``, the kubeconfig's folder."""
    if not isinstance(config, dict):
        raise KubeConfigError("kubeconfig is not a mapping")

    def named(section: str, name: str, key: str) -> dict[str, Any]:
        for entry in config.get(section) or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                value = entry.get(key) or {}
                if isinstance(value, dict):
                    return value
        raise KubeConfigError(f"kubeconfig has no {key} named {name!r}")

    context = context or config.get("current-context")
    if not context:
        raise KubeConfigError("kubeconfig has no current-context and none was named")
    ctx = named("contexts", str(context), "context")
    cluster = named("clusters", str(ctx.get("cluster", "")), "cluster")
    user = named("users", str(ctx["user"]), "user") if ctx.get("user") else {}
    for unsupported in ("exec", "auth-provider"):
        if unsupported in user:
            raise KubeConfigError(
                f"context {context!r}: user {unsupported!r} credentials are not supported "
                "here; use a client certificate, token or tokenFile identity"
            )
    if not cluster.get("server"):
        raise KubeConfigError(f"context {context!r}: its cluster has no server")

    def file(key: str, where: dict[str, Any]) -> str | None:
        value = where.get(key)
        return str(base / value) if value else None

    cert_file = file("client-certificate", user) or _materialise(
        user.get("client-certificate-data")
    )
    key_file = file("client-key", user) or _materialise(user.get("client-key-data"))
    if bool(cert_file) != bool(key_file):
        raise KubeConfigError(f"context {context!r}: a client certificate needs its key")
    ca_data = cluster.get("certificate-authority-data")
    return Endpoint(
        server=str(cluster["server"]),
        ca_file=file("certificate-authority", cluster),
        ca_data=base64.b64decode(ca_data).decode() if ca_data else None,
        verify=not cluster.get("insecure-skip-tls-verify", False),
        tls_server_name=cluster.get("tls-server-name") or None,
        cert_file=cert_file,
        key_file=key_file,
        token=user.get("token") or None,
        token_file=file("tokenFile", user),
    )


_private_dir: str | None = None


def _materialise(data: str | None) -> str | None:
    """Base64 ``-data`` of a kubeconfig as a private file (TLS loads a client certificate and
    key only from files), removed when the process exits."""
    global _private_dir
    if not data:
        return None
    if _private_dir is None:
        _private_dir = tempfile.mkdtemp(prefix="kubehttp-")
        atexit.register(shutil.rmtree, _private_dir, True)
    fd, name = tempfile.mkstemp(dir=_private_dir)
    with os.fdopen(fd, "wb") as out:
        out.write(base64.b64decode(data))
    return name
