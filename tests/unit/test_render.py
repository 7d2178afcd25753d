"""Per-kind builders, table-driven: what each object must hold for a given spec and settings."""

from __future__ import annotations

from typing import Any

import pytest

from core import constants as c
from core.hijack import HijackState
from core.settings import Settings, TopologySpread
from core.spec import ExternalService, parse_external_service
from gateway.envoy import bootstrap_yaml, config_hash
from gateway.render import (
    configmap,
    deployment,
    horizontal_pod_autoscaler,
    network_policy,
    pod_disruption_budget,
    render,
    service,
)

DEFAULT = Settings()


def es(name: str = "google", uid: str = "", **spec: Any) -> ExternalService:
    body: dict[str, Any] = {"dnsName": "google.com", "ports": [{"port": 443}]}
    body.update(spec)
    meta: dict[str, Any] = {"name": name}
    if uid:
        meta["uid"] = uid
    return parse_external_service(
        {
            "apiVersion": "egress.monzo.com/v1",
            "kind": "ExternalService",
            "metadata": meta,
            "spec": body,
        }
    )


def test_every_object_is_named_labelled_annotated_and_owned() -> None:
    svc = es(uid="1234")
    objects = render(svc, Settings(enable_pdb=True), HijackState.FALSE)
    assert [o["kind"] for o in objects] == [
        "ConfigMap",
        "NetworkPolicy",
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
    for obj in objects:
        meta = obj["metadata"]
        assert meta["name"] == "google"
        assert meta["namespace"] == "egress-operator-system"
        assert meta["labels"]["app"] == "egress-gateway"
        assert meta["labels"]["egress.monzo.com/gateway"] == "google"
        assert meta["annotations"]["egress.monzo.com/dns-name"] == "google.com"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "egress.monzo.com/v1",
                "kind": "ExternalService",
                "name": "google",
                "uid": "1234",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_objects_from_files_have_no_owner_reference() -> None:
    for obj in render(es(), DEFAULT, HijackState.FALSE):
        assert "ownerReferences" not in obj["metadata"]


def test_pdb_only_when_enabled() -> None:
    kinds = [o["kind"] for o in render(es(), DEFAULT, HijackState.FALSE)]
    assert "PodDisruptionBudget" not in kinds
    pdb = pod_disruption_budget(es(), DEFAULT)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {
        "maxUnavailable": "25%",
        "selector": {"matchLabels": {c.LABEL_GATEWAY: "google"}},
    }


def test_configmap_holds_the_bootstrap() -> None:
    svc = es()
    assert configmap(svc, DEFAULT)["data"] == {"envoy.yaml": bootstrap_yaml("google", svc.spec)}


def test_deployment_pod_template() -> None:
    svc = es(
        ports=[{"port": 443}, {"port": 53, "protocol": "UDP"}],
        envoyLogLevel="debug",
        resources={"requests": {"cpu": "1"}, "limits": {"cpu": "2"}},
    )
    dep = deployment(svc, Settings(envoy_image="envoyproxy/envoy:v1.0.0"))
    spec = dep["spec"]
    assert "replicas" not in spec, "the HPA owns replicas"
    assert spec["selector"] == {"matchLabels": {"egress.monzo.com/gateway": "google"}}
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": "25%"}
    template = spec["template"]
    assert template["metadata"]["labels"] == {
        "app": "egress-gateway",
        "egress.monzo.com/gateway": "google",
    }
    annotations = template["metadata"]["annotations"]
    assert annotations["egress.monzo.com/config-hash"] == config_hash(
        bootstrap_yaml("google", svc.spec)
    )
    assert annotations["egress.monzo.com/admin-port"] == "11000"
    assert annotations["egress.monzo.com/dns-name"] == "google.com"
    pod = template["spec"]
    assert pod["dnsPolicy"] == "Default"
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["volumes"] == [{"name": "envoy-config", "configMap": {"name": "google"}}]
    (container,) = pod["containers"]
    assert container["name"] == "gateway"
    assert container["image"] == "envoyproxy/envoy:v1.0.0"
    assert container["args"] == [
        "-c",
        "/etc/envoy/envoy.yaml",
        "--disable-hot-restart",
        "--log-level",
        "debug",
    ]
    assert "env" not in container
    assert container["ports"] == [
        {"containerPort": 443, "protocol": "TCP"},
        {"containerPort": 53, "protocol": "UDP"},
    ]
    assert container["readinessProbe"] == {"httpGet": {"path": "/ready", "port": 11000}}
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "25"]
    assert container["resources"] == {"limits": {"cpu": "2"}, "requests": {"cpu": "1"}}
    assert container["volumeMounts"][0]["mountPath"] == "/etc/envoy"
    for key in ("nodeSelector", "tolerations", "topologySpreadConstraints"):
        assert key not in pod


def test_gateway_pods_are_hardened() -> None:
    """Pod Security "restricted", no API credentials, nothing writable, no capabilities."""
    pod = deployment(es(ports=[{"port": 8443}]), DEFAULT)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert "serviceAccountName" not in pod
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 101,
        "runAsGroup": 101,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # Only Kubernetes' own read-only ConfigMap mount: no writable volume at all.
    assert [v["name"] for v in pod["volumes"]] == ["envoy-config"]
    assert all(m["readOnly"] for m in container["volumeMounts"])
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        assert forbidden not in pod


@pytest.mark.parametrize(
    ("ports", "sysctl"),
    [
        pytest.param([{"port": 8443}, {"port": 1024}], None, id="none-privileged"),
        pytest.param([{"port": 8443}, {"port": 443}], "443", id="tcp-443"),
        pytest.param(
            [{"port": 8443}, {"port": 443}, {"port": 53, "protocol": "UDP"}], "53", id="lowest"
        ),
        pytest.param([{"port": 1023}], "1023", id="just-below"),
        pytest.param([{"port": 1, "protocol": "UDP"}], "1", id="udp-1"),
    ],
)
def test_privileged_ports_are_opened_by_sysctl_not_capability(
    ports: list[dict[str, Any]], sysctl: str | None
) -> None:
    """A non-root Envoy binds ports below 1024 because the pod's network namespace starts the
    unprivileged range at the lowest declared port, never because it holds a capability."""
    pod = deployment(es(ports=ports), DEFAULT)["spec"]["template"]["spec"]
    security = pod["securityContext"]
    if sysctl is None:
        assert "sysctls" not in security
    else:
        assert security["sysctls"] == [
            {"name": "net.ipv4.ip_unprivileged_port_start", "value": sysctl}
        ]
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The admin port (from 11000) is above any value we set.
    assert int(pod["containers"][0]["readinessProbe"]["httpGet"]["port"]) >= 1024


def test_hardening_is_not_shared_between_objects() -> None:
    """Builders return fresh dicts: changing one rendered pod never changes the next."""
    first = deployment(es(), DEFAULT)["spec"]["template"]["spec"]
    first["containers"][0]["securityContext"]["capabilities"]["drop"].append("X")
    second = deployment(es(), DEFAULT)["spec"]["template"]["spec"]
    assert second["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


SCHEDULING = [
    pytest.param(
        Settings(node_selector_key="role", node_selector_value="egress-pods"),
        "nodeSelector",
        {"role": "egress-pods"},
        id="node-selector",
    ),
    pytest.param(
        Settings(toleration_key="egress-pods", toleration_value="true"),
        "tolerations",
        [{"key": "egress-pods", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
        id="toleration",
    ),
    pytest.param(
        Settings(
            topology_spread=(
                TopologySpread(1, "topology.kubernetes.io/zone"),
                TopologySpread(2, "kubernetes.io/hostname", "DoNotSchedule"),
            )
        ),
        "topologySpreadConstraints",
        [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {
                    "matchLabels": {"app": "egress-gateway", "egress.monzo.com/gateway": "google"}
                },
            },
            {
                "maxSkew": 2,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {
                    "matchLabels": {"app": "egress-gateway", "egress.monzo.com/gateway": "google"}
                },
            },
        ],
        id="topology-spread",
    ),
]


@pytest.mark.parametrize(("settings", "key", "expected"), SCHEDULING)
def test_scheduling_settings_reach_the_pod(settings: Settings, key: str, expected: Any) -> None:
    assert deployment(es(), settings)["spec"]["template"]["spec"][key] == expected


def test_hpa() -> None:
    hpa = horizontal_pod_autoscaler(
        es(minReplicas=5, maxReplicas=10, targetCPUUtilizationPercentage=30), DEFAULT
    )
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "google"},
        "minReplicas": 5,
        "maxReplicas": 10,
        "metrics": [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 30},
                },
            }
        ],
    }


@pytest.mark.parametrize("state", list(HijackState))
def test_service_carries_the_hijack_state(state: HijackState) -> None:
    svc = service(es(ports=[{"port": 443}, {"port": 53, "protocol": "UDP"}]), DEFAULT, state)
    assert svc["metadata"]["labels"]["egress.monzo.com/hijack-dns"] == state.value
    assert svc["spec"] == {
        "type": "ClusterIP",
        "selector": {"egress.monzo.com/gateway": "google"},
        "ports": [
            {"name": "google-tcp-443", "port": 443, "protocol": "TCP", "targetPort": 443},
            {"name": "google-udp-53", "port": 53, "protocol": "UDP", "targetPort": 53},
        ],
    }


TOPOLOGY = [
    pytest.param(False, None, None, id="disabled"),
    pytest.param(False, "None", None, id="disabled-spec-ignored"),
    pytest.param(True, None, "Auto", id="enabled-default"),
    pytest.param(True, "None", "None", id="enabled-per-service-override"),
]


@pytest.mark.parametrize(("enabled", "per_service", "expected"), TOPOLOGY)
def test_service_topology_mode(
    enabled: bool, per_service: str | None, expected: str | None
) -> None:
    extra = {"serviceTopologyMode": per_service} if per_service else {}
    svc = service(es(**extra), Settings(service_topology_mode=enabled), HijackState.FALSE)
    assert svc["metadata"]["annotations"].get("service.kubernetes.io/topology-mode") == expected


def test_network_policy_admits_both_grant_labels_on_spec_ports_only() -> None:
    policy = network_policy(es(ports=[{"port": 443}, {"port": 53, "protocol": "UDP"}]), DEFAULT)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"egress.monzo.com/gateway": "google"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"egress.monzo.com/allowed-google": "true"}},
        },
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"egress.monzo.com/allowed-gateway": "google"}},
        },
    ]
    assert rule["ports"] == [{"port": 443, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]


def test_settings_namespace_is_used() -> None:
    for obj in render(es(), Settings(gateway_namespace="egress"), HijackState.FALSE):
        assert obj["metadata"]["namespace"] == "egress"


def test_config_hash_changes_exactly_when_envoy_yaml_changes() -> None:
    def hash_of(svc: ExternalService) -> str:
        annotations = deployment(svc, DEFAULT)["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["egress.monzo.com/config-hash"])

    base = hash_of(es())
    # Changes outside envoy.yaml keep the hash (no needless pod roll) ...
    assert hash_of(es(minReplicas=1, hijackDns=True, resources={"limits": {"cpu": "1"}})) == base
    # ... and every change to envoy.yaml moves it.
    assert hash_of(es(ports=[{"port": 8443}])) != base
    assert hash_of(es(dnsName="www.google.com")) != base
    assert hash_of(es(envoyClusterMaxConnections=10)) != base
    assert hash_of(es(envoyJsonClusterAccessLogs=True)) != base
