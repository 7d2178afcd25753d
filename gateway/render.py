"""One pure builder per Kubernetes kind: an ExternalService plus settings in, plain dicts out.

Builders never read the cluster, the network or the environment; the caller supplies whatever
live state matters (only the hijack state does). Output is deterministic, so that server-side
apply of an unchanged object is a no-op and ``egressctl render`` is diffable.
"""

from __future__ import annotations

import copy

from core import constants as c
from core.hijack import HijackState
from core.kube import CONFIGMAP, DEPLOYMENT, HPA, NETWORK_POLICY, PDB, SERVICE, Obj, Resource
from core.settings import Settings
from core.spec import ExternalService, ExternalServiceSpec, service_port_name
from gateway.envoy import admin_port, bootstrap_yaml, config_hash


def gateway_labels(name: str) -> dict[str, str]:
    return {c.LABEL_APP: c.APP_VALUE, c.LABEL_GATEWAY: name}


def selector_labels(name: str) -> dict[str, str]:
    return {c.LABEL_GATEWAY: name}


def _metadata(
    es: ExternalService, settings: Settings, extra_labels: dict[str, str] | None = None
) -> Obj:
    meta: Obj = {
        "name": es.name,
        "namespace": settings.gateway_namespace,
        "labels": {**gateway_labels(es.name), **(extra_labels or {})},
        "annotations": {c.ANNOTATION_DNS_NAME: es.spec.dns_name},
    }
    if es.uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND,
                "name": es.name,
                "uid": es.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def _head(kind: Resource, metadata: Obj) -> Obj:
    return {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": metadata}


def configmap(es: ExternalService, settings: Settings) -> Obj:
    obj = _head(CONFIGMAP, _metadata(es, settings))
    obj["data"] = {c.CONFIGMAP_KEY: bootstrap_yaml(es.name, es.spec)}
    return obj


def pod_security_context(spec: ExternalServiceSpec) -> Obj:
    """The gateway pod's securityContext: Pod Security "restricted", Envoy as uid/gid 101.

    A non-root process cannot bind ports below 1024 even with CAP_NET_BIND_SERVICE in its
    bounding set (the runtime grants no ambient capabilities), so when a declared port is
    below 1024 the pod lowers ``net.ipv4.ip_unprivileged_port_start`` in its own network
    namespace to its lowest declared port instead: a namespaced "safe" sysctl that kubelets
    allow by default and Pod Security admits at every level.
    """
    security: Obj = {
        "runAsNonRoot": True,
        "runAsUser": c.GATEWAY_UID,
        "runAsGroup": c.GATEWAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    lowest = min(p.port for p in spec.ports)
    if lowest < c.PRIVILEGED_PORT_LIMIT:
        security["sysctls"] = [{"name": c.SYSCTL_UNPRIVILEGED_PORT_START, "value": str(lowest)}]
    return security


# The gateway container: no privilege escalation (no setuid), no capabilities at all, and
# nothing writable but what Kubernetes mounts (Envoy writes no files: logs go to stdout, the
# config is a read-only ConfigMap, and hot restart, which would need shared memory, is off).
CONTAINER_SECURITY_CONTEXT: Obj = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def deployment(es: ExternalService, settings: Settings) -> Obj:
    """The gateway Deployment. ``spec.replicas`` is left out: the HPA owns it.

    Pods are hardened (docs/operations.md, "Least privilege"): non-root, no capabilities, a
    read-only root filesystem, the runtime's default seccomp profile, no ServiceAccount token
    (Envoy never calls the API server) and no Service environment variables.
    """
    spec = es.spec
    envoy_yaml = bootstrap_yaml(es.name, spec)
    admin = admin_port(spec)
    # A pod is never hot-restarted in place: --disable-hot-restart spares Envoy its shared
    # memory region and domain socket.
    args = ["-c", f"{c.CONFIG_MOUNT_PATH}/{c.CONFIGMAP_KEY}", "--disable-hot-restart"]
    if spec.envoy_log_level:
        args += ["--log-level", spec.envoy_log_level]
    container: Obj = {
        "name": c.CONTAINER_NAME,
        "image": settings.envoy_image,
        "args": args,
        "ports": [{"containerPort": p.port, "protocol": p.protocol.value} for p in spec.ports],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": admin}},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "25"]}}},
        "resources": spec.resources.to_dict(),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
        "volumeMounts": [
            {"name": "envoy-config", "mountPath": c.CONFIG_MOUNT_PATH, "readOnly": True}
        ],
    }
    pod_spec: Obj = {
        "automountServiceAccountToken": False,
        "containers": [container],
        "dnsPolicy": "Default",
        "enableServiceLinks": False,
        "securityContext": pod_security_context(spec),
        "terminationGracePeriodSeconds": 30,
        "volumes": [{"name": "envoy-config", "configMap": {"name": es.name}}],
    }
    if settings.node_selector_key:
        pod_spec["nodeSelector"] = {settings.node_selector_key: settings.node_selector_value}
    if settings.toleration_key:
        pod_spec["tolerations"] = [
            {
                "key": settings.toleration_key,
                "operator": "Equal",
                "value": settings.toleration_value,
                "effect": "NoSchedule",
            }
        ]
    if settings.topology_spread:
        pod_spec["topologySpreadConstraints"] = [
            {
                "maxSkew": t.max_skew,
                "topologyKey": t.topology_key,
                "whenUnsatisfiable": t.when_unsatisfiable,
                "labelSelector": {"matchLabels": gateway_labels(es.name)},
            }
            for t in settings.topology_spread
        ]
    obj = _head(DEPLOYMENT, _metadata(es, settings))
    obj["spec"] = {
        "selector": {"matchLabels": selector_labels(es.name)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
        },
        "template": {
            "metadata": {
                "labels": gateway_labels(es.name),
                "annotations": {
                    c.ANNOTATION_DNS_NAME: spec.dns_name,
                    c.ANNOTATION_CONFIG_HASH: config_hash(envoy_yaml),
                    c.ANNOTATION_ADMIN_PORT: str(admin),
                },
            },
            "spec": pod_spec,
        },
    }
    return obj


def horizontal_pod_autoscaler(es: ExternalService, settings: Settings) -> Obj:
    obj = _head(HPA, _metadata(es, settings))
    obj["spec"] = {
        "scaleTargetRef": {
            "apiVersion": DEPLOYMENT.api_version,
            "kind": DEPLOYMENT.kind,
            "name": es.name,
        },
        "minReplicas": es.spec.min_replicas,
        "maxReplicas": es.spec.max_replicas,
        "metrics": [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": es.spec.target_cpu_utilization,
                    },
                },
            }
        ],
    }
    return obj


def service(
    es: ExternalService, settings: Settings, hijack_state: HijackState, claimed_at: str = ""
) -> Obj:
    """The gateway's ClusterIP Service; it also carries the hijack state and, while the hijack
    state is ``true``, when this gateway's claim on its dnsName began (see dns.render.Claim)."""
    meta = _metadata(es, settings, {c.LABEL_HIJACK_DNS: hijack_state.value})
    if claimed_at:
        meta["annotations"][c.ANNOTATION_CLAIMED_AT] = claimed_at
    if settings.service_topology_mode:
        meta["annotations"][c.ANNOTATION_TOPOLOGY_MODE] = es.spec.service_topology_mode or "Auto"
    obj = _head(SERVICE, meta)
    obj["spec"] = {
        "type": "ClusterIP",
        "selector": selector_labels(es.name),
        "ports": [
            {
                "name": service_port_name(es.name, p.port, p.protocol),
                "port": p.port,
                "protocol": p.protocol.value,
                "targetPort": p.port,
            }
            for p in es.spec.ports
        ],
    }
    return obj


def network_policy(es: ExternalService, settings: Settings) -> Obj:
    """Admit only pods (any namespace) carrying either grant label, and only on the spec ports."""
    obj = _head(NETWORK_POLICY, _metadata(es, settings))
    obj["spec"] = {
        "podSelector": {"matchLabels": selector_labels(es.name)},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {},
                        "podSelector": {
                            "matchLabels": {c.grant_label(es.name): c.GRANT_LABEL_VALUE}
                        },
                    },
                    {
                        "namespaceSelector": {},
                        "podSelector": {"matchLabels": {c.GRANT_LABEL_GATEWAY: es.name}},
                    },
                ],
                "ports": [{"port": p.port, "protocol": p.protocol.value} for p in es.spec.ports],
            }
        ],
    }
    return obj


def pod_disruption_budget(es: ExternalService, settings: Settings) -> Obj:
    obj = _head(PDB, _metadata(es, settings))
    obj["spec"] = {"maxUnavailable": "25%", "selector": {"matchLabels": selector_labels(es.name)}}
    return obj


def render(
    es: ExternalService, settings: Settings, hijack_state: HijackState, claimed_at: str = ""
) -> list[Obj]:
    """Every object gateway ``es`` needs, in ``core.kube.GATEWAY_KINDS`` (apply) order."""
    objects = [
        configmap(es, settings),
        network_policy(es, settings),
        service(es, settings, hijack_state, claimed_at),
        deployment(es, settings),
        horizontal_pod_autoscaler(es, settings),
    ]
    if settings.enable_pdb:
        objects.append(pod_disruption_budget(es, settings))
    return objects
