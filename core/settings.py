"""Process settings, read once from the environment into a frozen object and passed explicitly.

Variable names and meanings follow the original operator so that its Deployment's environment
carries over unchanged; the variables it did not have are this product's own additions. A bad
value stops start-up with a message naming the variable, never a half-configured process.

The GATEWAY_MAX_* ceilings bound what one ExternalService may ask for, because whoever may
create ExternalServices could otherwise claim a cluster's capacity; they default to generous
values a platform team raises here, never below the defaults every ExternalService gets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from core.envreader import EnvReader
from core.names import DNS1123_LABEL, DNS1123_SUBDOMAIN, LABEL_VALUE, is_label_key
from core.spec import (
    CPU,
    DEFAULT_CEILING_CPU,
    DEFAULT_CEILING_MEMORY,
    DEFAULT_CEILING_REPLICAS,
    DEFAULT_CEILINGS,
    DEFAULT_LIMITS,
    DEFAULT_MAX_REPLICAS,
    ENV_MAX_CPU,
    ENV_MAX_MEMORY,
    ENV_MAX_REPLICAS,
    MAX_INT32,
    MEMORY,
    Ceilings,
    quantity_value,
)

# 1.40 or later: earlier releases print null for empty values in JSON access logs although
# omit_empty_values asks to leave them out (envoyproxy/envoy#37941).
DEFAULT_ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
DEFAULT_GATEWAY_NAMESPACE = "egress-operator-system"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
DEFAULT_ZONE_KEY = "topology.kubernetes.io/zone"
DEFAULT_HOSTNAME_KEY = "kubernetes.io/hostname"
# A topology spread constraint's whenUnsatisfiable, as Kubernetes spells them.
SCHEDULE_ANYWAY = "ScheduleAnyway"
WHEN_UNSATISFIABLE = (SCHEDULE_ANYWAY, "DoNotSchedule")
# How long a deleted gateway keeps serving after its DNS rule is withdrawn: DNS propagation
# (p95 2 s measured with the CoreDNS pod nudge and `reload 2s`; but a kubelet may sync the nudged
# pod before its ConfigMap cache has the write, and then the rule waits for its periodic sync,
# 60 s + jitter; up to ~105 s without the nudge: that sync plus kubeadm's `reload` 30 s +- 15 s)
# plus answers clients cached just before (kubeadm's CoreDNS gives a TTL of 30 s).
DEFAULT_DELETE_GRACE_S = 120
DEFAULT_DELETE_GRACE_WITHOUT_NUDGE_S = 180
# ExternalServices a sweep converges at once: each sends its requests one after another, so the
# API server sees at most this many of ours in flight, far below the 49 seats API Priority and
# Fairness gives its `global-default` level; past about 8 a 2-core control plane is the limit
# (bench.sweep), and 429s are retried as Retry-After says (core.errors).
DEFAULT_SWEEP_CONCURRENCY = 16
DEFAULT_DNS_CONFIGMAP = "egress-gateway-dns"
# How many ConfigMaps may hold rules: DNS_CONFIGMAP_NAME, then DNS_CONFIGMAP_NAME-1 ... -(N-1).
# CoreDNS mounts all of them (optional sources of one projected volume, infra/coredns), so a
# shard coming into use changes nothing there; infra/rbac names each of them.
DEFAULT_DNS_CONFIGMAP_SHARDS = 8
MAX_DNS_CONFIGMAP_SHARDS = 32
# Where the cluster's CoreDNS mounts DEFAULT_DNS_CONFIGMAP (see README, "Cluster DNS").
DEFAULT_IMPORT_PATH = "/etc/coredns/egress-gateways/*.override"
# The Service in front of the cluster's CoreDNS; its EndpointSlices name the pods to nudge.
DEFAULT_COREDNS_SERVICE = "kube-dns"
# CLUSTER_DNS: which cluster DNS the reconciler configures for hijackDns. "coredns": the cluster
# runs CoreDNS that imports our rules ConfigMap (README, "What your CoreDNS needs"). "none": no
# CoreDNS we may configure (GKE's kube-dns or Cloud DNS, Autopilot's managed kube-system): the
# reconciler never reads or writes DNS_CONFIGMAP_NAMESPACE, needs no grant there, and tells each
# ExternalService that asks for hijackDns that it is not available; gateways work unchanged.
CLUSTER_DNS_COREDNS = "coredns"
CLUSTER_DNS_NONE = "none"
CLUSTER_DNS_CHOICES = (CLUSTER_DNS_COREDNS, CLUSTER_DNS_NONE)

_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:@]*$")


class SettingsError(ValueError):
    """One or more environment variables are invalid; the message names each of them."""


@dataclass(frozen=True, slots=True)
class TopologySpread:
    max_skew: int
    topology_key: str
    when_unsatisfiable: str = SCHEDULE_ANYWAY


@dataclass(frozen=True, slots=True)
class Settings:
    envoy_image: str = DEFAULT_ENVOY_IMAGE
    gateway_namespace: str = DEFAULT_GATEWAY_NAMESPACE
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    toleration_key: str | None = None
    toleration_value: str = ""
    node_selector_key: str | None = None
    node_selector_value: str = ""
    topology_spread: tuple[TopologySpread, ...] = ()
    service_topology_mode: bool = False
    enable_pdb: bool = False
    delete_grace_s: int = DEFAULT_DELETE_GRACE_S
    cluster_dns: str = CLUSTER_DNS_COREDNS
    dns_configmap_namespace: str = "kube-system"
    dns_configmap_name: str = DEFAULT_DNS_CONFIGMAP
    dns_configmap_shards: int = DEFAULT_DNS_CONFIGMAP_SHARDS
    coredns_configmap_name: str = "coredns"
    corefile_key: str = "Corefile"
    manage_coredns_import: bool = False
    coredns_import_path: str = DEFAULT_IMPORT_PATH
    nudge_coredns_pods: bool = True
    coredns_service_name: str = DEFAULT_COREDNS_SERVICE
    sweep_concurrency: int = DEFAULT_SWEEP_CONCURRENCY
    # Add `egressctl access` findings to each sweep's report. Needs the reconciler bound to the
    # egress-auditor role too (it then reads every pod): off by default, see README.
    sweep_access_audit: bool = False
    ceilings: Ceilings = DEFAULT_CEILINGS

    @property
    def dns_configmap_names(self) -> tuple[str, ...]:
        """Our rules ConfigMaps, the first one (DNS_CONFIGMAP_NAME) first."""
        base = self.dns_configmap_name
        return (base, *(f"{base}-{i}" for i in range(1, self.dns_configmap_shards)))

    @property
    def hijack_available(self) -> bool:
        """Whether the reconciler configures cluster DNS at all (CLUSTER_DNS=coredns)."""
        return self.cluster_dns == CLUSTER_DNS_COREDNS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping (pass ``os.environ`` at the edge)."""
        env_ = EnvReader(env)
        errors = env_.errors
        get, flag, whole_number = env_.get, env_.flag, env_.whole

        def positive_int(name: str) -> int | None:
            return env_.optional_whole(name, 1)

        def label_key(name: str, default: str = "") -> str:
            value = get(name, default)
            if value and not is_label_key(value):
                errors.append(f"{name}: {value!r} is not a valid Kubernetes label key")
            return value

        def when_unsatisfiable(name: str) -> str:
            value = get(name, SCHEDULE_ANYWAY)
            if value not in WHEN_UNSATISFIABLE:
                env_.error(name, f"must be ScheduleAnyway or DoNotSchedule (got {value!r})")
                return SCHEDULE_ANYWAY
            return value

        def label_value(name: str) -> str:
            value = get(name)
            if len(value) > 63 or not LABEL_VALUE.match(value):
                errors.append(f"{name}: {value!r} is not a valid Kubernetes label value")
            return value

        image = get("ENVOY_IMAGE", DEFAULT_ENVOY_IMAGE) or DEFAULT_ENVOY_IMAGE
        if not _IMAGE.match(image):
            errors.append(f"ENVOY_IMAGE: {image!r} is not a container image reference")
        namespace = get("GATEWAY_NAMESPACE", DEFAULT_GATEWAY_NAMESPACE) or DEFAULT_GATEWAY_NAMESPACE
        if len(namespace) > 63 or not DNS1123_LABEL.match(namespace):
            errors.append(f"GATEWAY_NAMESPACE: {namespace!r} is not a valid namespace name")
        domain = (get("CLUSTER_DOMAIN", DEFAULT_CLUSTER_DOMAIN) or DEFAULT_CLUSTER_DOMAIN).rstrip(
            "."
        )
        if len(domain) > 253 or not DNS1123_SUBDOMAIN.match(domain):
            errors.append(f"CLUSTER_DOMAIN: {domain!r} is not a valid DNS domain")

        def object_name(name: str, default: str) -> str:
            value = get(name, default) or default
            if len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
                errors.append(f"{name}: {value!r} is not a valid object name")
            return value

        dns_ns = object_name("DNS_CONFIGMAP_NAMESPACE", "kube-system")
        if len(dns_ns) > 63 or not DNS1123_LABEL.match(dns_ns):
            errors.append(f"DNS_CONFIGMAP_NAMESPACE: {dns_ns!r} is not a valid namespace name")
        import_path = get("COREDNS_IMPORT_PATH", DEFAULT_IMPORT_PATH) or DEFAULT_IMPORT_PATH
        if not import_path.startswith("/") or any(ch.isspace() for ch in import_path):
            errors.append(
                f"COREDNS_IMPORT_PATH: {import_path!r} must be an absolute path without spaces"
            )
        corefile_key = get("COREFILE_KEY", "Corefile") or "Corefile"

        tol_key = label_key("TAINT_TOLERATION_KEY")
        tol_value = label_value("TAINT_TOLERATION_VALUE")
        if tol_value and not tol_key:
            errors.append("TAINT_TOLERATION_VALUE: is set but TAINT_TOLERATION_KEY is empty")
        sel_key = label_key("NODE_SELECTOR_KEY")
        sel_value = label_value("NODE_SELECTOR_VALUE")
        if sel_value and not sel_key:
            errors.append("NODE_SELECTOR_VALUE: is set but NODE_SELECTOR_KEY is empty")

        spread: list[TopologySpread] = []
        enable_spread = flag("ENABLE_POD_TOPOLOGY_SPREAD")
        zone_skew = positive_int("POD_TOPOLOGY_ZONE_MAX_SKEW")
        zone_key = label_key("POD_TOPOLOGY_ZONE_MAX_SKEW_KEY", DEFAULT_ZONE_KEY) or DEFAULT_ZONE_KEY
        zone_when = when_unsatisfiable("POD_TOPOLOGY_ZONE_WHEN_UNSATISFIABLE")
        host_skew = positive_int("POD_TOPOLOGY_HOSTNAME_MAX_SKEW")
        host_key = (
            label_key("POD_TOPOLOGY_HOSTNAME_MAX_SKEW_KEY", DEFAULT_HOSTNAME_KEY)
            or DEFAULT_HOSTNAME_KEY
        )
        host_when = when_unsatisfiable("POD_TOPOLOGY_HOSTNAME_WHEN_UNSATISFIABLE")
        if enable_spread:
            if zone_skew is not None:
                spread.append(TopologySpread(zone_skew, zone_key, zone_when))
            if host_skew is not None:
                spread.append(TopologySpread(host_skew, host_key, host_when))
            if not spread:
                errors.append(
                    "ENABLE_POD_TOPOLOGY_SPREAD: is true but neither "
                    "POD_TOPOLOGY_ZONE_MAX_SKEW nor POD_TOPOLOGY_HOSTNAME_MAX_SKEW is set"
                )

        def replicas_ceiling() -> int:
            value = whole_number(ENV_MAX_REPLICAS, DEFAULT_CEILING_REPLICAS, 1, MAX_INT32)
            if value < DEFAULT_MAX_REPLICAS:
                env_.error(
                    ENV_MAX_REPLICAS,
                    f"must be at least {DEFAULT_MAX_REPLICAS}, the default maxReplicas, or every "
                    f"ExternalService without maxReplicas would be refused (got {value})",
                )
                return DEFAULT_CEILING_REPLICAS
            return value

        def quantity_ceiling(name: str, resource: str, default: str) -> str:
            value = get(name, default)
            floor = dict(DEFAULT_LIMITS)[resource]
            try:
                amount = quantity_value(value)
            except ValueError as exc:
                env_.error(name, f"{value!r} {exc}: use a quantity such as {default}")
                return default
            if amount < quantity_value(floor):
                env_.error(
                    name,
                    f"must be at least {floor}, the default {resource} limit, or every "
                    f"ExternalService without resources would be refused (got {value!r})",
                )
                return default
            return value

        ceilings = Ceilings(
            max_replicas=replicas_ceiling(),
            cpu=quantity_ceiling(ENV_MAX_CPU, CPU, DEFAULT_CEILING_CPU),
            memory=quantity_ceiling(ENV_MAX_MEMORY, MEMORY, DEFAULT_CEILING_MEMORY),
        )
        nudge = flag("NUDGE_COREDNS_PODS", True)
        cluster_dns = get("CLUSTER_DNS", CLUSTER_DNS_COREDNS)
        if cluster_dns not in CLUSTER_DNS_CHOICES:
            env_.error("CLUSTER_DNS", f"must be coredns or none (got {cluster_dns!r})")
            cluster_dns = CLUSTER_DNS_COREDNS
        manage_import = flag("MANAGE_COREDNS_IMPORT")
        if manage_import and cluster_dns == CLUSTER_DNS_NONE:
            env_.error(
                "MANAGE_COREDNS_IMPORT",
                "is true but CLUSTER_DNS=none: there is no Corefile the reconciler may edit",
            )
        settings = cls(
            envoy_image=image,
            gateway_namespace=namespace,
            cluster_domain=domain,
            toleration_key=tol_key or None,
            toleration_value=tol_value,
            node_selector_key=sel_key or None,
            node_selector_value=sel_value,
            topology_spread=tuple(spread),
            service_topology_mode=flag("ENABLE_SERVICE_TOPOLOGY_MODE"),
            enable_pdb=flag("ENABLE_PDB"),
            delete_grace_s=whole_number(
                "DELETE_GRACE_SECONDS",
                DEFAULT_DELETE_GRACE_S if nudge else DEFAULT_DELETE_GRACE_WITHOUT_NUDGE_S,
                0,
            ),
            sweep_concurrency=whole_number("SWEEP_CONCURRENCY", DEFAULT_SWEEP_CONCURRENCY, 1),
            cluster_dns=cluster_dns,
            dns_configmap_namespace=dns_ns,
            dns_configmap_name=object_name("DNS_CONFIGMAP_NAME", DEFAULT_DNS_CONFIGMAP),
            dns_configmap_shards=whole_number(
                "DNS_CONFIGMAP_SHARDS",
                DEFAULT_DNS_CONFIGMAP_SHARDS,
                1,
                MAX_DNS_CONFIGMAP_SHARDS,
            ),
            coredns_configmap_name=object_name("COREDNS_CONFIGMAP_NAME", "coredns"),
            corefile_key=corefile_key,
            manage_coredns_import=manage_import,
            coredns_import_path=import_path,
            nudge_coredns_pods=nudge,
            coredns_service_name=object_name("COREDNS_SERVICE_NAME", DEFAULT_COREDNS_SERVICE),
            sweep_access_audit=flag("SWEEP_ACCESS_AUDIT"),
            ceilings=ceilings,
        )
        env_.raise_if_errors(SettingsError)
        return settings
