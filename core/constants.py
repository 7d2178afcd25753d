"""Every API name, label and annotation key the product reads or writes, in one place.

Keys are those of the original egress-operator so that a cluster can switch to this product
without touching a single ExternalService or workload label.
"""

from __future__ import annotations

GROUP = "egress.monzo.com"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ExternalService"
PLURAL = "externalservices"

FIELD_MANAGER = "egress-gateway-reconciler"

# Labels on every gateway object (and the pod template).
LABEL_APP = "app"
APP_VALUE = "egress-gateway"
LABEL_GATEWAY = f"{GROUP}/gateway"
# Label on the gateway Service holding the hijack state ("false", "waiting-for-pods", "true").
LABEL_HIJACK_DNS = f"{GROUP}/hijack-dns"

# Annotations.
ANNOTATION_DNS_NAME = f"{GROUP}/dns-name"
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
ANNOTATION_ADMIN_PORT = f"{GROUP}/admin-port"
ANNOTATION_TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
# On the gateway Service: when it started to hold its dnsName (microseconds, RFC 3339); the
# oldest claim on a dnsName wins the DNS hijack.
ANNOTATION_CLAIMED_AT = f"{GROUP}/dns-claimed-at"
# Hash of the object as we last applied it; see reconcile.drift.
ANNOTATION_APPLIED_HASH = f"{GROUP}/applied-hash"
# On a deleted ExternalService: when its gateway may go (DNS has had time to forget it).
ANNOTATION_DELETE_AFTER = f"{GROUP}/delete-after"
# On an ExternalService: from which field managers the reconciler last took fields of each
# gateway object back by force, and when (JSON); see reconcile.fights.
ANNOTATION_TAKEN_BACK = f"{GROUP}/fields-taken-back"

# On the cluster's CoreDNS pods: resourceVersion of our last DNS write. Changing it makes the
# kubelet sync the pod, and so refresh its ConfigMap volumes, at once instead of within its
# sync period (about a minute). infra/rbac confines the reconciler to this one annotation.
ANNOTATION_DNS_RULES_VERSION = f"{GROUP}/dns-rules-version"
# On our rules ConfigMap: when its rules last changed (RFC 3339); a sync once it has been quiet
# for dns.delivery.SETTLE_AFTER_S adds the settle marker.
ANNOTATION_DNS_RULES_WRITTEN_AT = f"{GROUP}/dns-rules-written-at"
# EndpointSlices name the Service they belong to with this label (set by Kubernetes).
LABEL_SERVICE_NAME = "kubernetes.io/service-name"

# Holds a deleted ExternalService until its DNS rule is gone and the grace period has passed.
FINALIZER = f"{GROUP}/gateway-cleanup"

# Grants on client pods. The NetworkPolicy admits both forms: the one the original operator's
# policy enforced (allowed-<name>: "true") and the one its README documented
# (allowed-gateway: <name>).
GRANT_LABEL_PREFIX = f"{GROUP}/allowed-"
GRANT_LABEL_GATEWAY = f"{GROUP}/allowed-gateway"
GRANT_LABEL_VALUE = "true"

# The longest object name whose grant label key name part ("allowed-<name>") fits in 63.
MAX_NAME_LENGTH = 63 - len("allowed-")

CONFIGMAP_KEY = "envoy.yaml"
CONTAINER_NAME = "gateway"
CONFIG_MOUNT_PATH = "/etc/envoy"
ADMIN_PORT_BASE = 11000

# Gateway pods run as the official envoyproxy/envoy image's `envoy` user and group, never root.
GATEWAY_UID = 101
GATEWAY_GID = 101
# Ports below this one are privileged: binding them needs CAP_NET_BIND_SERVICE, which a
# non-root process never has in effect. Instead the pod lowers this per-network-namespace
# sysctl (a "safe" sysctl: kubelets and Pod Security "restricted" allow it) to its lowest
# declared port when that is below 1024.
PRIVILEGED_PORT_LIMIT = 1024
SYSCTL_UNPRIVILEGED_PORT_START = "net.ipv4.ip_unprivileged_port_start"


def grant_label(name: str) -> str:
    """The per-gateway grant label key a client pod carries to reach gateway ``name``."""
    return f"{GRANT_LABEL_PREFIX}{name}"
