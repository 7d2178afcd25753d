"""Benchmark: sweeps over 1,000 ExternalServices on the real local control plane.

Prints, for N ExternalServices (default 1,000; BENCH_N to change):
- convergence of N new ones by one sweep: wall time, objects per second, requests;
- a sweep over N in-sync ones: API requests, writes (must be 0), wall time, peak RSS;
- the same in-sync pass done naively, a GET per object (what a per-object reconcile does),
  with the ratios of requests and wall time.
Each in-sync pass runs in a fresh process, as a function instance would, so its peak RSS is
its own.

Run: `make bench` (or `.venv/bin/python -m bench.sweep`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.stack import REPO, bench_stack
from core import constants as c
from core.kube import EXTERNAL_SERVICE, GATEWAY_KINDS, Kube, api_client_from_kubeconfig
from core.settings import Settings
from reconcile.app import build_reconciler
from reconcile.controller import Outcome
from tests.integration.helpers import create_es, dev_settings, external_service

PREFIX = "bench-"
GATEWAY_NS = "egress-operator-system"


def _settings() -> Settings:
    # The dev node's Envoy image (bench_stack exports the env), and a node selector no node
    # matches: this measures the reconciler against the API server, not 1,000 gateway pods
    # competing for the node's 2 CPUs (bench.node measures pods).
    return dev_settings(
        delete_grace_s=0,
        sweep_concurrency=int(os.environ.get("SWEEP_CONCURRENCY", "4")),
        node_selector_key="egress.dev/bench-no-node",
        node_selector_value="none",
    )


def _create(admin: Kube, n: int) -> None:
    def one(i: int) -> None:
        create_es(admin, external_service(f"{PREFIX}{i:04d}", dnsName=f"svc{i:04d}.example.com"))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(n)))


def _cleanup(admin: Kube) -> None:
    items, _ = admin.list_all(EXTERNAL_SERVICE)
    for item in items:
        name = item["metadata"]["name"]
        if name.startswith(PREFIX):
            admin.merge_patch(EXTERNAL_SERVICE, name, {"metadata": {"finalizers": None}})
            admin.delete(EXTERNAL_SERVICE, name)
    for resource_ in GATEWAY_KINDS:
        admin.request(
            "DELETE", resource_.path(GATEWAY_NS), query=[("labelSelector", c.LABEL_GATEWAY)]
        )


def one_pass(naive: bool) -> dict[str, Any]:
    """A single in-sync pass in this process (called in a subprocess)."""
    kube = Kube(api_client_from_kubeconfig(os.environ["KUBECONFIG_RECONCILER"]))
    reconciler = build_reconciler(kube, _settings())
    start = time.perf_counter()
    if naive:
        names = [i["metadata"]["name"] for i in kube.list_all(EXTERNAL_SERVICE)[0]]
        outcomes = [reconciler.reconcile(name).outcome for name in names]
    else:
        report = reconciler.sweep()
        outcomes = [r.outcome for r in report.results]
    wall = time.perf_counter() - start
    return {
        "externalServices": len(outcomes),
        "inSync": outcomes.count(Outcome.IN_SYNC),
        "requests": kube.counters.total,
        "writes": kube.counters.writes,
        "wallSeconds": round(wall, 3),
        "peakRssMiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _subprocess_pass(env: dict[str, str], naive: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.sweep", "--pass", "naive" if naive else "sweep"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--pass":
        print(json.dumps(one_pass(sys.argv[2] == "naive")))
        return 0
    n = int(os.environ.get("BENCH_N", "1000"))
    with bench_stack() as env:
        os.environ.update(env)
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
        _cleanup(admin)
        t = time.perf_counter()
        _create(admin, n)
        print(f"setup: created {n} ExternalServices in {time.perf_counter() - t:.1f} s")

        kube = Kube(api_client_from_kubeconfig(env["KUBECONFIG_RECONCILER"]))
        reconciler = build_reconciler(kube, _settings())
        t = time.perf_counter()
        report = reconciler.sweep()
        wall = time.perf_counter() - t
        objects = sum(1 for ch in report.drift if ch.action == "create")
        print(
            f"converge {n} new (one sweep, concurrency {reconciler.settings.sweep_concurrency}): "
            f"{wall:.1f} s, {objects} objects created, {objects / wall:.0f} objects/s, "
            f"{n / wall:.1f} ExternalServices/s, {kube.counters.total} requests "
            f"({kube.counters.writes} writes), errors {len(report.errors)}"
        )
        sweep = _subprocess_pass(env, naive=False)
        naive = _subprocess_pass(env, naive=True)
        for label, fig in (
            ("in-sync sweep (LIST per kind)", sweep),
            ("in-sync naive (GET per object)", naive),
        ):
            print(
                f"{label}: {fig['externalServices']} ExternalServices ({fig['inSync']} in sync), "
                f"{fig['requests']} requests, {fig['writes']} writes, {fig['wallSeconds']:.2f} s, "
                f"peak RSS {fig['peakRssMiB']} MiB"
            )
        print(
            f"ratio naive/sweep: requests x{naive['requests'] / max(sweep['requests'], 1):.0f}, "
            f"wall time x{naive['wallSeconds'] / max(sweep['wallSeconds'], 1e-9):.1f}"
        )
        _cleanup(admin)
        return 0 if sweep["writes"] == 0 and naive["writes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
