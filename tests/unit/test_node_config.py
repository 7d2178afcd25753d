"""The dev node's rendered configuration: addresses per slot never overlap, and each file is
valid for the program that reads it and carries the settings the machines need."""

from __future__ import annotations

import ipaddress
import itertools
import json
import tomllib
from pathlib import Path

import pytest
import yaml

from egressctl.devstack import node
from egressctl.devstack.node import AddressPlan, NodePaths

PATHS = NodePaths(Path("/x/node"))


def networks(plan: AddressPlan) -> list[ipaddress.IPv4Network]:
    return [
        ipaddress.IPv4Network(n)
        for n in (plan.pod_cidr, plan.service_cidr, plan.inet_cidr, f"10.255.{plan.slot}.0/29")
    ]


def test_slots_never_overlap() -> None:
    plans = [AddressPlan(s) for s in range(node.MAX_SLOTS)]
    for a, b in itertools.combinations(plans, 2):
        for na, nb in itertools.product(networks(a), networks(b)):
            assert not na.overlaps(nb), (a.slot, b.slot, na, nb)
        assert a.node_netns != b.node_netns and a.host_if != b.host_if


@pytest.mark.parametrize("slot", range(node.MAX_SLOTS))
def test_each_address_lives_in_its_network(slot: int) -> None:
    plan = AddressPlan(slot)
    inside = {
        plan.api_service_ip: plan.service_cidr,
        plan.cluster_dns_ip: plan.service_cidr,
        plan.upstream_ip: plan.inet_cidr,
        plan.upstream_dns_ip: plan.inet_cidr,
    }
    for ip, net in inside.items():
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(net)
    for ip in (plan.host_ip, plan.node_ip, plan.node_inet_ip, plan.inet_ip, plan.upstream_ip):
        assert plan.owns(ip)
    # The machine's own addresses and the internet are never the stack's.
    for ip in ("192.0.2.2", "8.8.8.8", "10.0.0.1", "127.0.0.1"):
        assert not plan.owns(ip)
    assert len(plan.host_if) <= 15, "interface names are at most 15 bytes"


def test_containerd_config_keeps_everything_under_the_node_folder() -> None:
    doc = tomllib.loads(node.containerd_config(PATHS, "/usr/lib/cni", "egress-dev.local/pause:1"))
    assert doc["root"].startswith("/x/node/") and doc["state"].startswith("/x/node/")
    assert doc["grpc"]["address"] == "/x/node/containerd.sock"
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["netns_mounts_under_state_dir"] is True
    assert cri["sandbox_image"] == "egress-dev.local/pause:1"
    assert cri["cni"]["conf_dir"].startswith("/x/node/")
    assert cri["containerd"]["runtimes"]["runc"]["options"]["Root"] == "/x/node/runc"


def test_cni_bridge_does_not_masquerade() -> None:
    doc = json.loads(node.cni_conflist(AddressPlan(1), PATHS))
    bridge = doc["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["ipMasq"] is False
    assert bridge["ipam"]["ranges"][0][0]["subnet"] == "10.245.0.0/24"
    assert bridge["ipam"]["dataDir"].startswith("/x/node/")


def test_kubelet_config_points_at_the_stack_only() -> None:
    plan = AddressPlan(0)
    doc = yaml.safe_load(node.kubelet_config(plan, PATHS, Path("/x/pki"), 5))
    assert doc["clusterDNS"] == ["10.96.0.10"]
    assert doc["resolvConf"] == "/x/node/resolv.conf"
    assert doc["authentication"]["anonymous"]["enabled"] is False
    assert doc["authorization"]["mode"] == "Webhook"
    assert doc["cgroupDriver"] == "cgroupfs" and doc["failCgroupV1"] is False
    assert doc["imageGCHighThresholdPercent"] == 100
    assert doc["syncFrequency"] == "5s"
    assert node.resolv_conf(plan) == "nameserver 203.0.113.53\noptions ndots:1\n"


def test_kube_proxy_leaves_the_machines_conntrack_alone() -> None:
    doc = yaml.safe_load(node.kube_proxy_config(AddressPlan(2), Path("/x/kc")))
    assert doc["mode"] == "iptables" and doc["clusterCIDR"] == "10.246.0.0/24"
    assert doc["conntrack"]["maxPerCore"] == 0


def test_upstream_hosts_adds_the_test_service_name() -> None:
    out = node.upstream_hosts(AddressPlan(1), "192.0.2.10 api.example.com\n")
    assert out.splitlines() == ["192.0.2.10 api.example.com", "203.0.113.74    echo.offline.test"]
