"""access.model: the audit's rows and findings for a small cluster with every case in it.

The gateways' NetworkPolicies and Services are the reconciler's own renderings
(gateway.render), so the audit is checked against what the product actually deploys.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from access.model import (
    FORM_GATEWAY,
    FORM_PER_GATEWAY,
    Audit,
    Row,
    Snapshot,
    audit,
    parse_pod,
    snapshot_from_kube,
)
from access.policy import Endpoint, Labels, PolicyIndex, parse_network_policy
from core import constants as c
from core.hijack import HijackState
from core.kube import JOB, REPLICA_SET
from core.settings import Settings
from core.spec import parse_external_service
from gateway.render import network_policy, service

GW_NS = "egress-operator-system"
SETTINGS = Settings()
DEFAULT_DENY_EXAMPLE = {  # infra/examples/default-deny-egress, as the README recommends
    "podSelector": {},
    "policyTypes": ["Egress"],
    "egress": [
        {
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                    },
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                }
            ],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        },
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": GW_NS}},
                    "podSelector": {"matchLabels": {"app": "egress-gateway"}},
                }
            ]
        },
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
    ],
}
# A default-deny that forgets the gateway namespace: the misconfiguration the README warns of.
DNS_ONLY = {
    "podSelector": {},
    "policyTypes": ["Egress"],
    "egress": [
        {
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                    }
                }
            ],
            "ports": [{"protocol": "UDP", "port": 53}],
        }
    ],
}


def es(name: str, *ports: tuple[int, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name},
        "spec": {
            "dnsName": f"{name}.example.com",
            "ports": [{"port": p, "protocol": proto} for p, proto in ports or [(443, "TCP")]],
            **spec,
        },
    }


def gateway_objects(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    parsed = parse_external_service(obj)
    return network_policy(parsed, SETTINGS), service(parsed, SETTINGS, HijackState.FALSE)


def pod(
    namespace: str,
    name: str,
    labels: dict[str, str] | None = None,
    ip: str | None = None,
    owner: tuple[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": owner[0], "name": owner[1], "uid": "u", "controller": True}
        ]
    status = {"podIP": ip} if ip else {}
    return {"metadata": meta, "spec": {"containers": [{"name": "c"}], **spec}, "status": status}


def gateway_pod(name: str, ip: str, index: int = 0) -> dict[str, Any]:
    obj = pod(GW_NS, f"{name}-{index}", {c.LABEL_APP: c.APP_VALUE, c.LABEL_GATEWAY: name}, ip)
    return obj


def owner(kind: str, namespace: str, name: str, parent: tuple[str, str]) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {
            "namespace": namespace,
            "name": name,
            "ownerReferences": [{"kind": parent[0], "name": parent[1], "controller": True}],
        },
    }


def netpol(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}}


GRANT = {c.grant_label("google"): "true"}


def cluster(**overrides: Any) -> dict[str, Any]:
    """The test cluster as from_objects arguments; see the module docstring of each test."""
    services = [es("google"), es("github", (443, "TCP"), (22, "TCP")), es("unloved"),
                es("echo", (8443, "TCP"), (8053, "UDP"), ipOverride=["203.0.113.10"])]  # fmt: skip
    policies: list[dict[str, Any]] = []
    gw_services: list[dict[str, Any]] = []
    for obj in services:
        pol, svc = gateway_objects(obj)
        policies.append(pol)
        gw_services.append(svc)
    policies += [
        netpol("locked", "dns-only", DNS_ONLY),
        netpol("good", "default-deny-external-egress", DEFAULT_DENY_EXAMPLE),
        netpol("ipblock", "internal", {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}),
        netpol("public", "internet-only", {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]}),
        netpol("provider", "provider-only", {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}, {"to": [{"namespaceSelector": {}}]}]}),
        # Someone opened the google gateway to monitoring, on every port.
        netpol(GW_NS, "allow-monitoring", {
            "podSelector": {"matchLabels": {c.LABEL_GATEWAY: "google"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]}],
        }),
    ]  # fmt: skip
    pods = [
        pod("open", "web-5d8f-a", GRANT, "10.244.0.11", ("ReplicaSet", "web-5d8f")),
        pod("open", "web-5d8f-b", GRANT, "10.244.0.12", ("ReplicaSet", "web-5d8f")),
        pod("locked", "db-0", {c.GRANT_LABEL_GATEWAY: "github"}, "10.244.0.13", ("StatefulSet", "db")),
        pod("good", "report-29-x", {**GRANT, c.grant_label("github"): "true"}, "10.244.0.14", ("Job", "report-29")),
        pod("good", "agent-x", {"app": "agent"}, "10.244.0.15", ("DaemonSet", "agent")),
        pod("good", "debug", {c.grant_label("nope"): "true"}, "10.244.0.16"),
        pod("ipblock", "api-7c-a", {c.grant_label("github"): "true"}, "10.244.0.17", ("ReplicaSet", "api-7c")),
        pod("public", "crawler-0", {c.grant_label("echo"): "true"}, "10.244.0.18", ("StatefulSet", "crawler")),
        pod("provider", "sync-0", {c.grant_label("echo"): "true"}, "10.244.0.19", ("StatefulSet", "sync")),
        pod("monitoring", "prom-0", {"app": "prom"}, "10.244.0.20", ("StatefulSet", "prom")),
        gateway_pod("google", "10.244.0.100"),
        gateway_pod("github", "10.244.0.101"),
        gateway_pod("unloved", "10.244.0.102"),
    ]  # fmt: skip
    owners = [
        owner("ReplicaSet", "open", "web-5d8f", ("Deployment", "web")),
        owner("ReplicaSet", "ipblock", "api-7c", ("Deployment", "api")),
        owner("Job", "good", "report-29", ("CronJob", "report")),
    ]
    namespaces = [ns(n) for n in ("open", "locked", "good", "ipblock", "public", "provider", GW_NS)]
    namespaces.append(ns("monitoring", team="monitoring"))
    args: dict[str, Any] = {
        "pods": pods,
        "namespaces": namespaces,
        "policies": policies,
        "external_services": services,
        "services": gw_services,
        "owners": owners,
    }
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def result() -> Audit:
    return audit(Snapshot.from_objects(**cluster()))


def _key(r: Row) -> tuple[str, str, str, str, int, str]:
    return (r.namespace, r.kind, r.name, r.external_service, r.port, r.protocol)


def _facts(r: Row) -> tuple[bool, str, bool, bool, bool]:
    return (r.granted, r.grant_form, r.policy_allows, r.reachable, r.direct)


def test_rows_say_who_is_granted_and_who_can_reach(result: Audit) -> None:
    rows = {_key(r): _facts(r) for r in result.rows}
    P, G = FORM_PER_GATEWAY, FORM_GATEWAY
    assert rows == {
        # No egress policy: reaches the gateway, and the internet directly (bypassable).
        ("open", "Deployment", "web", "google", 443, "TCP"): (True, P, True, True, True),
        # Default-deny that forgets the gateway namespace: the grant is silently broken.
        ("locked", "StatefulSet", "db", "github", 443, "TCP"): (True, G, False, False, False),
        ("locked", "StatefulSet", "db", "github", 22, "TCP"): (True, G, False, False, False),
        # The README's default-deny: through the gateways only.
        ("good", "CronJob", "report", "google", 443, "TCP"): (True, P, True, True, False),
        ("good", "CronJob", "report", "github", 443, "TCP"): (True, P, True, True, False),
        ("good", "CronJob", "report", "github", 22, "TCP"): (True, P, True, True, False),
        # Egress only to 10.0.0.0/8: the gateway pods' IPs are in it.
        ("ipblock", "Deployment", "api", "github", 443, "TCP"): (True, P, True, True, False),
        ("ipblock", "Deployment", "api", "github", 22, "TCP"): (True, P, True, True, False),
        # Egress only to the internet: the gateway is out of reach, the destination is not.
        ("public", "StatefulSet", "crawler", "echo", 8443, "TCP"): (True, P, False, False, True),
        ("public", "StatefulSet", "crawler", "echo", 8053, "UDP"): (True, P, False, False, True),
        # Egress to in-cluster pods and the provider's range, which holds echo's ipOverride.
        ("provider", "StatefulSet", "sync", "echo", 8443, "TCP"): (True, P, True, True, True),
        ("provider", "StatefulSet", "sync", "echo", 8053, "UDP"): (True, P, True, True, True),
        # No grant, but another policy in the gateway namespace admits monitoring.
        ("monitoring", "StatefulSet", "prom", "google", 443, "TCP"): (False, "", True, True, True),
    }
    web = next(r for r in result.rows if r.name == "web")
    assert (web.pods, web.pods_reachable) == (2, 2)
    crawler = next(r for r in result.rows if r.name == "crawler")
    assert not crawler.egress_allows and crawler.ingress_allows


def test_workloads_are_grouped_by_controller(result: Audit) -> None:
    keys = {(w.namespace, w.kind, w.name): w.pods for w in result.workloads}
    assert keys == {
        ("open", "Deployment", "web"): 2,
        ("locked", "StatefulSet", "db"): 1,
        ("good", "CronJob", "report"): 1,
        ("good", "DaemonSet", "agent"): 1,
        ("good", "Pod", "debug"): 1,
        ("ipblock", "Deployment", "api"): 1,
        ("public", "StatefulSet", "crawler"): 1,
        ("provider", "StatefulSet", "sync"): 1,
        ("monitoring", "StatefulSet", "prom"): 1,
    }


def test_workload_facts_direct_internet_and_policies(result: Audit) -> None:
    facts = {w.name: (w.direct_egress, w.egress_policies, w.grants) for w in result.workloads}
    assert facts["web"] == (True, (), ("google",))
    assert facts["db"] == (False, ("dns-only",), ("github",))
    assert facts["report"] == (False, ("default-deny-external-egress",), ("github", "google"))
    assert facts["debug"] == (False, ("default-deny-external-egress",), ("nope",))
    assert facts["crawler"] == (True, ("internet-only",), ("echo",))
    # 192.0.2.1 is outside the provider range: no general internet egress...
    assert facts["sync"] == (False, ("provider-only",), ("echo",))
    # ...and asking about the provider's address says otherwise.
    probed = audit(
        Snapshot.from_objects(**cluster()),
        probes=[ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("203.0.113.50")],
    )
    assert probed.workload("provider", "StatefulSet", "sync").direct_egress


def _codes(result: Audit) -> set[tuple[str, str, str]]:
    return {(f.code, f.severity, f.subject) for f in result.findings}


def test_findings(result: Audit) -> None:
    assert _codes(result) == {
        ("unknown-gateway", "error", "good/Pod/debug"),
        ("grant-blocked", "error", "locked/StatefulSet/db"),
        ("grant-blocked", "error", "public/StatefulSet/crawler"),
        ("allowed-gateway-form", "info", "locked/StatefulSet/db"),
        ("no-default-deny", "warning", "Namespace/open"),
        ("no-default-deny", "warning", "Namespace/public"),
        ("no-default-deny", "warning", "Namespace/provider"),
        ("ungranted-access", "warning", "monitoring/StatefulSet/prom"),
        ("unreachable-gateway", "warning", "ExternalService/unloved"),
        ("gateway-without-pods", "info", "ExternalService/echo"),
    }
    by = {(f.code, f.subject): f for f in result.findings}
    db = by[("grant-blocked", "locked/StatefulSet/db")]
    assert "443/TCP, 22/TCP" in db.message and "dns-only" in db.message
    assert f"kubernetes.io/metadata.name: {GW_NS}" in db.message
    assert (db.namespace, db.workload, db.external_service) == (
        "locked",
        "StatefulSet/db",
        "github",
    )
    assert "no egress policy selects them" in by[("no-default-deny", "Namespace/open")].message
    assert "allow public addresses" in by[("no-default-deny", "Namespace/public")].message
    assert "allow-monitoring" in by[("ungranted-access", "monitoring/StatefulSet/prom")].message
    assert "'nope'" in by[("unknown-gateway", "good/Pod/debug")].message
    # Ordered by severity first.
    severities = [f.severity for f in result.findings]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)


def test_reachable_answers_any_question(result: Audit) -> None:
    assert result.reachable("open", "Deployment", "web", "google", 443)
    assert result.reachable("good", "CronJob", "report", "github", 22, "TCP")
    assert not result.reachable("locked", "StatefulSet", "db", "github", 443)
    # Not in the rows: computed on demand.
    assert not result.reachable("good", "DaemonSet", "agent", "google", 443)
    assert not result.reachable("open", "Deployment", "web", "github", 443)
    assert result.row("open", "Deployment", "web", "github", 443).direct
    # Undeclared ports, the wrong protocol, the admin port, unknown gateways: never reachable,
    # even for a workload that a policy admits on every port.
    for args in [
        ("open", "Deployment", "web", "google", 80, "TCP"),
        ("open", "Deployment", "web", "google", 443, "UDP"),
        ("monitoring", "StatefulSet", "prom", "google", 11000, "TCP"),
        ("open", "Deployment", "web", "nope", 443, "TCP"),
    ]:
        assert not result.reachable(*args), args
    with pytest.raises(LookupError):
        result.reachable("open", "Deployment", "nobody", "google", 443)


def test_to_dict_uses_the_contract_field_names(result: Audit) -> None:
    data = result.to_dict()
    assert set(data) >= {"rows", "findings"}
    row = data["rows"][0]
    for name in ("namespace", "kind", "name", "external_service", "port", "protocol", "granted",
                 "grant_form", "policy_allows", "reachable", "direct"):  # fmt: skip
        assert name in row
    assert set(data["findings"][0]) >= {"code", "severity", "subject", "message"}


# -- edge cases -----------------------------------------------------------------------------------


def small(**kw: Any) -> Audit:
    obj = es("google")
    pol, svc = gateway_objects(obj)
    base: dict[str, Any] = {
        "pods": [gateway_pod("google", "10.244.0.100")],
        "namespaces": [ns("app"), ns(GW_NS)],
        "policies": [pol],
        "external_services": [obj],
        "services": [svc],
    }
    for key, value in kw.items():
        base[key] = base.get(key, []) + value if key in ("pods", "policies") else value
    return audit(Snapshot.from_objects(**base))


def test_pods_of_one_workload_that_differ_are_reported_as_partial() -> None:
    result = small(
        pods=[
            pod("app", "w-1", GRANT, "10.244.0.2", ("ReplicaSet", "w-1")),
            pod("app", "w-2", {}, "10.244.0.3", ("ReplicaSet", "w-1")),
        ]
    )
    [row] = result.rows
    assert (row.kind, row.name) == ("ReplicaSet", "w-1")  # its Deployment was not listed
    assert row.reachable and (row.pods, row.pods_reachable) == (2, 1)
    assert ("partial-access", "warning", "app/ReplicaSet/w-1") in _codes(result)


def test_static_pods_and_bare_pods_are_their_own_workloads() -> None:
    result = small(pods=[pod("app", "etcd-node1", GRANT, "10.244.0.2", ("Node", "node1"))])
    assert [(r.kind, r.name) for r in result.rows] == [("Pod", "etcd-node1")]


def test_a_gateway_without_service_is_reported_and_unreachable() -> None:
    result = small(services=[], pods=[pod("app", "p", GRANT, "10.244.0.2")])
    [row] = result.rows
    assert row.granted and row.policy_allows and not row.reachable
    assert ("gateway-not-deployed", "warning", "ExternalService/google") in _codes(result)
    assert ("unreachable-gateway", "warning", "ExternalService/google") in _codes(result)


def test_a_gateway_without_pods_is_judged_by_its_labels_and_no_ip() -> None:
    internal = netpol(
        "app",
        "internal",
        {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]},
    )
    by_label = netpol(
        "app",
        "to-gateways",
        {
            "podSelector": {},
            "egress": [
                {
                    "to": [
                        {
                            "namespaceSelector": {},
                            "podSelector": {"matchLabels": {c.LABEL_GATEWAY: "google"}},
                        }
                    ]
                }
            ],
        },
    )
    base = cluster()
    for policy, expected in ((internal, False), (by_label, True)):
        result = audit(
            Snapshot.from_objects(
                pods=[pod("app", "p", GRANT, "10.244.0.2")],
                namespaces=[ns("app")],
                policies=[*base["policies"][:1], policy],
                external_services=base["external_services"][:1],
                services=base["services"][:1],
            )
        )
        assert result.rows[0].policy_allows is expected, policy["metadata"]["name"]


def test_named_target_ports_resolve_on_the_gateway_pods() -> None:
    obj = es("google")
    pol, svc = gateway_objects(obj)
    svc["spec"]["ports"][0]["targetPort"] = "proxy"
    gw = gateway_pod("google", "10.244.0.100")
    gw["spec"]["containers"][0]["ports"] = [{"containerPort": 8443, "name": "proxy"}]
    pol["spec"]["ingress"][0]["ports"] = [{"port": 8443}]
    only_8443 = netpol(
        "app", "to-8443", {"podSelector": {}, "egress": [{"ports": [{"port": 8443}]}]}
    )
    result = audit(
        Snapshot.from_objects(
            pods=[pod("app", "p", GRANT, "10.244.0.2")],
            namespaces=[ns("app")],
            policies=[pol, only_8443],
            external_services=[obj],
            services=[svc],
            gateway_pods=[gw],
        )
    )
    assert result.reachable("app", "Pod", "p", "google", 443)


def test_host_network_clients_pass_only_an_ip_block() -> None:
    host = pod("app", "node-agent", GRANT, "172.18.0.2", hostNetwork=True)
    result = small(pods=[host])
    [row] = result.rows
    assert row.granted and row.egress_allows and not row.ingress_allows and row.direct
    open_to_nodes = netpol(
        GW_NS,
        "nodes",
        {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "172.18.0.0/16"}}]}]},
    )
    assert small(pods=[host], policies=[open_to_nodes]).rows[0].reachable


def test_a_gateway_without_any_policy_admits_everyone() -> None:
    obj = es("google")
    _, svc = gateway_objects(obj)
    result = audit(
        Snapshot.from_objects(
            pods=[pod("app", "p", {}, "10.244.0.2"), gateway_pod("google", "10.244.0.100")],
            namespaces=[ns("app")],
            external_services=[obj],
            services=[svc],
        )
    )
    [row] = result.rows
    assert row.reachable and not row.granted
    [f] = [f for f in result.findings if f.code == "ungranted-access"]
    assert "no NetworkPolicy" in f.message


def test_grant_label_values_and_the_gateway_named_gateway() -> None:
    result = small(pods=[pod("app", "p", {c.grant_label("google"): "yes"}, "10.244.0.2")])
    assert not result.rows
    assert ("grant-value-ignored", "warning", "app/Pod/p") in _codes(result)
    # An ExternalService named "gateway": allowed-gateway: "true" is its per-gateway grant.
    obj = es("gateway")
    pol, svc = gateway_objects(obj)
    named = audit(
        Snapshot.from_objects(
            pods=[pod("app", "p", {c.GRANT_LABEL_GATEWAY: "true"}, "10.244.0.2")],
            namespaces=[ns("app")],
            policies=[pol],
            external_services=[obj],
            services=[svc],
        )
    )
    assert named.rows[0].granted and named.rows[0].grant_form == FORM_PER_GATEWAY
    assert not [f for f in named.findings if f.code in ("unknown-gateway", "allowed-gateway-form")]


def test_invalid_external_services_are_read_leniently() -> None:
    broken = es("google")
    broken["spec"]["ports"] = [{"port": 0}, {"port": 443}, {"port": 53, "protocol": "ICMP"}, "x"]
    broken["spec"]["ipOverride"] = ["not-an-ip", "203.0.113.9"]
    snap = Snapshot.from_objects(external_services=[broken])
    [info] = snap.external_services
    assert info.ports == ((443, "TCP"),)
    assert [str(ip) for ip in info.ip_override] == ["203.0.113.9"]


# -- reading from the API ---------------------------------------------------------------------------


class FakeKube:
    """Answers list_all from a dict of (plural, namespace) -> items; records each call."""

    def __init__(self, items: dict[str, list[dict[str, Any]]]) -> None:
        self.items = items
        self.calls: list[tuple[str, str | None, str | None]] = []

    def list_all(
        self, resource: Any, namespace: str | None = None, label_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        self.calls.append((resource.plural, namespace, label_selector))
        return [dict(i) for i in self.items.get(resource.plural, [])], "1"


def test_snapshot_from_kube_lists_each_kind_once() -> None:
    args = cluster()
    kube = FakeKube(
        {
            "pods": args["pods"],
            "namespaces": args["namespaces"],
            "networkpolicies": args["policies"],
            "externalservices": args["external_services"],
            "services": args["services"],
            "replicasets": [o for o in args["owners"] if o["kind"] == "ReplicaSet"],
            "jobs": [o for o in args["owners"] if o["kind"] == "Job"],
        }
    )
    snap = snapshot_from_kube(kube, SETTINGS)  # type: ignore[arg-type]
    assert sorted(kube.calls, key=str) == sorted(
        [
            ("externalservices", None, None),
            ("namespaces", None, None),
            ("networkpolicies", None, None),
            ("services", GW_NS, c.LABEL_GATEWAY),
            ("pods", None, None),
            ("replicasets", None, None),
            ("jobs", None, None),
        ],
        key=str,
    )
    assert audit(snap).rows == audit(Snapshot.from_objects(**args)).rows


def test_replica_sets_and_jobs_are_listed_only_when_pods_have_them() -> None:
    kube = FakeKube({"pods": [pod("app", "bare", GRANT)]})
    snapshot_from_kube(kube, SETTINGS)  # type: ignore[arg-type]
    plurals = {plural for plural, _, _ in kube.calls}
    assert REPLICA_SET.plural not in plurals and JOB.plural not in plurals


# -- memoisation never changes an answer ------------------------------------------------------------

_keys = st.sampled_from(
    ["app", "tier", c.grant_label("google"), c.grant_label("github"), c.GRANT_LABEL_GATEWAY]
)
_values = st.sampled_from(["true", "web", "google", "github", "x"])
_labels = st.dictionaries(_keys, _values, max_size=3)
_selector = st.one_of(
    st.just({}),
    _labels.map(lambda d: {"matchLabels": d}),
    st.tuples(_keys, st.sampled_from(["Exists", "DoesNotExist"])).map(
        lambda t: {"matchExpressions": [{"key": t[0], "operator": t[1]}]}
    ),
)
_peer = st.one_of(
    _selector.map(lambda s: {"podSelector": s}),
    st.tuples(_selector, st.sampled_from(["a", "b", GW_NS])).map(
        lambda t: {
            "podSelector": t[0],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": t[1]}},
        }
    ),
    st.sampled_from(["10.0.0.0/8", "10.244.0.0/28", "0.0.0.0/0"]).map(
        lambda cidr: {"ipBlock": {"cidr": cidr}}
    ),
)
_rule = st.fixed_dictionaries(
    {},
    optional={
        "to": st.lists(_peer, max_size=2),
        "ports": st.lists(
            st.sampled_from([{"port": 443}, {"port": 22}, {"protocol": "UDP"}]), max_size=2
        ),
    },
)


@st.composite
def _clusters(draw: st.DrawFn) -> dict[str, Any]:
    policies: list[dict[str, Any]] = []
    for obj in (es("google"), es("github", (443, "TCP"), (22, "TCP"))):
        pol, _ = gateway_objects(obj)
        policies.append(pol)
    for i, namespace in enumerate(draw(st.lists(st.sampled_from(["a", "b", GW_NS]), max_size=4))):
        rules = draw(st.lists(_rule, max_size=2))
        direction = "ingress" if namespace == GW_NS else "egress"
        if direction == "ingress":
            rules = [
                {"from": r.get("to", []), **({"ports": r["ports"]} if "ports" in r else {})}
                for r in rules
            ]
        policies.append(
            netpol(
                namespace,
                f"p{i}",
                {
                    "podSelector": draw(_selector),
                    "policyTypes": [direction.title()],
                    direction: rules,
                },
            )
        )
    pods = [
        pod(
            draw(st.sampled_from(["a", "b"])),
            f"w{i}",
            draw(_labels),
            f"10.244.0.{i + 2}",
            draw(st.sampled_from([None, ("ReplicaSet", "rs")])),
        )
        for i in range(draw(st.integers(1, 6)))
    ]
    return {"pods": pods, "policies": policies}


@settings(max_examples=150, deadline=None)
@given(_clusters())
def test_the_audit_agrees_with_a_pod_by_pod_evaluation(drawn: dict[str, Any]) -> None:
    services = [es("google"), es("github", (443, "TCP"), (22, "TCP"))]
    gw_services = [gateway_objects(o)[1] for o in services]
    gateways = [gateway_pod("google", "10.244.0.100"), gateway_pod("github", "10.244.0.101")]
    result = audit(
        Snapshot.from_objects(
            pods=[*drawn["pods"], *gateways],
            namespaces=[ns("a"), ns("b"), ns(GW_NS)],
            policies=drawn["policies"],
            external_services=services,
            services=gw_services,
        )
    )
    fresh = PolicyIndex(parse_network_policy(p) for p in drawn["policies"])

    def endpoint(obj: dict[str, Any]) -> Endpoint:
        p = parse_pod(obj)
        return Endpoint(
            p.namespace,
            p.labels,
            Labels({"kubernetes.io/metadata.name": p.namespace}),
            p.ip,
            p.ports,
        )

    for obj in drawn["pods"]:
        meta = obj["metadata"]
        kind, name = ("ReplicaSet", "rs") if meta.get("ownerReferences") else ("Pod", meta["name"])
        same = [
            o
            for o in drawn["pods"]
            if o["metadata"]["namespace"] == meta["namespace"]
            and bool(o["metadata"].get("ownerReferences")) == (kind == "ReplicaSet")
            and (kind == "ReplicaSet" or o is obj)
        ]
        for gw_obj, gateway, port in [
            (gateways[0], "google", 443),
            (gateways[1], "github", 443),
            (gateways[1], "github", 22),
        ]:
            reachable = [
                fresh.egress(endpoint(o), endpoint(gw_obj), port, "TCP").allowed
                and fresh.ingress(endpoint(gw_obj), endpoint(o), port, "TCP").allowed
                for o in same
            ]
            row = result.row(meta["namespace"], kind, name, gateway, port)
            assert (row.pods, row.pods_reachable) == (len(same), sum(reachable))
            listed = [
                r
                for r in result.rows
                if (r.namespace, r.kind, r.name, r.external_service, r.port)
                == (meta["namespace"], kind, name, gateway, port)
            ]
            assert listed == ([row] if row.granted or row.reachable else [])


def test_collection_paths_across_all_namespaces() -> None:
    from core.kube import NAMESPACE, NETWORK_POLICY, POD

    assert POD.path() == "/api/v1/pods"
    assert POD.path("app") == "/api/v1/namespaces/app/pods"
    assert NETWORK_POLICY.path() == "/apis/networking.k8s.io/v1/networkpolicies"
    assert REPLICA_SET.path() == "/apis/apps/v1/replicasets"
    assert JOB.path("x", "y") == "/apis/batch/v1/namespaces/x/jobs/y"
    assert NAMESPACE.path(None, "app") == "/api/v1/namespaces/app"
    with pytest.raises(ValueError, match="needs its namespace"):
        POD.path(None, "web-1")
