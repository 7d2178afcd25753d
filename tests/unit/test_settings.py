"""Settings from the environment: defaults, the original operator's variables, and bad values."""

from __future__ import annotations

import pytest

from reconcile.settings import DEFAULT_ENVOY_IMAGE, Settings, SettingsError, TopologySpread


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
        TopologySpread(1, "topology.kubernetes.io/zone"),
        TopologySpread(2, "example.com/rack"),
    )
    assert settings.service_topology_mode and settings.enable_pdb
    assert settings.gateway_namespace == "egress"
    assert settings.cluster_domain == "corp.internal"


def test_the_coredns_nudge_is_on_unless_switched_off() -> None:
    assert Settings.from_env({}).nudge_coredns_pods
    assert Settings.from_env({"NUDGE_COREDNS_PODS": ""}).nudge_coredns_pods
    off = Settings.from_env({"NUDGE_COREDNS_PODS": "false", "COREDNS_SERVICE_NAME": "dns"})
    assert not off.nudge_coredns_pods and off.coredns_service_name == "dns"


def test_the_delete_grace_covers_dns_with_and_without_the_nudge() -> None:
    assert Settings.from_env({}).delete_grace_s == 60
    assert Settings.from_env({"NUDGE_COREDNS_PODS": "false"}).delete_grace_s == 180
    explicit = {"NUDGE_COREDNS_PODS": "false", "DELETE_GRACE_SECONDS": "30"}
    assert Settings.from_env(explicit).delete_grace_s == 30


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
    ("NUDGE_COREDNS_PODS", {"NUDGE_COREDNS_PODS": "sometimes"}),
    ("COREDNS_SERVICE_NAME", {"COREDNS_SERVICE_NAME": "Kube DNS"}),
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
