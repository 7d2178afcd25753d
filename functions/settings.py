"""Settings of the event pipeline (topics, message limits, cluster credentials), read once.

Kept apart from ``reconcile.settings`` (what a gateway looks like) because they describe how the
reconciler is reached and fed, not what it renders; the exporter and the local runner read the
same variables so that one environment configures every part. A bad value stops start-up with a
message naming the variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from reconcile.envreader import EnvReader

DEFAULT_EVENTS_TOPIC = "egress-events"
DEFAULT_SWEEP_TOPIC = "egress-sweep"
# Older notices are acknowledged and left to the sweep (Cloud Scheduler runs it every few
# minutes): replaying a long backlog one object at a time is slower than one sweep.
DEFAULT_MAX_EVENT_AGE_S = 600
# Notices are ~200 bytes; anything much bigger is not ours.
DEFAULT_MAX_NOTICE_BYTES = 4096
# A deleted ExternalService waits out its DNS grace period; a wait this short is done inline
# (one more reconcile in the same invocation), a longer one is finished by the sweep.
DEFAULT_INLINE_REQUEUE_MAX_S = 20
# A notice dated this far in the future is refused: clocks are not that wrong.
MAX_CLOCK_SKEW_S = 300

CREDENTIAL_MODES = ("auto", "kubeconfig", "in-cluster", "gke")


class PipelineSettingsError(ValueError):
    """One or more pipeline variables are invalid; the message names each of them."""


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    project: str = ""
    events_topic: str = DEFAULT_EVENTS_TOPIC
    sweep_topic: str = DEFAULT_SWEEP_TOPIC
    max_event_age_s: int = DEFAULT_MAX_EVENT_AGE_S
    max_notice_bytes: int = DEFAULT_MAX_NOTICE_BYTES
    inline_requeue_max_s: int = DEFAULT_INLINE_REQUEUE_MAX_S
    credentials: str = "auto"
    kubeconfig: str | None = None
    kube_context: str | None = None
    gke_endpoint: str | None = None
    gke_ca_cert: str | None = None  # base64 PEM, as `gcloud container clusters describe` prints

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PipelineSettings:
        env_ = EnvReader(env)
        errors = env_.errors
        get, whole = env_.get, env_.whole

        def topic(name: str, default: str) -> str:
            value = get(name, default) or default
            if not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
                errors.append(f"{name}: {value!r} is not a Pub/Sub topic id")
            return value

        mode = get("KUBE_CREDENTIALS", "auto").lower() or "auto"
        if mode not in CREDENTIAL_MODES:
            errors.append(f"KUBE_CREDENTIALS: must be one of {', '.join(CREDENTIAL_MODES)}")
        endpoint = get("GKE_ENDPOINT") or None
        if mode == "gke" and not endpoint:
            errors.append("GKE_ENDPOINT: is required when KUBE_CREDENTIALS=gke")
        if endpoint and not endpoint.startswith("https://"):
            endpoint = f"https://{endpoint}"
        settings = cls(
            project=get("GOOGLE_CLOUD_PROJECT") or get("PUBSUB_PROJECT_ID"),
            events_topic=topic("EGRESS_EVENTS_TOPIC", DEFAULT_EVENTS_TOPIC),
            sweep_topic=topic("EGRESS_SWEEP_TOPIC", DEFAULT_SWEEP_TOPIC),
            max_event_age_s=whole("MAX_EVENT_AGE_SECONDS", DEFAULT_MAX_EVENT_AGE_S, 1),
            max_notice_bytes=whole("MAX_NOTICE_BYTES", DEFAULT_MAX_NOTICE_BYTES, 256),
            inline_requeue_max_s=whole(
                "INLINE_REQUEUE_MAX_SECONDS", DEFAULT_INLINE_REQUEUE_MAX_S, 0
            ),
            credentials=mode,
            kubeconfig=get("KUBECONFIG") or None,
            kube_context=get("KUBE_CONTEXT") or None,
            gke_endpoint=endpoint,
            gke_ca_cert=get("GKE_CA_CERT") or None,
        )
        env_.raise_if_errors(PipelineSettingsError)
        return settings

    def credential_mode(self, env: Mapping[str, str]) -> str:
        """``auto`` resolved: GKE endpoint, else in-cluster when in a pod, else kubeconfig."""
        if self.credentials != "auto":
            return self.credentials
        if self.gke_endpoint:
            return "gke"
        if env.get("KUBERNETES_SERVICE_HOST") and not self.kubeconfig:
            return "in-cluster"
        return "kubeconfig"
