"""The original egress-operator, simulated by the objects it leaves in a cluster.

Its binary cannot run here (no registry, no images of it), so the tests recreate what a cluster
running it holds, the way it writes it (monzo/egress-operator, read from its source):

- its CRD: kubebuilder's (controller-gen v0.4.0), apiextensions.k8s.io/v1, a plain structural
  schema, **no status subresource**, installed by ``make install`` (kubectl);
- its manager: Deployment ``egress-operator-controller-manager`` in ``egress-operator-system``
  (kustomize name prefix ``egress-operator-``), label ``control-plane=controller-manager``,
  ``--enable-leader-election`` with a 30 s lease; its leader-election lock, renewed every 2 s by
  the leader (controller-runtime's default retry period), held by ``<pod name>_<uuid>``;
- its gateway objects: created with POST and kept with merge patches (controller-runtime's
  ``client.MergeFrom``), i.e. Update operations under the field manager ``manager`` (the API
  server's name for a client that sets none: its binary is ``/manager``), owned by the
  ExternalService (controller reference), HPA in autoscaling/v1, a Deployment running Envoy as
  root (``ENVOY_UID=0``) with the image's default command, and a Service labelled
  ``egress.monzo.com/hijack-dns: "true"`` at once when ``hijackDns`` is set (its CoreDNS plugin
  then answers the name with the ClusterIP).

Two departures, both forced by the dev cluster and neither touching what is tested: the image is
the dev node's Envoy (``$ENVOY_IMAGE``; its default command is the official image's, ``envoy -c
/etc/envoy/envoy.yaml``) with a current bootstrap (Envoy 1.16's would not load), and the pod
carries a restricted securityContext, because the gateway namespace enforces Pod Security
``restricted`` (in a real cluster the original's root pods keep running while the namespace
label lands: operations.md, step 4).
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any

import yaml

from core import constants as c
from core.errors import PermanentError
from core.kube import (
    CONFIGMAP,
    DEPLOYMENT,
    NETWORK_POLICY,
    SERVICE,
    Kube,
    Resource,
)
from core.spec import parse_external_service
from gateway.envoy import admin_port, bootstrap_yaml, config_hash
from reconcile.migration import CRD, LEASE

ORIGINAL_MANAGER = "manager"
NAMESPACE = "egress-operator-system"
MANAGER_DEPLOYMENT = "egress-operator-controller-manager"
LOCK_NAME = "controller-leader-election-helper"
HPA_V1 = Resource("autoscaling/v1", "HorizontalPodAutoscaler", "horizontalpodautoscalers")

# The original's CRD (config/crd/bases/egress.monzo.com_externalservices.yaml): field names and
# types as it declares them; descriptions shortened.
ORIGINAL_CRD: dict[str, Any] = yaml.safe_load(
    """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  annotations:
    controller-gen.kubebuilder.io/version: v0.4.0
  name: externalservices.egress.monzo.com
spec:
  group: egress.monzo.com
  names:
    kind: ExternalService
    listKind: ExternalServiceList
    plural: externalservices
    singular: externalservice
  scope: Cluster
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        description: ExternalService is the Schema for the externalservices API
        type: object
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            description: ExternalServiceSpec defines the desired state of ExternalService
            type: object
            properties:
              dnsName: {type: string, description: DNS name of the external service}
              envoyLogLevel: {type: string}
              envoyDnsRefreshRateS: {type: number}
              envoyRespectDnsTTL: {type: boolean}
              envoyClusterMaxConnections: {type: integer, format: int32}
              hijackDns: {type: boolean}
              ipOverride: {type: array, items: {type: string}}
              maxReplicas: {type: integer, format: int32}
              minReplicas: {type: integer, format: int32}
              ports:
                type: array
                items:
                  type: object
                  properties:
                    port: {type: integer, format: int32}
                    protocol: {type: string}
              resources:
                type: object
                properties:
                  claims:
                    type: array
                    items:
                      type: object
                      required: [name]
                      properties:
                        name: {type: string}
                    x-kubernetes-list-map-keys: [name]
                    x-kubernetes-list-type: map
                  limits:
                    type: object
                    additionalProperties:
                      anyOf: [{type: integer}, {type: string}]
                      x-kubernetes-int-or-string: true
                  requests:
                    type: object
                    additionalProperties:
                      anyOf: [{type: integer}, {type: string}]
                      x-kubernetes-int-or-string: true
              targetCPUUtilizationPercentage: {type: integer, format: int32}
          status:
            description: ExternalServiceStatus defines the observed state of ExternalService
            type: object
"""
)


def install_original_crd(admin: Kube) -> dict[str, Any]:
    """Put the original's CRD in place of whatever is installed, as ``make install`` left it
    (a full replace: never a delete, which would delete every ExternalService), owned by
    kubectl's client-side apply only, as on a cluster where ``kubectl apply`` created it."""
    name = ORIGINAL_CRD["metadata"]["name"]
    manager = "kubectl-client-side-apply"
    live = admin.get(CRD, name)
    assert live is not None, "the dev stack's CRD is missing"
    body = {
        **ORIGINAL_CRD,
        "metadata": {
            **ORIGINAL_CRD["metadata"],
            "resourceVersion": live["metadata"]["resourceVersion"],
        },
    }
    admin.request("PUT", CRD.path(None, name), query=[("fieldManager", manager)], body=body)
    for _ in range(10):  # the CRD controller writes its status right after a change
        live = admin.get(CRD, name)
        assert live is not None
        kept = [
            e
            for e in live["metadata"]["managedFields"]
            if e.get("subresource") or e["manager"] == manager
        ]
        try:
            result: dict[str, Any] = admin.request(
                "PATCH",
                CRD.path(None, name),
                body={
                    "metadata": {
                        "resourceVersion": live["metadata"]["resourceVersion"],
                        "managedFields": kept,
                    }
                },
                content_type="application/merge-patch+json",
                final_statuses=frozenset({409}),
            )
        except PermanentError as exc:
            if exc.status == 409:
                continue
            raise
        return result
    raise AssertionError("the CRD kept changing")


def _owner(es_obj: dict[str, Any]) -> list[dict[str, Any]]:
    meta = es_obj["metadata"]
    return [
        {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def gateway_objects(es_obj: dict[str, Any], image: str) -> list[dict[str, Any]]:
    """The gateway objects the original's reconcile functions build for ``es_obj``."""
    es = parse_external_service(es_obj)
    spec = es_obj["spec"]
    name = es_obj["metadata"]["name"]
    labels = {c.LABEL_APP: c.APP_VALUE, c.LABEL_GATEWAY: name}
    annotations = {c.ANNOTATION_DNS_NAME: spec["dnsName"]}
    meta = {
        "name": name,
        "namespace": NAMESPACE,
        "labels": labels,
        "annotations": annotations,
        "ownerReferences": _owner(es_obj),
    }
    envoy_yaml = bootstrap_yaml(name, es.spec)
    port = admin_port(es.spec)
    ports = [{"port": p["port"], "protocol": p.get("protocol", "TCP")} for p in spec["ports"]]
    template_annotations = {
        **annotations,
        c.ANNOTATION_CONFIG_HASH: "original-" + config_hash(envoy_yaml)[:12],
        c.ANNOTATION_ADMIN_PORT: str(port),
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "progressDeadlineSeconds": 600,
            "revisionHistoryLimit": 10,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
            },
            "selector": {"matchLabels": {c.LABEL_GATEWAY: name}},
            "template": {
                "metadata": {"labels": labels, "annotations": template_annotations},
                "spec": {
                    "containers": [
                        {
                            "name": "gateway",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "ports": [
                                {"protocol": p["protocol"], "containerPort": p["port"]}
                                for p in ports
                            ],
                            "volumeMounts": [{"name": "envoy-config", "mountPath": "/etc/envoy"}],
                            "lifecycle": {"preStop": {"exec": {"command": ["/bin/sleep", "25"]}}},
                            "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "File",
                            "readinessProbe": {
                                "httpGet": {"path": "/ready", "port": port, "scheme": "HTTP"},
                                "failureThreshold": 3,
                                "periodSeconds": 10,
                                "successThreshold": 1,
                                "timeoutSeconds": 1,
                            },
                            "resources": spec.get("resources")
                            or {
                                "requests": {"cpu": "100m", "memory": "50Mi"},
                                "limits": {"cpu": "2", "memory": "1Gi"},
                            },
                            "env": [{"name": "ENVOY_UID", "value": "0"}],
                            # Not the original's (it has none): the namespace is "restricted".
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "restartPolicy": "Always",
                    "schedulerName": "default-scheduler",
                    # The original's is {}; see above.
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": c.GATEWAY_UID,
                        "runAsGroup": c.GATEWAY_GID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "terminationGracePeriodSeconds": 30,
                    "dnsPolicy": "Default",
                    "volumes": [
                        {
                            "name": "envoy-config",
                            "configMap": {"name": name, "defaultMode": 420},
                        }
                    ],
                },
            },
        },
    }
    service_labels = dict(labels)
    if spec.get("hijackDns"):
        service_labels[c.LABEL_HIJACK_DNS] = "true"
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {c.CONFIGMAP_KEY: envoy_yaml},
        },
        deployment,
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta,
            "spec": {
                "podSelector": {"matchLabels": {c.LABEL_GATEWAY: name}},
                "ingress": [
                    {
                        "from": [
                            {
                                "podSelector": {"matchLabels": {c.grant_label(name): "true"}},
                                "namespaceSelector": {},
                            }
                        ],
                        "ports": [{"protocol": p["protocol"], "port": p["port"]} for p in ports],
                    }
                ],
                "policyTypes": ["Ingress"],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {**meta, "labels": service_labels},
            "spec": {
                "selector": {c.LABEL_GATEWAY: name},
                "ports": [
                    {"protocol": p["protocol"], "port": p["port"], "targetPort": p["port"]}
                    for p in ports
                ],
            },
        },
        {
            "apiVersion": "autoscaling/v1",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta,
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": spec.get("minReplicas", 3),
                "maxReplicas": spec.get("maxReplicas", 12),
                "targetCPUUtilizationPercentage": spec.get("targetCPUUtilizationPercentage", 50),
            },
        },
    ]


RESOURCES = {
    "ConfigMap": CONFIGMAP,
    "Deployment": DEPLOYMENT,
    "NetworkPolicy": NETWORK_POLICY,
    "Service": SERVICE,
    "HorizontalPodAutoscaler": HPA_V1,
}


def create_as_original(admin: Kube, obj: dict[str, Any]) -> dict[str, Any]:
    """POST, as its client.Create does, under its field manager."""
    resource = RESOURCES[obj["kind"]]
    created: dict[str, Any] = admin.request(
        "POST",
        resource.path(NAMESPACE),
        query=[("fieldManager", ORIGINAL_MANAGER)],
        body=obj,
    )
    return created


def patch_as_original(
    admin: Kube, kind: str, name: str, patch: dict[str, Any], manager: str = ORIGINAL_MANAGER
) -> dict[str, Any]:
    """A merge patch, as its patchIfNecessary sends (only what differs), under its manager."""
    patched: dict[str, Any] = admin.request(
        "PATCH",
        RESOURCES[kind].path(NAMESPACE, name),
        query=[("fieldManager", manager)],
        body=patch,
        content_type="application/merge-patch+json",
    )
    return patched


def manager_deployment(image: str, replicas: int = 1) -> dict[str, Any]:
    """Its manager Deployment (config/manager/manager.yaml with the kustomize prefix and
    namespace), with the dev node's client image standing in for the manager binary."""
    labels = {"control-plane": "controller-manager"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": MANAGER_DEPLOYMENT, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65534,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "manager",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "command": ["/bin/sleep", "3600"],
                            "args": ["--enable-leader-election", "--enable-pod-disruption-budgets"],
                            "env": [
                                {"name": "ENVOY_IMAGE", "value": "envoyproxy/envoy-alpine:v1.16.5"},
                                {"name": "NODE_SELECTOR_KEY", "value": "role"},
                                {"name": "NODE_SELECTOR_VALUE", "value": "egress-pods"},
                                {"name": "ENABLE_SERVICE_TOPOLOGY_MODE", "value": "true"},
                            ],
                            "resources": {
                                "requests": {"cpu": "10m", "memory": "20Mi"},
                                "limits": {"cpu": "100m", "memory": "30Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                },
            },
        },
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderLease:
    """The leader's lock, renewed every 2 s from a thread while ``running``, as
    controller-runtime's leader election does (lease 30 s, the original's main.go)."""

    def __init__(self, admin: Kube, holder_pod: str) -> None:
        self.admin = admin
        self.holder = f"{holder_pod}_{uuid.uuid4()}"
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _write(self, renew: str) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LOCK_NAME, "namespace": NAMESPACE},
            "spec": {
                "holderIdentity": self.holder,
                "leaseDurationSeconds": 30,
                "acquireTime": renew,
                "renewTime": renew,
                "leaseTransitions": 0,
            },
        }
        self.admin.request(
            "PATCH",
            LEASE.path(NAMESPACE, LOCK_NAME),
            query=[("fieldManager", ORIGINAL_MANAGER), ("force", "true")],
            body=body,
            content_type="application/apply-patch+yaml",
        )

    def start(self) -> None:
        self._write(_now())

        def renew() -> None:
            while not self.stop.wait(2.0):
                self._write(_now())

        self.thread = threading.Thread(target=renew, daemon=True)
        self.thread.start()

    def halt(self) -> None:
        """The manager stopped: no more renewals (the lock stays until it expires)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)

    def expire(self) -> None:
        """Time passes: the last renewal is now older than the lease."""
        old = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self._write(old)

    def remove(self) -> None:
        self.halt()
        self.admin.delete(LEASE, LOCK_NAME, NAMESPACE)
