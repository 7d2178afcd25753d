"""access.policy: Kubernetes NetworkPolicy semantics for egress and ingress, case by case.

Each case is one rule of the API's documented behaviour (networking.k8s.io/v1), written as the
smallest policy that shows it, with the expected verdict for a connection.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from access.policy import (
    ContainerPort,
    Direction,
    Endpoint,
    Labels,
    PolicyError,
    PolicyIndex,
    parse_network_policy,
    parse_selector,
)


def pod(
    namespace: str,
    labels: dict[str, str] | None = None,
    ip: str | None = "10.244.0.10",
    ns_labels: dict[str, str] | None = None,
    ports: tuple[ContainerPort, ...] = (),
    host_network: bool = False,
) -> Endpoint:
    return Endpoint(
        namespace=namespace,
        labels=Labels(labels or {}),
        namespace_labels=Labels({"kubernetes.io/metadata.name": namespace, **(ns_labels or {})}),
        ip=ipaddress.ip_address(ip) if ip else None,
        ports=ports,
        host_network=host_network,
    )


def outside(ip: str = "192.0.2.1") -> Endpoint:
    return Endpoint.external(ipaddress.ip_address(ip))


def policy(namespace: str, name: str = "p", **spec: Any) -> dict[str, Any]:
    spec.setdefault("podSelector", {})
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


def index(*policies: dict[str, Any]) -> PolicyIndex:
    return PolicyIndex(parse_network_policy(p) for p in policies)


CLIENT = pod("app", {"role": "web"}, "10.244.0.5")
SERVER = pod("srv", {"app": "api"}, "10.244.1.7", ports=(ContainerPort(8443, "TCP", "https"),))


# -- isolation and defaults ---------------------------------------------------------------------


def test_no_policy_selecting_a_pod_allows_everything_both_ways() -> None:
    idx = index(policy("other", podSelector={}, policyTypes=["Ingress", "Egress"]))
    eg, ing = idx.connection(CLIENT, SERVER, 443, "TCP")
    assert eg.allowed and not eg.isolated
    assert ing.allowed and not ing.isolated
    assert idx.egress(CLIENT, outside(), 443, "UDP").allowed


def test_policy_types_default_to_ingress_and_add_egress_only_with_egress_rules() -> None:
    only_ingress = parse_network_policy(policy("app"))
    assert only_ingress.types == {Direction.INGRESS}
    empty_egress = parse_network_policy(policy("app", egress=[]))
    assert empty_egress.types == {Direction.INGRESS}
    with_egress = parse_network_policy(policy("app", egress=[{}]))
    assert with_egress.types == {Direction.INGRESS, Direction.EGRESS}
    # A policy with no rules at all isolates ingress: it denies every incoming connection.
    assert not index(policy("srv")).ingress(SERVER, CLIENT, 8443, "TCP").allowed
    # ...but leaves egress alone.
    assert index(policy("app")).egress(CLIENT, SERVER, 8443, "TCP").allowed


def test_explicit_egress_type_without_rules_denies_all_egress() -> None:
    idx = index(policy("app", name="deny", policyTypes=["Egress"]))
    verdict = idx.egress(CLIENT, SERVER, 8443, "TCP")
    assert not verdict.allowed and verdict.policies == ("deny",)
    assert not idx.egress(CLIENT, outside(), 443, "TCP").allowed
    # Ingress into the client is untouched by an Egress-only policy.
    assert idx.ingress(CLIENT, SERVER, 80, "TCP").allowed


def test_policies_are_a_union_and_any_rule_allows() -> None:
    deny = policy("app", name="deny", policyTypes=["Egress"])
    allow_srv = policy(
        "app",
        name="to-srv",
        policyTypes=["Egress"],
        egress=[
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "srv"}}}]}
        ],
    )
    verdict = index(deny, allow_srv).egress(CLIENT, SERVER, 8443, "TCP")
    assert verdict.allowed and verdict.policies == ("deny", "to-srv")
    assert verdict.allowed_by == "to-srv"
    assert not index(deny, allow_srv).egress(CLIENT, outside(), 443, "TCP").allowed


def test_a_policy_only_applies_to_pods_of_its_own_namespace_it_selects() -> None:
    deny_web = policy("app", podSelector={"matchLabels": {"role": "web"}}, policyTypes=["Egress"])
    assert not index(deny_web).egress(CLIENT, SERVER, 1, "TCP").allowed
    other = pod("app", {"role": "worker"})
    assert index(deny_web).egress(other, SERVER, 1, "TCP").allowed
    elsewhere = pod("other", {"role": "web"})
    assert index(deny_web).egress(elsewhere, SERVER, 1, "TCP").allowed


def test_empty_rule_matches_every_peer_and_port() -> None:
    allow_all = policy("app", policyTypes=["Egress"], egress=[{}])
    idx = index(allow_all)
    assert idx.egress(CLIENT, SERVER, 9, "UDP").allowed
    assert idx.egress(CLIENT, outside(), 443, "TCP").allowed


def test_a_connection_needs_egress_and_ingress() -> None:
    deny_in = policy("srv", podSelector={"matchLabels": {"app": "api"}}, policyTypes=["Ingress"])
    eg, ing = index(deny_in).connection(CLIENT, SERVER, 8443, "TCP")
    assert eg.allowed and not ing.allowed


def test_host_network_pods_are_never_selected_and_never_matched_by_selectors() -> None:
    host = pod("app", {"role": "web"}, "172.18.0.2", host_network=True)
    deny = policy("app", policyTypes=["Egress"])
    assert index(deny).egress(host, SERVER, 8443, "TCP").allowed
    from_web = policy(
        "srv",
        ingress=[{"from": [{"namespaceSelector": {}, "podSelector": {}}]}],
    )
    assert not index(from_web).ingress(SERVER, host, 8443, "TCP").allowed
    by_ip = policy("srv", ingress=[{"from": [{"ipBlock": {"cidr": "172.18.0.0/16"}}]}])
    assert index(by_ip).ingress(SERVER, host, 8443, "TCP").allowed


# -- peers ----------------------------------------------------------------------------------------


def _egress_to(*peers: dict[str, Any]) -> PolicyIndex:
    return index(policy("app", policyTypes=["Egress"], egress=[{"to": list(peers)}]))


def test_pod_selector_alone_means_the_policy_namespace() -> None:
    idx = _egress_to({"podSelector": {"matchLabels": {"app": "api"}}})
    assert not idx.egress(CLIENT, SERVER, 8443, "TCP").allowed  # api pods, but in srv
    same_ns = pod("app", {"app": "api"})
    assert idx.egress(CLIENT, same_ns, 8443, "TCP").allowed


def test_namespace_selector_alone_means_every_pod_there() -> None:
    idx = _egress_to({"namespaceSelector": {"matchLabels": {"team": "platform"}}})
    platform = pod("srv", {"anything": "x"}, ns_labels={"team": "platform"})
    assert idx.egress(CLIENT, platform, 1, "TCP").allowed
    assert not idx.egress(CLIENT, SERVER, 1, "TCP").allowed  # srv lacks the label


def test_both_selectors_in_one_peer_are_anded_and_in_two_peers_ored() -> None:
    anded = _egress_to(
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "srv"}},
            "podSelector": {"matchLabels": {"app": "other"}},
        }
    )
    assert not anded.egress(CLIENT, SERVER, 1, "TCP").allowed
    ored = _egress_to(
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "srv"}}},
        {"podSelector": {"matchLabels": {"app": "other"}}},
    )
    assert ored.egress(CLIENT, SERVER, 1, "TCP").allowed


def test_empty_selectors_select_everything_but_never_outside_addresses() -> None:
    idx = _egress_to({"namespaceSelector": {}})
    assert idx.egress(CLIENT, SERVER, 1, "TCP").allowed
    assert not idx.egress(CLIENT, outside(), 1, "TCP").allowed
    same = _egress_to({"podSelector": {}})
    assert same.egress(CLIENT, pod("app"), 1, "TCP").allowed
    assert not same.egress(CLIENT, SERVER, 1, "TCP").allowed


def test_ip_block_with_except_and_pod_ips() -> None:
    idx = _egress_to({"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.0.2.0/28"]}})
    assert idx.egress(CLIENT, outside("203.0.113.10"), 443, "TCP").allowed
    assert not idx.egress(CLIENT, outside("192.0.2.1"), 443, "TCP").allowed
    assert idx.egress(CLIENT, outside("192.0.2.17"), 443, "TCP").allowed
    assert not idx.egress(CLIENT, SERVER, 8443, "TCP").allowed  # 10.244.1.7 is excepted
    internal = _egress_to({"ipBlock": {"cidr": "10.0.0.0/8"}})
    assert internal.egress(CLIENT, SERVER, 8443, "TCP").allowed  # pod IPs match ipBlocks
    assert not internal.egress(CLIENT, pod("srv", ip=None), 8443, "TCP").allowed
    assert not internal.egress(CLIENT, outside("2001:db8::1"), 443, "TCP").allowed


def test_ipv6_blocks() -> None:
    idx = _egress_to({"ipBlock": {"cidr": "::/0", "except": ["fd00::/8"]}})
    assert idx.egress(CLIENT, outside("2001:db8::1"), 443, "TCP").allowed
    assert not idx.egress(CLIENT, outside("fd00::1"), 443, "TCP").allowed
    assert not idx.egress(CLIENT, outside("192.0.2.1"), 443, "TCP").allowed


@pytest.mark.parametrize(
    ("expression", "labels", "expected"),
    [
        ({"key": "tier", "operator": "In", "values": ["a", "b"]}, {"tier": "b"}, True),
        ({"key": "tier", "operator": "In", "values": ["a", "b"]}, {"tier": "c"}, False),
        ({"key": "tier", "operator": "In", "values": ["a"]}, {}, False),
        ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {"tier": "b"}, True),
        ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {"tier": "a"}, False),
        ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {}, True),
        ({"key": "tier", "operator": "Exists"}, {"tier": ""}, True),
        ({"key": "tier", "operator": "Exists"}, {}, False),
        ({"key": "tier", "operator": "DoesNotExist"}, {}, True),
        ({"key": "tier", "operator": "DoesNotExist"}, {"tier": "a"}, False),
    ],
)
def test_match_expressions(
    expression: dict[str, Any], labels: dict[str, str], expected: bool
) -> None:
    selector = parse_selector({"matchExpressions": [expression]}, "s")
    assert selector.matches(labels) is expected


def test_match_labels_and_expressions_are_anded() -> None:
    selector = parse_selector(
        {
            "matchLabels": {"app": "api"},
            "matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}],
        },
        "s",
    )
    assert selector.matches({"app": "api"})
    assert not selector.matches({"app": "api", "canary": "1"})
    assert not selector.matches({"canary": "1"})
    assert parse_selector({}, "s").matches({"x": "y"})


# -- ports ----------------------------------------------------------------------------------------


def _egress_ports(*ports: dict[str, Any]) -> PolicyIndex:
    return index(policy("app", policyTypes=["Egress"], egress=[{"ports": list(ports)}]))


def test_port_protocol_defaults_to_tcp_and_a_missing_port_is_every_port() -> None:
    idx = _egress_ports({"port": 443})
    assert idx.egress(CLIENT, SERVER, 443, "TCP").allowed
    assert not idx.egress(CLIENT, SERVER, 443, "UDP").allowed
    assert not idx.egress(CLIENT, SERVER, 444, "TCP").allowed
    udp_all = _egress_ports({"protocol": "UDP"})
    assert udp_all.egress(CLIENT, SERVER, 53, "UDP").allowed
    assert not udp_all.egress(CLIENT, SERVER, 53, "TCP").allowed


def test_end_port_makes_a_range() -> None:
    idx = _egress_ports({"port": 8000, "endPort": 8999})
    assert idx.egress(CLIENT, SERVER, 8000, "TCP").allowed
    assert idx.egress(CLIENT, SERVER, 8999, "TCP").allowed
    assert not idx.egress(CLIENT, SERVER, 9000, "TCP").allowed


def test_named_ports_resolve_on_the_destination_pod() -> None:
    idx = _egress_ports({"port": "https"})
    assert idx.egress(CLIENT, SERVER, 8443, "TCP").allowed
    assert not idx.egress(CLIENT, SERVER, 443, "TCP").allowed
    assert not idx.egress(CLIENT, SERVER, 8443, "UDP").allowed
    # An outside address has no named ports.
    assert not idx.egress(CLIENT, outside(), 8443, "TCP").allowed
    # For ingress, the name resolves on the pod the policy protects.
    ingress = index(policy("srv", ingress=[{"ports": [{"port": "https"}]}]))
    assert ingress.ingress(SERVER, CLIENT, 8443, "TCP").allowed
    assert not ingress.ingress(SERVER, CLIENT, 443, "TCP").allowed


def test_a_rule_needs_both_its_peer_and_its_port() -> None:
    idx = index(
        policy(
            "app",
            policyTypes=["Egress"],
            egress=[
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "srv"}
                            }
                        }
                    ],
                    "ports": [{"port": 8443}],
                },
                {
                    "to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}],
                    "ports": [{"port": 53, "protocol": "UDP"}],
                },
            ],
        )
    )
    assert idx.egress(CLIENT, SERVER, 8443, "TCP").allowed
    assert not idx.egress(CLIENT, SERVER, 53, "UDP").allowed
    assert idx.egress(CLIENT, outside(), 53, "UDP").allowed
    assert not idx.egress(CLIENT, outside(), 8443, "TCP").allowed


def test_some_port_question() -> None:
    assert index().egress_some_port(CLIENT, outside())
    only_named = index(
        policy(
            "app",
            policyTypes=["Egress"],
            egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": "https"}]}],
        )
    )
    assert not only_named.egress_some_port(CLIENT, outside())
    assert only_named.egress_some_port(CLIENT, SERVER)
    numbered = index(policy("app", policyTypes=["Egress"], egress=[{"ports": [{"port": 443}]}]))
    assert numbered.egress_some_port(CLIENT, outside())
    assert not index(policy("app", policyTypes=["Egress"])).egress_some_port(CLIENT, outside())


# -- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}, "operator"),
        (
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
            "at least one value",
        ),
        (
            {
                "podSelector": {
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
                }
            },
            "takes no values",
        ),
        ({"egress": [{"to": [{"ipBlock": {"cidr": "nope"}}]}]}, "not a CIDR"),
        (
            {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
            "excludes",
        ),
        ({"egress": [{"ports": [{"protocol": "ICMP"}]}]}, "TCP, UDP or SCTP"),
        ({"egress": [{"ports": [{"port": "https", "endPort": 9}]}]}, "endPort"),
        ({"egress": [{"ports": [{"port": 10, "endPort": 9}]}]}, "endPort"),
        ({"policyTypes": ["Sideways"]}, "policyTypes"),
    ],
)
def test_malformed_policies_are_refused_naming_the_field(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_network_policy(policy("app", **spec))


def test_a_peer_with_nothing_set_matches_nothing() -> None:
    idx = _egress_to({})
    assert not idx.egress(CLIENT, SERVER, 1, "TCP").allowed


def test_numeric_strings_are_numbers() -> None:
    idx = _egress_ports({"port": "443"})
    assert idx.egress(CLIENT, SERVER, 443, "TCP").allowed


def test_labels_are_immutable_hashable_mappings() -> None:
    a = Labels({"x": "1"})
    assert a == {"x": "1"} and a == Labels([("x", "1")]) and hash(a) == hash(Labels({"x": "1"}))
    assert a.get("y") is None and len(a) == 1 and list(a) == ["x"]
