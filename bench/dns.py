"""Benchmark: cluster-DNS rules at scale and their propagation on the real local CoreDNS.

Prints:
- rendering 1,000 hijacked names (BENCH_DNS_N to change): time, bytes, bytes per rule, and the
  resulting ConfigMap capacity;
- delivery of those rules to the API server (GET + LIST + PUT) and a no-op re-sync;
- the time from a gateway's hijack state becoming ``true`` (its reconcile returning) to the first
  rewritten answer from CoreDNS, over several gateways (ConfigMap projection + ``reload 2s``).

Run: `make bench` (or `.venv/bin/python -m bench.dns`).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from dnslib import QTYPE, DNSRecord

from bench.stack import bench_stack
from core import constants as c
from core.kube import (
    EXTERNAL_SERVICE,
    GATEWAY_KINDS,
    SERVICE,
    Kube,
    api_client_from_kubeconfig,
)
from core.settings import Settings
from dns.delivery import DnsDelivery
from dns.render import MAX_CONFIGMAP_BYTES, Claim, render
from reconcile.app import build_reconciler
from tests.integration.helpers import (
    create_es,
    create_hijacked_service,
    dev_settings,
    external_service,
    set_pods_ready,
)

NS = "egress-operator-system"
DOMAIN = "cluster.local"


def bench_render(n: int) -> None:
    claims = [
        Claim("2026-01-01T00:00:00Z", f"gw{i:04d}", f"service-{i:04d}.example.com")
        for i in range(n)
    ]
    timings = []
    for _ in range(5):
        t = time.perf_counter()
        out = render(claims, NS, DOMAIN)
        timings.append(time.perf_counter() - t)
    size = sum(len(v.encode()) for v in out.data.values())
    per_rule = size / n
    print(
        f"render {n} hijacked names: {statistics.median(timings) * 1000:.1f} ms (median of 5), "
        f"{size} bytes in {len(out.data)} key(s), {per_rule:.0f} bytes/rule; "
        f"capacity at this name length ~{int(MAX_CONFIGMAP_BYTES / per_rule)} names "
        f"({MAX_CONFIGMAP_BYTES} bytes budget of the 1 MiB ConfigMap limit)"
    )


def bench_delivery(admin: Kube, kube: Kube, settings: Settings, n: int) -> None:
    def service(i: int) -> None:
        create_hijacked_service(admin, f"dnsbench-{i:04d}", f"service-{i:04d}.example.com")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(service, range(n)))
    delivery = DnsDelivery(settings)
    before = kube.counters.total
    t = time.perf_counter()
    report = delivery.sync(kube)
    wall = time.perf_counter() - t
    print(
        f"deliver {len(report.rendered.rules)} rules (GET, LIST {n} Services, PUT): "
        f"{wall * 1000:.0f} ms, "
        f"{kube.counters.total - before} requests, written={report.written}"
    )
    before = kube.counters.total
    t = time.perf_counter()
    again = delivery.sync(kube)
    print(
        f"re-sync with nothing to change: {(time.perf_counter() - t) * 1000:.0f} ms, "
        f"{kube.counters.total - before} requests, written={again.written}"
    )
    admin.request("DELETE", SERVICE.path(NS), query=[("labelSelector", f"{c.LABEL_GATEWAY}")])
    delivery.sync(kube)


def _answer(addr: str, name: str) -> list[str]:
    host, port = addr.rsplit(":", 1)
    reply = DNSRecord.parse(DNSRecord.question(name, "A").send(host, int(port), timeout=1))
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def bench_propagation(
    admin: Kube, kube: Kube, settings: Settings, coredns: str, rounds: int
) -> None:
    reconciler = build_reconciler(kube, settings)
    latencies = []
    for i in range(rounds):
        name = f"prop-{i}"
        dns_name = f"prop-{i}-{int(time.time())}.example.com"
        create_es(admin, external_service(name, dnsName=dns_name, hijackDns=True))
        reconciler.reconcile(name)
        set_pods_ready(admin, name, True)
        result = reconciler.reconcile(name)
        start = time.perf_counter()
        assert result.hijack_state == "true"
        deadline = start + 120
        while not _answer(coredns, dns_name):
            if time.perf_counter() > deadline:
                raise SystemExit(f"no rewritten answer for {dns_name} within 120 s")
            time.sleep(0.05)
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    print(
        f"hijack state true -> first rewritten answer over {rounds} gateways: "
        f"p50 {statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s "
        f"(kubelet sync {os.environ.get('EGRESS_DEV_KUBELET_SYNC_S', '60')} s, CoreDNS pods "
        "nudged, reload 2s)"
    )
    for i in range(rounds):
        admin.merge_patch(EXTERNAL_SERVICE, f"prop-{i}", {"metadata": {"finalizers": None}})
        admin.delete(EXTERNAL_SERVICE, f"prop-{i}")
    for resource_ in GATEWAY_KINDS:
        admin.request("DELETE", resource_.path(NS), query=[("labelSelector", c.LABEL_GATEWAY)])
    DnsDelivery(settings).sync(kube)


def main() -> int:
    n = int(os.environ.get("BENCH_DNS_N", "1000"))
    bench_render(n)
    with bench_stack() as env:
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
        kube = Kube(api_client_from_kubeconfig(env["KUBECONFIG_RECONCILER"]))
        settings = dev_settings(delete_grace_s=0, coredns_import_path=env["COREDNS_IMPORT_PATH"])
        bench_delivery(admin, kube, settings, n)
        bench_propagation(
            admin,
            kube,
            settings,
            env["COREDNS_ADDR"],
            rounds=int(os.environ.get("BENCH_DNS_ROUNDS", "5")),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
