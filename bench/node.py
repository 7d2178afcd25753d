"""Benchmark: the dev node, and gateways on it carrying real traffic.

Prints:
- warm `dev up` of a fresh stack with its node (binaries and images cached), with the moment
  each part turned healthy, and `dev down`;
- over BENCH_NODE_N (default 20) new ExternalServices, one after another: the time from
  creating it to its first Ready gateway pod, and to the first byte through the gateway by its
  real name from a client pod (the reply names the gateway pod as the peer, so a direct answer
  from the upstream does not count), p50/p95;
- real Envoy memory (RSS of PID 1 in each gateway pod) right after its first request.

Run: `make bench` (or `.venv/bin/python -m bench.node`). Uses its own stack (.cache/dev-bench).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench._common import percentile
from bench.stack import REPO, bench_stack
from core import constants as c
from core.kube import DEPLOYMENT, Kube, api_client_from_kubeconfig
from reconcile.app import build_reconciler
from tests.integration.helpers import (
    GATEWAY_NS,
    create_es,
    dev_settings,
    eventually,
    gateway_pods,
    kubectl,
    purge,
    run_pod,
    serve_offline_name,
    sh,
)

PREFIX = "benchnode-"
CLIENT_NS = "bench-node"


def dev(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "egressctl", "dev", *args],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return time.perf_counter() - t0, res


def bench_start() -> None:
    os.environ.setdefault("EGRESS_DEV_DIR", str(REPO / ".cache" / "dev-bench"))
    dev("down")
    took, res = dev("up")
    if res.returncode != 0:
        raise SystemExit(f"dev up failed:\n{res.stderr[-3000:]}")
    state = json.loads((Path(os.environ["EGRESS_DEV_DIR"]) / "state.json").read_text())
    t = state["timings"]
    print(
        f"warm dev up with the node: {took:.1f} s in all; from the first process: node Ready "
        f"{t.get('kubelet', 0):.1f} s, images imported {t.get('images-imported', 0):.1f} s, "
        f"cluster DNS answering {t.get('cluster-dns', 0):.1f} s, everything {t.get('up', 0):.1f} s"
    )


def client_pod(names: list[str], image: str, kubeconfig: str) -> str:
    """A client pod granted for every benchmark gateway; returns its IP."""
    from kubernetes import config

    k8s = config.new_client_from_config(config_file=kubeconfig)
    kubectl("create", "namespace", CLIENT_NS)
    labels = {c.GRANT_LABEL_PREFIX + n: "true" for n in names}
    pod = run_pod(k8s, CLIENT_NS, "client", image, ["sleep", "86400"], labels=labels)
    return str(pod["status"]["pod_ip"])


def main() -> int:
    n = int(os.environ.get("BENCH_NODE_N", "20"))
    bench_start()
    with bench_stack() as env:
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
        kube = Kube(api_client_from_kubeconfig(env["KUBECONFIG_RECONCILER"]))
        settings = dev_settings(delete_grace_s=0, coredns_import_path=env["COREDNS_IMPORT_PATH"])
        reconciler = build_reconciler(kube, settings)
        names = [f"{PREFIX}{i:02d}" for i in range(n)]
        dns_names = {name: serve_offline_name(env, f"{name}.offline.test") for name in names}
        client_ip = client_pod(names, env["EGRESS_DEV_CLIENT_IMAGE"], env["KUBECONFIG"])
        tcp = env["EGRESS_DEV_UPSTREAM_TCP_PORT"]
        to_ready: list[float] = []
        to_byte: list[float] = []
        rss_mib: list[float] = []
        for name in names:
            t0 = time.perf_counter()
            spec = {
                "dnsName": dns_names[name], "hijackDns": True, "minReplicas": 1,
                "maxReplicas": 1, "ports": [{"port": int(tcp)}],
            }  # fmt: skip
            create_es(admin, {"apiVersion": c.API_VERSION, "kind": c.KIND,
                              "metadata": {"name": name}, "spec": spec})  # fmt: skip

            def ready(name: str = name) -> bool:
                reconciler.reconcile(name)
                dep = admin.get(DEPLOYMENT, name, GATEWAY_NS) or {}
                return int((dep.get("status") or {}).get("readyReplicas") or 0) >= 1

            eventually(ready, 180, f"{name} to have a Ready pod")
            to_ready.append(time.perf_counter() - t0)
            reconciler.reconcile(name)  # hijack state true: the DNS rule is written now
            script = (
                f"while :; do out=$(echo hi | nc -w 1 {dns_names[name]} {tcp} 2>/dev/null); "
                f'case "$out" in *upstream*) case "$out" in *peer={client_ip}:*) ;; '
                f'*) echo "$out"; exit 0;; esac;; esac; sleep 0.05; done'
            )
            res = sh(CLIENT_NS, "client", script, timeout=120)
            assert res.returncode == 0 and "upstream" in res.stdout, res
            to_byte.append(time.perf_counter() - t0)
            pod = gateway_pods(admin, name)[0]["metadata"]["name"]
            status = kubectl(
                "exec", "-n", GATEWAY_NS, pod, "--", "cat", "/proc/1/status", timeout=120
            )
            for line in status.stdout.splitlines():
                if line.startswith("VmRSS:"):
                    rss_mib.append(int(line.split()[1]) / 1024)
            purge(admin, name)
            reconciler.reconcile(name)
        kubectl("delete", "namespace", CLIENT_NS, "--wait=false")

        def fmt(values: list[float]) -> str:
            return f"p50 {percentile(values, 50):.2f} s, p95 {percentile(values, 95):.2f} s"

        print(f"new ExternalService -> first Ready gateway pod ({n} services): {fmt(to_ready)}")
        print(
            f"new ExternalService -> first byte through the gateway by its real name ({n}): "
            f"{fmt(to_byte)} (includes the DNS rule reaching the client: CoreDNS pods nudged, "
            f"reload 2s; kubelet sync {os.environ.get('EGRESS_DEV_KUBELET_SYNC_S', '60')} s)"
        )
        if rss_mib:
            print(
                f"Envoy RSS per gateway pod after its first request: p50 "
                f"{percentile(rss_mib, 50):.1f} MiB, max {max(rss_mib):.1f} MiB"
            )
    if os.environ.get("EGRESS_DEV_KEEP") != "1":
        took, _ = dev("down")
        print(f"dev down (node included): {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
