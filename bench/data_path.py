"""Benchmark: what a client pod on the dev node sees, with the kubelet's default sync (60 s).

Prints:
- gateway Ready -> first answer with the gateway's ClusterIP in a client pod, p50/p95 over
  BENCH_DATA_PATH_N (default 10) gateways; the reconciler runs as soon as the Deployment shows
  a Ready pod (as on the exporter's notice), writes the rule and nudges the CoreDNS pods;
- ExternalService deleted -> the client pod's answer is the real address again, p50/p95;
- the first figure again with NUDGE_COREDNS_PODS off, over BENCH_DATA_PATH_BASELINE_N (default
  3; the kubelet's own sync, about a minute each) gateways, as a ratio;
- requests failed during each change of the zero-outage scenario (tests/integration/changes.py:
  add a port, roll, hand edit, sweep repair, delete), with the request rate;
- throughput of one gateway pod: requests per second and p99 latency for one-line requests over
  BENCH_CONNS (default 64) persistent connections from a client pod, through the gateway's
  ClusterIP and straight to the upstream in the same run, and their ratio. Client, Envoy and
  upstream share the machine's cores, so the ratio is the figure to compare.

Run: `make bench` (or `.venv/bin/python -m bench.data_path`). Uses its own stack (.cache/dev-bench).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from bench._common import percentile
from bench.stack import REPO, bench_stack
from core import constants as c
from core.kube import DEPLOYMENT, EXTERNAL_SERVICE, SERVICE, Kube, api_client_from_kubeconfig
from reconcile.app import build_reconciler
from reconcile.controller import Reconciler
from reconcile.results import Outcome
from tests.integration.changes import run_changes
from tests.integration.helpers import (
    GATEWAY_NS,
    boot_clock,
    create_es,
    dev_settings,
    eventually,
    external_service,
    kubectl,
    purge,
    run_pod,
    serve_offline_name,
)

CLIENT_NS = "bench-data-path"


def _ready_replicas(admin: Kube, name: str) -> int:
    dep = admin.get(DEPLOYMENT, name, GATEWAY_NS) or {}
    return int((dep.get("status") or {}).get("readyReplicas") or 0)


class AnswerWatch:
    """A loop inside the client pod that asks cluster DNS for a name until the answer does (or,
    with ``absent``, no longer does) contain ``ip``, then notes the time (boot clock)."""

    def __init__(self, dns_name: str, ip: str, absent: bool = False) -> None:
        self.file = f"/tmp/answer-{uuid.uuid4().hex[:8]}"
        test = f'nslookup {dns_name} 2>/dev/null | grep -q "{ip}$"'
        cond = test if absent else f"! {{ {test}; }}"
        script = (
            f"( while {cond}; do sleep 0.1; done; read up _ < /proc/uptime; echo $up ) "
            f"> {self.file} 2>&1 < /dev/null &"
        )
        res = kubectl("exec", "-n", CLIENT_NS, "client", "--", "sh", "-c", script)
        assert res.returncode == 0, res.stderr

    def at(self) -> float:
        def done() -> float | None:
            out = kubectl("exec", "-n", CLIENT_NS, "client", "--", "cat", self.file).stdout
            return float(out.split()[0]) if out.strip() else None

        return eventually(done, 300, "the client pod's answer to change")


def dns_timings(
    admin: Kube, reconciler: Reconciler, env: dict[str, str], n: int, restore: bool = True
) -> tuple[list[float], list[float]]:
    to_hijack: list[float] = []
    to_restored: list[float] = []
    for i in range(n):
        name = f"bdp-{i:02d}-{uuid.uuid4().hex[:4]}"
        dns_name = serve_offline_name(env, f"{name}.offline.test")
        try:
            create_es(admin, external_service(name, dnsName=dns_name, hijackDns=True))
            reconciler.reconcile(name)
            service = admin.get(SERVICE, name, GATEWAY_NS)
            assert service is not None
            cluster_ip = service["spec"]["clusterIP"]
            hijack = AnswerWatch(dns_name, cluster_ip)
            eventually(lambda: _ready_replicas(admin, name) >= 1, 180, f"{name}: a Ready pod")  # noqa: B023
            ready_at = boot_clock()
            assert reconciler.reconcile(name).hijack_state == "true"
            to_hijack.append(hijack.at() - ready_at)
            if not restore:
                continue
            restored = AnswerWatch(dns_name, cluster_ip, absent=True)
            deleted_at = boot_clock()
            admin.delete(EXTERNAL_SERVICE, name)
            assert reconciler.reconcile(name).outcome == Outcome.DELETING
            to_restored.append(restored.at() - deleted_at)
        finally:
            purge(admin, name)
    return to_hijack, to_restored


def _pod_netns_pid(marker: str) -> int:
    """PID of the client pod's main process (found by its unique command line)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes() == f"sleep\0{marker}\0".encode():
                    return int(proc.name)
            except OSError:
                continue
    raise SystemExit(f"client pod process 'sleep {marker}' not found")


def load(pid: int, host: str, port: int, conns: int, seconds: float) -> dict[str, Any]:
    res = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-m", "bench._loadgen",
         "--host", host, "--port", str(port), "--conns", str(conns), "--seconds", str(seconds)],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=seconds + 120,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(res.stdout)
    return result


def throughput(
    admin: Kube, reconciler: Reconciler, env: dict[str, str], marker: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    conns = int(os.environ.get("BENCH_CONNS", "64"))
    seconds = float(os.environ.get("BENCH_LOAD_S", "10"))
    port = int(env["EGRESS_DEV_UPSTREAM_TCP_PORT"])
    name = f"bdp-load-{uuid.uuid4().hex[:4]}"
    kubectl("label", "pod", "-n", CLIENT_NS, "client", f"{c.GRANT_LABEL_GATEWAY}={name}")
    dns_name = serve_offline_name(env, f"{name}.offline.test")
    try:
        spec = {"dnsName": dns_name, "minReplicas": 1, "maxReplicas": 1, "ports": [{"port": port}]}
        create_es(admin, external_service(name, **spec))
        reconciler.reconcile(name)
        eventually(lambda: _ready_replicas(admin, name), 180, f"{name} to have a Ready pod")
        service = admin.get(SERVICE, name, GATEWAY_NS)
        assert service is not None
        pid = _pod_netns_pid(marker)
        # The grant label is new: wait until the gateway's NetworkPolicy admits the pod.
        eventually(
            lambda: load(pid, service["spec"]["clusterIP"], port, 1, 0.2)["requests"],
            60,
            "the new grant to take effect",
        )
        via = load(pid, service["spec"]["clusterIP"], port, conns, seconds)
        direct = load(pid, env["EGRESS_DEV_UPSTREAM_IP"], port, conns, seconds)
        return via, direct
    finally:
        purge(admin, name)


def main() -> int:
    n = int(os.environ.get("BENCH_DATA_PATH_N", "10"))
    with bench_stack() as env:
        from kubernetes import config

        k8s = config.new_client_from_config(config_file=env["KUBECONFIG"])
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
        kube = Kube(api_client_from_kubeconfig(env["KUBECONFIG_RECONCILER"]))
        settings = dev_settings(coredns_import_path=env["COREDNS_IMPORT_PATH"])
        reconciler = build_reconciler(kube, settings)
        kubectl("delete", "namespace", CLIENT_NS, "--wait=true", timeout=120)
        kubectl("create", "namespace", CLIENT_NS)
        marker = str(random.randint(100000, 999999))
        run_pod(k8s, CLIENT_NS, "client", env["EGRESS_DEV_CLIENT_IMAGE"], ["sleep", marker])
        try:
            to_hijack, to_restored = dns_timings(admin, reconciler, env, n)

            def fmt(values: list[float]) -> str:
                return f"p50 {percentile(values, 50):.2f} s, p95 {percentile(values, 95):.2f} s"

            sync = os.environ.get("EGRESS_DEV_KUBELET_SYNC_S", "60")
            print(
                f"gateway Ready -> first hijacked answer in a client pod ({n} gateways): "
                f"{fmt(to_hijack)} (kubelet sync {sync} s, CoreDNS pods nudged, reload 2s)"
            )
            print(f"ExternalService deleted -> real address again in the pod ({n}): "
                  f"{fmt(to_restored)}")  # fmt: skip
            baseline_n = int(os.environ.get("BENCH_DATA_PATH_BASELINE_N", "3"))
            if baseline_n:
                quiet = build_reconciler(
                    kube, dataclasses.replace(settings, nudge_coredns_pods=False)
                )
                slow, _ = dns_timings(admin, quiet, env, baseline_n, restore=False)
                print(
                    f"the same without the nudge ({baseline_n} gateways): {fmt(slow)}: the nudge "
                    f"is {percentile(slow, 50) / percentile(to_hijack, 50):.0f}x faster at p50"
                )
            run = run_changes(
                k8s, admin, build_reconciler(kube, dev_settings(
                    delete_grace_s=15, coredns_import_path=env["COREDNS_IMPORT_PATH"])),
                env, CLIENT_NS, f"bdp-zo-{uuid.uuid4().hex[:4]}",
            )  # fmt: skip
            print(f"requests failed during changes (one gateway pod): {run.summary()}")
            via, direct = throughput(admin, reconciler, env, marker)
            conns = os.environ.get("BENCH_CONNS", "64")
            print(
                f"one gateway pod, {conns} connections, one-line requests: "
                f"{via['rps']:.0f} req/s, p99 {via['p99_ms']:.1f} ms, {via['errors']} errors "
                f"{via['first_errors'] or ''}; "
                f"upstream directly: {direct['rps']:.0f} req/s, p99 {direct['p99_ms']:.1f} ms; "
                f"gateway/direct: throughput {via['rps'] / direct['rps']:.2f}x, "
                f"p99 {via['p99_ms'] / max(direct['p99_ms'], 1e-9):.2f}x"
            )
        finally:
            kubectl("delete", "namespace", CLIENT_NS, "--wait=false")
    return 0


if __name__ == "__main__":
    sys.exit(main())
