"""Exporter settings, read once from the environment (same variable names as the functions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.envreader import EnvReader
from core.notice import DEFAULT_EVENTS_TOPIC
from core.settings import DEFAULT_GATEWAY_NAMESPACE


class ExporterSettingsError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ExporterSettings:
    project: str
    events_topic: str = DEFAULT_EVENTS_TOPIC
    gateway_namespace: str = DEFAULT_GATEWAY_NAMESPACE
    health_host: str = "0.0.0.0"
    health_port: int = 8080
    # Server-side watch timeout: the watch is re-opened (from our resourceVersion) this often.
    watch_timeout_s: int = 300
    # Bounded publishing: after this long without a successful publish the process exits
    # non-zero, and its restart re-lists and republishes everything.
    publish_timeout_s: int = 60
    # Publish requests in flight at once (one per ordering key, i.e. per ExternalService): a
    # re-list of N objects takes about N x the request's latency / this many.
    publish_concurrency: int = 32
    max_backoff_s: float = 30.0
    kubeconfig: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ExporterSettings:
        env_ = EnvReader(env)
        errors = env_.errors

        def whole(name: str, default: int, low: int, high: int) -> int:
            return env_.whole(name, default, low, high)

        project = (env.get("GOOGLE_CLOUD_PROJECT") or env.get("PUBSUB_PROJECT_ID") or "").strip()
        if not project:
            errors.append("GOOGLE_CLOUD_PROJECT: is required (the project of the events topic)")
        settings = cls(
            project=project,
            events_topic=(env.get("EGRESS_EVENTS_TOPIC") or DEFAULT_EVENTS_TOPIC).strip(),
            gateway_namespace=(env.get("GATEWAY_NAMESPACE") or DEFAULT_GATEWAY_NAMESPACE).strip(),
            health_host=(env.get("EXPORTER_HEALTH_HOST") or "0.0.0.0").strip(),
            health_port=whole("EXPORTER_HEALTH_PORT", 8080, 0, 65535),
            watch_timeout_s=whole("EXPORTER_WATCH_TIMEOUT_SECONDS", 300, 1, 3600),
            publish_timeout_s=whole("EXPORTER_PUBLISH_TIMEOUT_SECONDS", 60, 1, 3600),
            publish_concurrency=whole("EXPORTER_PUBLISH_CONCURRENCY", 32, 1, 256),
            kubeconfig=(env.get("KUBECONFIG") or "").strip() or None,
        )
        env_.raise_if_errors(ExporterSettingsError)
        return settings
