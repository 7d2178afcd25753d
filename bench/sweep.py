"""Benchmark: sweeps against the original operator, and at 10,000 ExternalServices.

On the real local control plane of the benchmarks' own stack, with its controller-manager paused
(as in issue 14's side-by-side run: no ReplicaSets or pods are made; the Deployments simply never
become ready) and the node's kube-proxy and kube-router too (``node_paused``: on 2 shared cores
they would otherwise spend a quarter of the CPU resyncing rules for each new gateway).
Requests are the API server's own counts (``apiserver_request_total``, see
``bench._apiserver``), by verb; every pass runs in a fresh process, as a function instance
would, and reports its own peak RSS.

1. N new ExternalServices (BENCH_N, default 1,000): the original's requests (``bench._original``)
   and then ours (one sweep), side by side with the ratios; the original's restart over its N
   gateways and our in-sync sweep over ours; the in-sync pass done naively (a GET per object).
2. BENCH_SCALE_N (default 10,000; 0 skips it) new ExternalServices, created through the API: one
   sweep converges them all, then an in-sync sweep (targets: at most 60 requests, 0 writes,
   peak RSS at most 400 MiB).

Exits 1 when a target is missed: a GET per object, a write in sync, or a scale target.

Run: `make bench` (or `.venv/bin/python -m bench.sweep`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._apiserver import (
    cpu_seconds,
    delete_all,
    emit,
    node_paused,
    ours,
    own_cpu_seconds,
    own_peak_rss_mib,
    request_total,
    verbs_text,
)
from bench.stack import REPO, bench_stack
from core import constants as c
from core.kube import EXTERNAL_SERVICE, GATEWAY_KINDS, Kube, api_client_from_kubeconfig
from core.settings import Settings
from reconcile.app import build_reconciler
from tests.integration.helpers import dev_settings, external_service

PREFIX = "bench-"
GATEWAY_NS = "egress-operator-system"
BENCH_LABEL = "egress.dev/bench"
SCALE_MAX_REQUESTS = 60
SCALE_MAX_RSS_MIB = 400.0


def _settings() -> Settings:
    # The dev node's Envoy image (bench_stack exports the env), and a node selector no node
    # matches: this measures the reconciler against the API server, not gateway pods.
    overrides: dict[str, Any] = {
        "delete_grace_s": 0,
        "node_selector_key": "egress.dev/bench-no-node",
        "node_selector_value": "none",
    }
    if os.environ.get("SWEEP_CONCURRENCY"):
        overrides["sweep_concurrency"] = int(os.environ["SWEEP_CONCURRENCY"])
    return dev_settings(**overrides)


def _create(admin: Kube, n: int) -> float:
    def one(i: int) -> None:
        body = external_service(f"{PREFIX}{i:05d}", dnsName=f"svc{i:05d}.example.com")
        body["metadata"]["labels"] = {BENCH_LABEL: "sweep"}
        admin.request("POST", EXTERNAL_SERVICE.path(), body=body)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - start


def _delete_gateways(admin: Kube) -> None:
    for resource in GATEWAY_KINDS:
        delete_all(admin, resource.path(GATEWAY_NS), c.LABEL_GATEWAY)


def _cleanup(admin: Kube) -> None:
    """Every benchmark ExternalService and gateway object gone (finalizers released)."""
    items, _ = admin.list_all(EXTERNAL_SERVICE, label_selector=BENCH_LABEL)
    stuck = [i["metadata"]["name"] for i in items if i["metadata"].get("finalizers")]

    def release(name: str) -> None:
        admin.merge_patch(EXTERNAL_SERVICE, name, {"metadata": {"finalizers": None}})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(release, stuck))
    delete_all(admin, EXTERNAL_SERVICE.path(), BENCH_LABEL)
    _delete_gateways(admin)


# -- passes, each in a process of its own -------------------------------------------------------


def _reconciler_kube() -> Kube:
    return Kube(api_client_from_kubeconfig(os.environ["KUBECONFIG_RECONCILER"]))


def pass_ours(naive: bool) -> dict[str, Any]:
    """One sweep (or, naively, a reconcile with its own GETs per ExternalService)."""
    kube = _reconciler_kube()
    reconciler = build_reconciler(kube, _settings())
    start, cpu = time.perf_counter(), own_cpu_seconds()
    errors = 0
    if naive:
        names = [i["metadata"]["name"] for i in kube.list_all(EXTERNAL_SERVICE)[0]]
        results = [reconciler.reconcile(name) for name in names]
    else:
        report = reconciler.sweep()
        results = report.results
        errors = len(report.errors)
    wall, cpu = time.perf_counter() - start, own_cpu_seconds() - cpu
    outcomes = Counter(str(r.outcome) for r in results)
    return {
        "externalServices": len(results),
        "outcomes": dict(outcomes),
        "created": sum(1 for r in results for ch in r.changes if str(ch.action) == "create"),
        "errors": errors,
        "concurrency": reconciler.settings.sweep_concurrency,
        "clientRequests": kube.counters.snapshot(),
        "wallSeconds": round(wall, 3),
        "cpuSeconds": round(cpu, 1),
        "peakRssMiB": own_peak_rss_mib(),
    }


def pass_original(kind: str) -> dict[str, Any]:
    from bench import _original

    kube = _reconciler_kube()
    if kind == "new":
        out = _original.converge_new(kube, os.environ["ENVOY_IMAGE"], PREFIX)
    else:
        out = _original.restart_in_sync(kube, PREFIX)
    return {**out, "peakRssMiB": own_peak_rss_mib()}


PASSES = {
    "ours": lambda: pass_ours(naive=False),
    "ours-naive": lambda: pass_ours(naive=True),
    "original-new": lambda: pass_original("new"),
    "original-restart": lambda: pass_original("restart"),
}


def measured(admin: Kube, name: str) -> dict[str, Any]:
    """Run one pass in a fresh process; add what the API server counted meanwhile."""
    before, cpu = request_total(admin), cpu_seconds()
    out = subprocess.run(
        [sys.executable, "-m", "bench.sweep", "--pass", name],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        check=False,
    )
    after, cpu_after = request_total(admin), cpu_seconds()
    if out.returncode != 0:
        raise RuntimeError(f"pass {name} failed:\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["server"] = ours(before, after)
    result["serverCpu"] = {part: round(cpu_after[part] - cpu[part], 1) for part in cpu}
    return result


# -- reporting ----------------------------------------------------------------------------------


def _line(label: str, fig: dict[str, Any]) -> str:
    server = fig["server"]
    rss = f", peak RSS {fig['peakRssMiB']} MiB" if "peakRssMiB" in fig else ""
    throttled = f", {server['throttled429']} answered 429" if server["throttled429"] else ""
    parts = ", ".join(f"{part} {s:.1f}" for part, s in fig["serverCpu"].items())
    client = ""
    if "cpuSeconds" in fig:
        sent = sum(fig["clientRequests"].values())
        client = f"; client CPU {fig['cpuSeconds']:.1f} s, {sent} requests sent"
    return (
        f"{label}: {fig['wallSeconds']:.1f} s, {server['total']} requests "
        f"({verbs_text(server)}; {server['writes']} writes){throttled}{rss}; "
        f"server CPU {sum(fig['serverCpu'].values()):.1f} s ({parts}){client}"
    )


def _per_object_gets(fig: dict[str, Any], n: int) -> bool:
    """More GETs than a sweep's constant few (the DNS ConfigMap and the Corefile)."""
    return int(fig["server"]["byVerb"].get("GET", 0)) >= max(n, 10)


def compare(admin: Kube, n: int) -> list[str]:
    missed: list[str] = []
    print(f"setup: created {n} ExternalServices in {_create(admin, n):.1f} s")
    original = measured(admin, "original-new")
    print(_line(f"original, {n} new (one reconcile at a time, a POST per object)", original))
    restart = measured(admin, "original-restart")
    print(_line(f"original, restart over its {n} in sync (LISTs, a no-op PATCH each)", restart))
    _delete_gateways(admin)
    new = measured(admin, "ours")
    print(
        _line(f"ours, {n} new (one sweep, concurrency {new['concurrency']})", new)
        + f", {new['created']} objects created, errors {new['errors']}"
    )
    if _per_object_gets(new, n):
        missed.append(f"converge of {n} new: a GET per object")
    sweep = measured(admin, "ours")
    print(_line(f"ours, in-sync sweep over {n} (fresh process)", sweep))
    naive = measured(admin, "ours-naive")
    print(_line(f"ours, the same naively (a GET per object, {n})", naive))
    o, u = original["server"], new["server"]
    wall = new["wallSeconds"] / original["wallSeconds"]
    cpu = sum(new["serverCpu"].values()) / max(sum(original["serverCpu"].values()), 1e-9)
    print(
        f"ratio ours/original, {n} new: wall time x{wall:.2f} (target at most x0.50), "
        f"requests x{u['total'] / max(o['total'], 1):.2f}, "
        f"writes x{u['writes'] / max(o['writes'], 1):.2f}, server CPU x{cpu:.2f}"
    )
    print(
        f"ratio ours/original, {n} in sync: wall time "
        f"x{sweep['wallSeconds'] / restart['wallSeconds']:.2f}, requests "
        f"x{sweep['server']['total'] / max(restart['server']['total'], 1):.3f}, writes "
        f"{sweep['server']['writes']} vs {restart['server']['writes']}"
    )
    print(
        f"ratio naive/sweep: requests "
        f"x{naive['server']['total'] / max(sweep['server']['total'], 1):.0f}, wall time "
        f"x{naive['wallSeconds'] / max(sweep['wallSeconds'], 1e-9):.1f}"
    )
    for label, fig in (("in-sync sweep", sweep), ("naive pass", naive)):
        if fig["server"]["writes"]:
            missed.append(f"{label}: {fig['server']['writes']} writes")
    return missed


def scale(admin: Kube, n: int) -> list[str]:
    missed: list[str] = []
    print(f"scale setup: created {n} ExternalServices in {_create(admin, n):.1f} s")
    new = measured(admin, "ours")
    print(
        _line(f"ours, {n} new (one sweep, concurrency {new['concurrency']})", new)
        + f", {new['created']} objects created, errors {new['errors']}, "
        f"{new['server']['writes'] / new['wallSeconds']:.0f} writes/s"
    )
    if _per_object_gets(new, n):
        missed.append(f"converge of {n} new: a GET per object")
    sweep = measured(admin, "ours")
    server = sweep["server"]
    print(
        _line(f"ours, in-sync sweep over {n} (fresh process)", sweep)
        + f"; targets: at most {SCALE_MAX_REQUESTS} requests, 0 writes, "
        f"peak RSS at most {SCALE_MAX_RSS_MIB:.0f} MiB"
    )
    if server["total"] > SCALE_MAX_REQUESTS:
        missed.append(f"in-sync sweep over {n}: {server['total']} requests")
    if server["writes"]:
        missed.append(f"in-sync sweep over {n}: {server['writes']} writes")
    if sweep["peakRssMiB"] > SCALE_MAX_RSS_MIB:
        missed.append(f"in-sync sweep over {n}: peak RSS {sweep['peakRssMiB']} MiB")
    return missed


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--pass":
        emit(PASSES[sys.argv[2]]())
        return 0
    n = int(os.environ.get("BENCH_N", "1000"))
    scale_n = int(os.environ.get("BENCH_SCALE_N", "10000"))
    with bench_stack() as env:
        os.environ.update(env)
        # Collection deletes of thousands of objects take longer than a request's usual 30 s.
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]), timeout_s=600)
        load = Path("/proc/loadavg").read_text().split()[0]
        print(f"machine: {os.cpu_count()} CPUs, load average {load} at the start")
        _cleanup(admin)
        missed: list[str] = []
        with node_paused() as stopped:
            print(f"paused on the bench stack: {', '.join(stopped) or 'nothing'}")
            try:
                if n:
                    missed += compare(admin, n)
                    _cleanup(admin)
                if scale_n:
                    missed += scale(admin, scale_n)
            finally:
                _cleanup(admin)
        for what in missed:
            print(f"MISSED: {what}")
        return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
