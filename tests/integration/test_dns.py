"""Cluster DNS with the real CoreDNS of the local stack: rules reach answers, and only ours."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from dnslib import QTYPE, DNSRecord

from core.kube import CONFIGMAP, EXTERNAL_SERVICE, SERVICE, Kube, api_client_from_kubeconfig
from core.settings import Settings
from dns.delivery import DnsDelivery
from reconcile.app import build_reconciler
from reconcile.controller import Reconciler
from reconcile.results import Outcome
from tests.conftest import DevStack
from tests.integration.helpers import (
    GATEWAY_NS,
    await_dns,
    create_es,
    create_hijacked_service,
    dev_settings,
    external_service,
    purge,
    set_pods_ready,
)

pytestmark = pytest.mark.cluster

DNS_CM = "egress-gateway-dns"


@pytest.fixture(scope="module")
def settings(dev_stack: DevStack) -> Settings:
    return dev_settings(delete_grace_s=0, coredns_import_path=dev_stack.env["COREDNS_IMPORT_PATH"])


@pytest.fixture
def reconciler(as_reconciler: Kube, settings: Settings) -> Reconciler:
    return build_reconciler(as_reconciler, settings)


@pytest.fixture
def names(admin: Kube, reconciler: Reconciler, unique: str) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for name in created:
        purge(admin, name)
    assert reconciler.dns is not None
    reconciler.dns.sync(reconciler.kube)


def query(stack: DevStack, name: str, qtype: str = "A") -> DNSRecord:
    host, port = stack.coredns_addr.rsplit(":", 1)
    packet = DNSRecord.question(name, qtype).send(host, int(port), timeout=2)
    return DNSRecord.parse(packet)


def a_records(stack: DevStack, name: str) -> list[tuple[str, str]]:
    reply = query(stack, name)
    return [(str(rr.rname).rstrip("."), str(rr.rdata)) for rr in reply.rr if rr.rtype == QTYPE.A]


def hijacked_gateway(
    admin: Kube, reconciler: Reconciler, names: list[str], name: str, dns_name: str
) -> str:
    names.append(name)
    create_es(admin, external_service(name, dnsName=dns_name, hijackDns=True))
    reconciler.reconcile(name)
    set_pods_ready(admin, name, True)
    result = reconciler.reconcile(name)
    assert result.hijack_state == "true"
    service = admin.get(SERVICE, name, GATEWAY_NS)
    assert service is not None
    return str(service["spec"]["clusterIP"])


def test_hijacked_name_answers_the_gateway_and_keeps_its_name(
    admin: Kube, reconciler: Reconciler, dev_stack: DevStack, names: list[str], unique: str
) -> None:
    dns_name = f"api-{unique}.example.com"
    assert a_records(dev_stack, dns_name) == [], (
        "before the rule, the offline upstream has no answer"
    )
    create_es(admin, external_service(f"gw-{unique}", dnsName=dns_name, hijackDns=True))
    names.append(f"gw-{unique}")
    reconciler.reconcile(f"gw-{unique}")
    cm = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert dns_name not in str((cm or {}).get("data")), "no rule while waiting for pods"
    set_pods_ready(admin, f"gw-{unique}", True)
    reconciler.reconcile(f"gw-{unique}")
    service = admin.get(SERVICE, f"gw-{unique}", GATEWAY_NS)
    assert service is not None
    ip = service["spec"]["clusterIP"]
    await_dns(
        lambda: a_records(dev_stack, dns_name) == [(dns_name, ip)],
        admin,
        f"{dns_name} -> {ip}",
    )
    aaaa = query(dev_stack, dns_name, "AAAA")
    assert [rr for rr in aaaa.rr if rr.rtype == QTYPE.AAAA] == [], "no IPv6 way around the gateway"
    assert aaaa.header.rcode == 0
    es = admin.get(EXTERNAL_SERVICE, f"gw-{unique}")
    assert es is not None
    cond = next(cd for cd in es["status"]["conditions"] if cd["type"] == "DnsHijacked")
    assert cond["status"] == "True"


def test_each_dns_write_nudges_the_coredns_pods_with_its_version(
    admin: Kube, reconciler: Reconciler, settings: Settings, names: list[str], unique: str
) -> None:
    """After a write, every CoreDNS pod carries the rules ConfigMap's new resourceVersion; with
    the nudge switched off, a write leaves the pods alone."""
    from core.constants import ANNOTATION_DNS_RULES_VERSION as KEY
    from core.kube import POD

    def versions() -> set[str]:
        pods, _ = admin.list_all(POD, "kube-system", label_selector="k8s-app=kube-dns")
        return {(p["metadata"].get("annotations") or {}).get(KEY, "") for p in pods}

    hijacked_gateway(admin, reconciler, names, f"ndg-{unique}", f"ndg-{unique}.example.com")
    cm = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert cm is not None
    assert versions() == {cm["metadata"]["resourceVersion"]}
    quiet = build_reconciler(
        reconciler.kube, dataclasses.replace(settings, nudge_coredns_pods=False)
    )
    admin.delete(EXTERNAL_SERVICE, f"ndg-{unique}")
    assert quiet.reconcile(f"ndg-{unique}").outcome in (Outcome.DELETING, Outcome.DELETED)
    after = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert (
        after is not None
        and after["metadata"]["resourceVersion"] != cm["metadata"]["resourceVersion"]
    )
    assert versions() == {cm["metadata"]["resourceVersion"]}


def test_quiet_rules_are_settled_once_and_the_next_write_drops_the_marker(
    admin: Kube,
    as_reconciler: Kube,
    settings: Settings,
    dev_stack: DevStack,
    names: list[str],
    unique: str,
) -> None:
    """A sync within SETTLE_AFTER_S of the last rules write leaves the rules alone; the first one
    after it adds the marker key once and nudges CoreDNS, which keeps answering; the next rules
    write drops the marker, so the next quiet sync settles again."""
    import datetime as dt

    from core.constants import ANNOTATION_DNS_RULES_VERSION as KEY
    from core.kube import POD
    from dns.delivery import SETTLE_AFTER_S
    from dns.render import SETTLE_KEY, SETTLE_TEXT
    from reconcile.base import utcnow

    later = [0.0]
    rec = build_reconciler(
        as_reconciler, settings, clock=lambda: utcnow() + dt.timedelta(seconds=later[0])
    )
    assert rec.dns is not None
    dns_name = f"stl-{unique}.example.com"
    ip = hijacked_gateway(admin, rec, names, f"stl-{unique}", dns_name)
    written = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert written is not None and SETTLE_KEY not in written["data"]

    later[0] = SETTLE_AFTER_S - 3
    early = rec.dns.sync(as_reconciler)
    assert not early.settled and not early.written
    live = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert (
        live is not None
        and live["metadata"]["resourceVersion"] == (written["metadata"]["resourceVersion"])
    )

    later[0] = SETTLE_AFTER_S + 1
    quiet = rec.dns.sync(as_reconciler)
    assert quiet.settled and not quiet.written
    marked = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert marked is not None
    assert marked["data"] == {**written["data"], SETTLE_KEY: SETTLE_TEXT}
    pods, _ = admin.list_all(POD, "kube-system", label_selector="k8s-app=kube-dns")
    assert {p["metadata"]["annotations"][KEY] for p in pods} == {
        marked["metadata"]["resourceVersion"]
    }, "the settle is nudged like any write"
    again = rec.dns.sync(as_reconciler)
    assert not again.settled and not again.written, "settled once"
    await_dns(lambda: a_records(dev_stack, dns_name) == [(dns_name, ip)], admin, "answers, settled")

    other = f"stl2-{unique}"
    hijacked_gateway(admin, rec, names, other, f"{other}.example.com")
    rewritten = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert rewritten is not None and SETTLE_KEY not in rewritten["data"]
    assert any(f"{other}.example.com" in text for text in rewritten["data"].values())


def test_names_we_do_not_manage_are_forwarded_untouched(dev_stack: DevStack) -> None:
    assert a_records(dev_stack, "api.example.com") == [("api.example.com", "192.0.2.10")]
    reply = query(dev_stack, "kubernetes.default.svc.cluster.local")
    assert [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A], "cluster names still resolve"


def test_delete_removes_the_rewrite(
    admin: Kube, reconciler: Reconciler, dev_stack: DevStack, names: list[str], unique: str
) -> None:
    dns_name = f"del-{unique}.example.com"
    ip = hijacked_gateway(admin, reconciler, names, f"del-{unique}", dns_name)
    await_dns(lambda: a_records(dev_stack, dns_name) == [(dns_name, ip)], admin, "the rewrite")
    admin.delete(EXTERNAL_SERVICE, f"del-{unique}")
    first = reconciler.reconcile(f"del-{unique}")
    assert first.outcome in (Outcome.DELETING, Outcome.DELETED)
    cm = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert dns_name not in str((cm or {}).get("data")), "the rule goes first"
    await_dns(lambda: a_records(dev_stack, dns_name) == [], admin, "the rewrite to disappear")


def test_cluster_internal_name_is_refused_with_a_condition(
    admin: Kube, reconciler: Reconciler, dev_stack: DevStack, names: list[str], unique: str
) -> None:
    hijacked_gateway(
        admin, reconciler, names, f"int-{unique}", "kubernetes.default.svc.cluster.local"
    )
    es = admin.get(EXTERNAL_SERVICE, f"int-{unique}")
    assert es is not None
    cond = next(cd for cd in es["status"]["conditions"] if cd["type"] == "DnsHijacked")
    assert (cond["status"], cond["reason"]) == ("False", "ForbiddenDnsName")
    assert "cluster domain" in cond["message"]
    cm = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert "kubernetes.default" not in str((cm or {}).get("data"))
    reply = query(dev_stack, "kubernetes.default.svc.cluster.local")
    kubernetes_ip = str(ipaddress.ip_network(dev_stack.env["EGRESS_DEV_SERVICE_CIDR"])[1])
    assert [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A] == [kubernetes_ip]


def test_an_older_object_editing_its_name_cannot_steal_a_served_name(
    admin: Kube, reconciler: Reconciler, dev_stack: DevStack, names: list[str], unique: str
) -> None:
    """The oldest *claim* holds a name, not the oldest object: a hostile tenant's old
    ExternalService that switches its dnsName to a name another gateway serves is refused, and
    the victim keeps answering."""
    from tests.integration.helpers import update_spec

    victim_name = f"victim-{unique}.example.com"
    hijacked_gateway(admin, reconciler, names, f"old-{unique}", f"old-{unique}.example.com")
    victim_ip = hijacked_gateway(admin, reconciler, names, f"victim-{unique}", victim_name)
    await_dns(
        lambda: a_records(dev_stack, victim_name) == [(victim_name, victim_ip)],
        admin,
        "the victim's rule",
    )
    update_spec(admin, f"old-{unique}", {"dnsName": victim_name})
    reconciler.reconcile(f"old-{unique}")
    es = admin.get(EXTERNAL_SERVICE, f"old-{unique}")
    assert es is not None
    cond = next(cd for cd in es["status"]["conditions"] if cd["type"] == "DnsHijacked")
    assert (cond["status"], cond["reason"]) == ("False", "DuplicateDnsName"), cond
    assert f"victim-{unique}" in cond["message"]
    cm = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert f"{victim_name} victim-{unique}." in str((cm or {}).get("data"))
    assert f"old-{unique}.example.com" not in str((cm or {}).get("data"))
    # A sweep agrees, and the victim still answers.
    reconciler.sweep()
    assert a_records(dev_stack, victim_name) == [(victim_name, victim_ip)]


def test_duplicate_claim_goes_to_the_older_and_the_newer_is_told_why(
    admin: Kube, reconciler: Reconciler, dev_stack: DevStack, names: list[str], unique: str
) -> None:
    dns_name = f"dup-{unique}.example.com"
    first_ip = hijacked_gateway(admin, reconciler, names, f"first-{unique}", dns_name)
    hijacked_gateway(admin, reconciler, names, f"second-{unique}", dns_name)
    es = admin.get(EXTERNAL_SERVICE, f"second-{unique}")
    assert es is not None
    cond = next(cd for cd in es["status"]["conditions"] if cd["type"] == "DnsHijacked")
    assert (cond["status"], cond["reason"]) == ("False", "DuplicateDnsName")
    assert f"first-{unique}" in cond["message"]
    await_dns(
        lambda: a_records(dev_stack, dns_name) == [(dns_name, first_ip)],
        admin,
        "oldest wins",
    )


def test_twenty_concurrent_writers_lose_no_rule(
    admin: Kube, dev_stack: DevStack, settings: Settings, names: list[str], unique: str
) -> None:
    count = 20
    gateways = [f"par{i:02d}-{unique}" for i in range(count)]
    # Twenty gateways at the default 100m would not fit the dev node's 2 CPUs at once.
    small = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}
    for name in gateways:
        names.append(name)
        create_es(
            admin,
            external_service(name, dnsName=f"{name}.example.com", hijackDns=True, resources=small),
        )
        build_reconciler(admin, dataclasses.replace(settings)).reconcile(name)
    # Services exist and pods are ready before the race, so every writer must add a rule.
    for name in gateways:
        set_pods_ready(admin, name, True)

    def run(name: str) -> str:
        kube = Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler")))
        return build_reconciler(kube, settings).reconcile(name).outcome

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        outcomes = list(pool.map(run, gateways))
    assert len(outcomes) == count
    cm = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert cm is not None
    text = "".join(cm["data"].values())
    missing = [g for g in gateways if f"rewrite stop name exact {g}.example.com " not in text]
    assert missing == []


def test_sweep_repairs_hand_edits_of_the_dns_configmap(
    admin: Kube, reconciler: Reconciler, dev_stack: DevStack, names: list[str], unique: str
) -> None:
    dns_name = f"edit-{unique}.example.com"
    hijacked_gateway(admin, reconciler, names, f"edit-{unique}", dns_name)
    cm = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert cm is not None
    tampered = {k: v.replace(dns_name, f"evil-{unique}.example.com") for k, v in cm["data"].items()}
    admin.merge_patch(CONFIGMAP, DNS_CM, {"data": tampered}, "kube-system")
    report = reconciler.sweep()
    assert report.dns is not None and report.dns.written
    assert any("DNS ConfigMap" in d for d in report.dns.drift)
    repaired = admin.get(CONFIGMAP, DNS_CM, "kube-system")
    assert repaired is not None
    assert dns_name in "".join(repaired["data"].values())
    assert f"evil-{unique}" not in "".join(repaired["data"].values())


@pytest.fixture
def corefile(admin: Kube) -> Iterator[dict[str, Any]]:
    """The stack's Corefile ConfigMap, restored after the test."""
    cm = admin.get(CONFIGMAP, "coredns", "kube-system")
    assert cm is not None
    original = cm["data"]["Corefile"]
    yield cm
    live = admin.get(CONFIGMAP, "coredns", "kube-system")
    if live is not None and live["data"]["Corefile"] != original:
        admin.merge_patch(CONFIGMAP, "coredns", {"data": {"Corefile": original}}, "kube-system")


def test_removed_import_line_is_reported_and_restored_when_allowed(
    admin: Kube,
    as_reconciler: Kube,
    settings: Settings,
    dev_stack: DevStack,
    names: list[str],
    unique: str,
    corefile: dict[str, Any],
) -> None:
    dns_name = f"imp-{unique}.example.com"
    reconciler = build_reconciler(as_reconciler, settings)
    ip = hijacked_gateway(admin, reconciler, names, f"imp-{unique}", dns_name)
    original = corefile["data"]["Corefile"]
    import_line = f"import {settings.coredns_import_path}"
    assert import_line in original
    stripped = original.replace(f"    {import_line}\n", "")
    admin.merge_patch(CONFIGMAP, "coredns", {"data": {"Corefile": stripped}}, "kube-system")
    await_dns(lambda: a_records(dev_stack, dns_name) == [], admin, "CoreDNS to drop the import")

    report = reconciler.sweep()
    assert report.dns is not None
    assert (
        "lacks" in report.dns.corefile_problem
        and "MANAGE_COREDNS_IMPORT" in report.dns.corefile_problem
    )
    live = admin.get(CONFIGMAP, "coredns", "kube-system")
    assert live is not None and live["data"]["Corefile"] == stripped, "not allowed: nothing written"
    assert _dns_condition(admin, f"imp-{unique}") == ("False", "CoreDNSNotWired")

    managing = build_reconciler(
        as_reconciler, dataclasses.replace(settings, manage_coredns_import=True)
    )
    report = managing.sweep()
    assert report.dns is not None and any("Corefile: added" in d for d in report.dns.drift)
    live = admin.get(CONFIGMAP, "coredns", "kube-system")
    assert live is not None
    assert live["data"]["Corefile"].count(import_line) == 1
    assert live["data"]["Corefile"].replace(f"    {import_line}\n", "") == stripped
    await_dns(
        lambda: a_records(dev_stack, dns_name) == [(dns_name, ip)],
        admin,
        "rules to come back",
    )
    again = managing.sweep()
    assert again.dns is not None and not any("Corefile" in d for d in again.dns.drift)
    assert _dns_condition(admin, f"imp-{unique}") == ("True", "Hijacked")


def _dns_condition(admin: Kube, name: str) -> tuple[str, str]:
    es = admin.get(EXTERNAL_SERVICE, name)
    assert es is not None
    cond = next(cd for cd in es["status"]["conditions"] if cd["type"] == "DnsHijacked")
    return cond["status"], cond["reason"]


def test_dns_delivery_as_the_reconciler_identity_only_touches_its_configmaps(
    as_reconciler: Kube, settings: Settings
) -> None:
    from core.errors import PermanentError

    report = DnsDelivery(settings).sync(as_reconciler)
    assert report.corefile_problem == "" or "lacks" in report.corefile_problem
    with pytest.raises(PermanentError, match="403"):
        as_reconciler.merge_patch(
            CONFIGMAP, "extension-apiserver-authentication", {"data": {"x": "y"}}, "kube-system"
        )


def test_rules_spread_over_several_configmaps_and_every_one_answers(
    admin: Kube, as_reconciler: Kube, settings: Settings, dev_stack: DevStack, unique: str
) -> None:
    """Past one ConfigMap's budget (a small one here stands in for 9,000 names) the rules spread
    over the others, which CoreDNS mounts as optional sources of one projected volume: a name in
    each of them answers its Service's ClusterIP, with nothing changed in CoreDNS; once they fit
    again they gather back into the first and the others are emptied."""
    from core.kube import DEPLOYMENT
    from dns.render import rules_only, shard_of
    from tests.integration.helpers import eventually

    coredns = admin.get(DEPLOYMENT, "coredns", "kube-system")
    assert coredns is not None
    [volume] = [
        v for v in coredns["spec"]["template"]["spec"]["volumes"] if v["name"] == "egress-gateways"
    ]
    assert [s["configMap"]["name"] for s in volume["projected"]["sources"]] == list(
        settings.dns_configmap_names
    )
    shards = settings.dns_configmap_shards
    picked: dict[int, str] = {}
    k = 0
    while len(picked) < shards - 1:
        picked.setdefault(shard_of(f"spread{k}-{unique}.example.com", shards), str(k))
        k += 1
    services = {f"spread{k}-{unique}": f"spread{k}-{unique}.example.com" for k in picked.values()}
    ips = {}
    for svc, dns_name in services.items():
        ips[dns_name] = create_hijacked_service(admin, svc, dns_name)["spec"]["clusterIP"]
    try:
        # A budget one byte short of what the rules need in one ConfigMap: they spread.
        one = DnsDelivery(settings).sync(as_reconciler).rendered.data
        spread = DnsDelivery(settings, max_configmap_bytes=sum(map(len, one.values())) - 1)
        assert spread.sync(as_reconciler).written
        for dns_name in ips:
            holder = settings.dns_configmap_names[shard_of(dns_name, shards)]
            cm = admin.get(CONFIGMAP, holder, "kube-system")
            assert cm is not None and dns_name in "".join(cm["data"].values()), holder
        first = admin.get(CONFIGMAP, DNS_CM, "kube-system")
        assert first is not None and rules_only(first.get("data") or {}) == {}, (
            "the first holds none"
        )
        eventually(
            lambda: all(a_records(dev_stack, n) == [(n, ip)] for n, ip in ips.items()),
            150,
            f"answers from all {shards - 1} other ConfigMaps",
            between=lambda: spread.sync(as_reconciler),
        )
    finally:
        for svc in services:
            admin.delete(SERVICE, svc, GATEWAY_NS)
    DnsDelivery(settings).sync(as_reconciler)
    for other in settings.dns_configmap_names[1:]:
        cm = admin.get(CONFIGMAP, other, "kube-system")
        assert cm is None or rules_only(cm.get("data") or {}) == {}, other
