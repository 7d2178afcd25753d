"""Settings of the event pipeline (topics, message limits, cluster credentials), read once.

Kept apart from ``core.settings`` (what a gateway looks like) because they describe how the
reconciler is reached and fed, not what it renders; the exporter and the local runner read the
same variables so that one environment configures every part. A bad value stops start-up with a
message naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from core.envreader import EnvReader
from core.notice import DEFAULT_EVENTS_TOPIC, DEFAULT_SWEEP_TOPIC

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
# SWEEP_SHARD_SIZE: a scheduled sweep over more ExternalServices than this fans out in shards
# of about this many (functions.shards, core.shards); 0 never shards. Chosen from bench
# .sweep_shards at 10,000: one invocation swept them in 38 s in sync and 78 s with one write
# each (a setting that changes every gateway), far inside the sweep function's 540 s, while 5
# shards took x1.7 and x1.2 as long with 4x the requests in sync (every shard lists everything).
DEFAULT_SWEEP_SHARD_SIZE = 10000

CREDENTIAL_MODES = ("auto", "kubeconfig", "in-cluster", "gke")
# Which of a GKE cluster's control-plane endpoints the functions use (GKE_ENDPOINT_TYPE):
# its public IP, its private IP (through a VPC connector), or its DNS name (publicly trusted
# certificate, reachable without a VPC path; IAM decides who may use it).
GKE_ENDPOINT_TYPES = ("public", "private", "dns")
GKE_CLUSTER_NAME = re.compile(r"projects/[^/\s]+/locations/[^/\s]+/clusters/[^/\s]+")


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
    # 0 here (settings built in code: tests, tools) never shards; a deployment reads
    # SWEEP_SHARD_SIZE, whose default is DEFAULT_SWEEP_SHARD_SIZE.
    sweep_shard_size: int = 0
    credentials: str = "auto"
    kubeconfig: str | None = None
    kube_context: str | None = None
    # The cluster, looked up in the GKE API at cold start for its endpoint and CA ...
    gke_cluster: str | None = None  # projects/P/locations/L/clusters/NAME
    gke_endpoint_type: str = "public"
    # ... unless these override it (both as `gcloud container clusters describe` prints them).
    gke_endpoint: str | None = None
    gke_ca_cert: str | None = None  # base64 PEM, or a file

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
        cluster = get("GKE_CLUSTER") or None
        if cluster and not GKE_CLUSTER_NAME.fullmatch(cluster):
            errors.append(
                f"GKE_CLUSTER: must be projects/PROJECT/locations/LOCATION/clusters/NAME "
                f"(got {cluster!r})"
            )
        if mode == "gke" and not endpoint and not cluster:
            errors.append("GKE_CLUSTER: is required when KUBE_CREDENTIALS=gke (or GKE_ENDPOINT)")
        endpoint_type = get("GKE_ENDPOINT_TYPE", "public").lower()
        if endpoint_type not in GKE_ENDPOINT_TYPES:
            errors.append(f"GKE_ENDPOINT_TYPE: must be one of {', '.join(GKE_ENDPOINT_TYPES)}")
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
            sweep_shard_size=whole("SWEEP_SHARD_SIZE", DEFAULT_SWEEP_SHARD_SIZE, 0),
            credentials=mode,
            kubeconfig=get("KUBECONFIG") or None,
            kube_context=get("KUBE_CONTEXT") or None,
            gke_cluster=cluster,
            gke_endpoint_type=endpoint_type,
            gke_endpoint=endpoint,
            gke_ca_cert=get("GKE_CA_CERT") or None,
        )
        env_.raise_if_errors(PipelineSettingsError)
        return settings

    def credential_mode(self, env: Mapping[str, str]) -> str:
        """``auto`` resolved: a GKE cluster or endpoint, else in-cluster when in a pod, else
        kubeconfig."""
        if self.credentials != "auto":
            return self.credentials
        if self.gke_cluster or self.gke_endpoint:
            return "gke"
        if env.get("KUBERNETES_SERVICE_HOST") and not self.kubeconfig:
            return "in-cluster"
        return "kubeconfig"
