"""Settings from the environment: defaults, the original operator's variables, and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.settings import (
    DEFAULT_ENVOY_IMAGE,
    DEFAULT_GATEWAY_NAMESPACE,
    Settings,
    SettingsError,
    TopologySpread,
)
from core.spec import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_REPLICAS,
    DEFAULT_REQUESTS,
    Ceilings,
    quantity_value,
)


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.envoy_image == DEFAULT_ENVOY_IMAGE
    assert settings.gateway_namespace == "egress-operator-system"
    assert settings.cluster_domain == "cluster.local"
    assert not settings.enable_pdb and not settings.service_topology_mode
    assert settings.topology_spread == ()


def test_original_operator_environment() -> None:
    settings = Settings.from_env(
        {
            "ENVOY_IMAGE": "envoyproxy/envoy-alpine:v1.16.5",
            "NODE_SELECTOR_KEY": "role",
            "NODE_SELECTOR_VALUE": "egress-pods",
            "TAINT_TOLERATION_KEY": "egress-pods",
            "TAINT_TOLERATION_VALUE": "true",
            "ENABLE_POD_TOPOLOGY_SPREAD": "true",
            "POD_TOPOLOGY_ZONE_MAX_SKEW": "1",
            "POD_TOPOLOGY_HOSTNAME_MAX_SKEW": "2",
            "POD_TOPOLOGY_HOSTNAME_MAX_SKEW_KEY": "example.com/rack",
            "POD_TOPOLOGY_HOSTNAME_WHEN_UNSATISFIABLE": "DoNotSchedule",
            "ENABLE_SERVICE_TOPOLOGY_MODE": "true",
            "ENABLE_PDB": "true",
            "GATEWAY_NAMESPACE": "egress",
            "CLUSTER_DOMAIN": "corp.internal.",
        }
    )
    assert settings.envoy_image == "envoyproxy/envoy-alpine:v1.16.5"
    assert (settings.node_selector_key, settings.node_selector_value) == ("role", "egress-pods")
    assert (settings.toleration_key, settings.toleration_value) == ("egress-pods", "true")
    assert settings.topology_spread == (
        TopologySpread(1, "topology.kubernetes.io/zone", "ScheduleAnyway"),
        TopologySpread(2, "example.com/rack", "DoNotSchedule"),
    )
    assert settings.service_topology_mode and settings.enable_pdb
    assert settings.gateway_namespace == "egress"
    assert settings.cluster_domain == "corp.internal"


def test_the_coredns_nudge_is_on_unless_switched_off() -> None:
    assert Settings.from_env({}).nudge_coredns_pods
    assert Settings.from_env({"NUDGE_COREDNS_PODS": ""}).nudge_coredns_pods
    off = Settings.from_env({"NUDGE_COREDNS_PODS": "false", "COREDNS_SERVICE_NAME": "dns"})
    assert not off.nudge_coredns_pods and off.coredns_service_name == "dns"


def test_cluster_dns_is_coredns_unless_the_cluster_has_none_we_may_configure() -> None:
    assert Settings.from_env({}).cluster_dns == "coredns"
    assert Settings.from_env({}).hijack_available
    none = Settings.from_env({"CLUSTER_DNS": "none", "MANAGE_COREDNS_IMPORT": "false"})
    assert none.cluster_dns == "none" and not none.hijack_available
    assert Settings.from_env({"CLUSTER_DNS": " coredns "}).hijack_available


def test_dns_rules_spread_over_eight_configmaps_named_after_the_first() -> None:
    assert Settings.from_env({}).dns_configmap_names == (
        "egress-gateway-dns",
        *(f"egress-gateway-dns-{i}" for i in range(1, 8)),
    )
    one = Settings.from_env({"DNS_CONFIGMAP_SHARDS": "1", "DNS_CONFIGMAP_NAME": "rules"})
    assert one.dns_configmap_names == ("rules",)


def test_the_sweep_audits_access_only_when_asked() -> None:
    assert not Settings.from_env({}).sweep_access_audit
    assert Settings.from_env({"SWEEP_ACCESS_AUDIT": "true"}).sweep_access_audit


def test_the_delete_grace_covers_dns_with_and_without_the_nudge() -> None:
    assert Settings.from_env({}).delete_grace_s == 120
    assert Settings.from_env({"NUDGE_COREDNS_PODS": "false"}).delete_grace_s == 180
    explicit = {"NUDGE_COREDNS_PODS": "false", "DELETE_GRACE_SECONDS": "30"}
    assert Settings.from_env(explicit).delete_grace_s == 30


def test_gateway_ceilings_default_to_generous_values_a_platform_team_raises() -> None:
    assert Settings.from_env({}).ceilings == Ceilings(max_replicas=100, cpu="8", memory="16Gi")
    raised = Settings.from_env(
        {"GATEWAY_MAX_REPLICAS": "500", "GATEWAY_MAX_CPU": "32", "GATEWAY_MAX_MEMORY": "128Gi"}
    )
    assert raised.ceilings == Ceilings(max_replicas=500, cpu="32", memory="128Gi")
    # Never below what an ExternalService gets by default (maxReplicas 12, limits 2 and 1Gi).
    lowest = {"GATEWAY_MAX_REPLICAS": "12", "GATEWAY_MAX_CPU": "2000m", "GATEWAY_MAX_MEMORY": "1Gi"}
    assert Settings.from_env(lowest).ceilings == Ceilings(12, "2000m", "1Gi")


@pytest.mark.parametrize(
    ("zone", "hostname"),
    [("", ""), ("DoNotSchedule", ""), ("", "DoNotSchedule"), ("ScheduleAnyway", "DoNotSchedule")],
)
def test_when_unsatisfiable_defaults_to_schedule_anyway_and_honours_do_not_schedule(
    zone: str, hostname: str
) -> None:
    env = {
        "ENABLE_POD_TOPOLOGY_SPREAD": "true",
        "POD_TOPOLOGY_ZONE_MAX_SKEW": "1",
        "POD_TOPOLOGY_HOSTNAME_MAX_SKEW": "1",
        "POD_TOPOLOGY_ZONE_WHEN_UNSATISFIABLE": zone,
        "POD_TOPOLOGY_HOSTNAME_WHEN_UNSATISFIABLE": hostname,
    }
    spread = Settings.from_env(env).topology_spread
    assert [t.when_unsatisfiable for t in spread] == [
        zone or "ScheduleAnyway",
        hostname or "ScheduleAnyway",
    ]


def test_skews_without_the_switch_add_no_constraint() -> None:
    assert Settings.from_env({"POD_TOPOLOGY_ZONE_MAX_SKEW": "1"}).topology_spread == ()


BAD = [
    ("ENABLE_PDB", {"ENABLE_PDB": "maybe"}),
    ("ENVOY_IMAGE", {"ENVOY_IMAGE": "envoy proxy"}),
    ("GATEWAY_NAMESPACE", {"GATEWAY_NAMESPACE": "Egress_System"}),
    ("CLUSTER_DOMAIN", {"CLUSTER_DOMAIN": "bad domain"}),
    ("TAINT_TOLERATION_KEY", {"TAINT_TOLERATION_KEY": "bad key!"}),
    ("TAINT_TOLERATION_VALUE", {"TAINT_TOLERATION_VALUE": "true"}),
    ("NODE_SELECTOR_VALUE", {"NODE_SELECTOR_KEY": "role", "NODE_SELECTOR_VALUE": "no spaces"}),
    ("NODE_SELECTOR_VALUE", {"NODE_SELECTOR_VALUE": "egress"}),
    (
        "POD_TOPOLOGY_ZONE_MAX_SKEW",
        {"ENABLE_POD_TOPOLOGY_SPREAD": "true", "POD_TOPOLOGY_ZONE_MAX_SKEW": "0"},
    ),
    ("POD_TOPOLOGY_HOSTNAME_MAX_SKEW", {"POD_TOPOLOGY_HOSTNAME_MAX_SKEW": "one"}),
    ("ENABLE_POD_TOPOLOGY_SPREAD", {"ENABLE_POD_TOPOLOGY_SPREAD": "true"}),
    ("ENABLE_SERVICE_TOPOLOGY_MODE", {"ENABLE_SERVICE_TOPOLOGY_MODE": "auto"}),
    ("POD_TOPOLOGY_ZONE_MAX_SKEW_KEY", {"POD_TOPOLOGY_ZONE_MAX_SKEW_KEY": "/zone"}),
    (
        "POD_TOPOLOGY_ZONE_WHEN_UNSATISFIABLE",
        {"POD_TOPOLOGY_ZONE_WHEN_UNSATISFIABLE": "donotschedule"},
    ),
    (
        "POD_TOPOLOGY_HOSTNAME_WHEN_UNSATISFIABLE",
        {"POD_TOPOLOGY_HOSTNAME_WHEN_UNSATISFIABLE": "Never"},
    ),
    ("NUDGE_COREDNS_PODS", {"NUDGE_COREDNS_PODS": "sometimes"}),
    ("CLUSTER_DNS", {"CLUSTER_DNS": "kube-dns"}),
    ("DNS_CONFIGMAP_SHARDS", {"DNS_CONFIGMAP_SHARDS": "0"}),
    ("DNS_CONFIGMAP_SHARDS", {"DNS_CONFIGMAP_SHARDS": "33"}),
    ("CLUSTER_DNS", {"CLUSTER_DNS": "CoreDNS"}),
    ("MANAGE_COREDNS_IMPORT", {"CLUSTER_DNS": "none", "MANAGE_COREDNS_IMPORT": "true"}),
    ("SWEEP_ACCESS_AUDIT", {"SWEEP_ACCESS_AUDIT": "yes please"}),
    ("COREDNS_SERVICE_NAME", {"COREDNS_SERVICE_NAME": "Kube DNS"}),
    ("GATEWAY_MAX_REPLICAS", {"GATEWAY_MAX_REPLICAS": "0"}),
    ("GATEWAY_MAX_REPLICAS", {"GATEWAY_MAX_REPLICAS": "11"}),
    ("GATEWAY_MAX_REPLICAS", {"GATEWAY_MAX_REPLICAS": "2147483648"}),
    ("GATEWAY_MAX_REPLICAS", {"GATEWAY_MAX_REPLICAS": "lots"}),
    ("GATEWAY_MAX_CPU", {"GATEWAY_MAX_CPU": "NaN"}),
    ("GATEWAY_MAX_CPU", {"GATEWAY_MAX_CPU": "1"}),
    ("GATEWAY_MAX_CPU", {"GATEWAY_MAX_CPU": "-8"}),
    ("GATEWAY_MAX_MEMORY", {"GATEWAY_MAX_MEMORY": "512Mi"}),
    ("GATEWAY_MAX_MEMORY", {"GATEWAY_MAX_MEMORY": "16 GB"}),
]


@pytest.mark.parametrize(("variable", "env"), BAD, ids=[f"{v}-{i}" for i, (v, _) in enumerate(BAD)])
def test_bad_setting_names_the_variable(variable: str, env: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert f"{variable}:" in str(info.value)


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ENABLE_PDB": "x", "GATEWAY_NAMESPACE": "X"})
    assert "ENABLE_PDB:" in str(info.value) and "GATEWAY_NAMESPACE:" in str(info.value)


def test_the_gateway_namespace_limits_are_sized_to_the_defaults() -> None:
    """infra/namespace/limits.yaml backs the ceilings up: the same numbers, per pod, and a
    quota for 100 gateways at their default maxReplicas and resources."""
    path = Path(__file__).resolve().parents[2] / "infra" / "namespace" / "limits.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}
    assert {d["metadata"]["namespace"] for d in docs.values()} == {DEFAULT_GATEWAY_NAMESPACE}
    ceilings = Settings().ceilings
    most = {"cpu": ceilings.cpu, "memory": ceilings.memory}
    container, pod = docs["LimitRange"]["spec"]["limits"]
    assert (container["type"], pod["type"]) == ("Container", "Pod")
    assert container["max"] == most and pod["max"] == most
    assert container["default"] == dict(DEFAULT_LIMITS)
    assert container["defaultRequest"] == dict(DEFAULT_REQUESTS)

    hard = docs["ResourceQuota"]["spec"]["hard"]
    pods = 100 * DEFAULT_MAX_REPLICAS
    assert int(hard["pods"]) == pods
    for kind, defaults in (("requests", DEFAULT_REQUESTS), ("limits", DEFAULT_LIMITS)):
        for resource, amount in defaults:
            assert quantity_value(hard[f"{kind}.{resource}"]) == pods * quantity_value(amount)
    assert hard["services.loadbalancers"] == hard["services.nodeports"] == "0"
