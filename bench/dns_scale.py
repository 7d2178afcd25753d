"""Benchmark: cluster DNS at 10,000 hijacked names, on the local node's real CoreDNS.

10,000 rules are more than one ConfigMap holds (about 9,000), so delivery spreads them over
several (dns.render, dns.delivery), which CoreDNS mounts as optional sources of one projected
volume. Prints, with ~10 rules as the baseline and the ratio of each figure:
- rendering 10,000 names (BENCH_DNS_SCALE_N to change) into 8 ConfigMaps, and into 1 (as before:
  how many are refused);
- delivery of them to the API server: time, requests, ConfigMaps written and their sizes;
- the in-cluster CoreDNS (its process on the node): resident memory (VmRSS) and its peak
  (VmHWM) once it serves them; query latency for a hijacked and a forwarded name; the time
  from a ConfigMap write to CoreDNS logging its reload ("Running configuration SHA512", from the
  container log's timestamps) and to the first answer with the new rule, adding one name at a
  time;
- the same CoreDNS binary run on its own with the rules in a directory: start-up (parse and
  set-up of the whole configuration, which is the work of a reload) and its resident memory,
  and the time from a changed file to its reload with ``reload 2s``.

Synthetic claims stand for the 10,000 gateways (their Services would also load CoreDNS's
Service cache, which is not what is measured here); a few real probe Services, one per
ConfigMap in use, answer with their ClusterIPs.

Run: `make bench` (or `.venv/bin/python -m bench.dns_scale`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dnslib import QTYPE, DNSRecord

from bench._common import percentile, rss_kb
from bench.stack import bench_stack
from core import constants as c
from core.kube import CONFIGMAP, POD, SERVICE, Kube, Obj, api_client_from_kubeconfig
from core.settings import Settings
from dns.delivery import SETTLE_AFTER_S, DnsDelivery
from dns.render import Claim, render, rules_only, shard_of
from tests.integration.helpers import create_hijacked_service, dev_settings

NS = "egress-operator-system"
DOMAIN = "cluster.local"
RELOAD_LINE = "Running configuration SHA512"
MOUNT = "/etc/coredns/egress-gateways"


def _synthetic(n: int, tag: str) -> list[Obj]:
    """Service objects as the lister returns them, for n hijacked gateways (none exists)."""
    return [
        {
            "metadata": {
                "name": f"scale-{i:05d}",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {c.LABEL_GATEWAY: f"scale-{i:05d}", c.LABEL_HIJACK_DNS: "true"},
                "annotations": {c.ANNOTATION_DNS_NAME: f"svc-{i:05d}-{tag}.scale.example.com"},
            }
        }
        for i in range(n)
    ]


class Scaled(DnsDelivery):
    """Delivery as the reconciler runs it, with synthetic gateways added to the listed ones."""

    def __init__(self, settings: Settings, extra: list[Obj]) -> None:
        super().__init__(settings)
        self.extra = extra

    def _services(self, kube: Kube) -> list[Obj]:
        return super()._services(kube) + self.extra


def bench_render(n: int) -> None:
    claims = [
        Claim("2026-01-01T00:00:00Z", f"scale-{i:05d}", f"svc-{i:05d}-x.scale.example.com")
        for i in range(n)
    ]
    for shards in (8, 1):
        timings = []
        for _ in range(3):
            t = time.perf_counter()
            out = render(claims, NS, DOMAIN, shards)
            timings.append(time.perf_counter() - t)
        sizes = [sum(len(v) for v in data.values()) for data in out.shards]
        print(
            f"render {n} names into {shards} ConfigMap(s): "
            f"{statistics.median(timings) * 1000:.0f} ms (median of 3), {len(out.rules)} rules, "
            f"{len(out.refused)} refused; KiB per ConfigMap: "
            + ", ".join(f"{s / 1024:.0f}" for s in sizes)
        )


# -- the in-cluster CoreDNS -------------------------------------------------------------------


def _coredns_pod(admin: Kube) -> Obj:
    pods, _ = admin.list_all(POD, "kube-system", label_selector="k8s-app=kube-dns")
    running = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running"
        and not p["metadata"].get("deletionTimestamp")
    ]
    assert len(running) == 1, f"expected one CoreDNS pod, found {len(running)}"
    return running[0]


def _restart_coredns() -> None:
    """A fresh CoreDNS process, so that the baseline's memory is not an earlier run's."""
    for args in (
        ["rollout", "restart", "deployment/coredns"],
        ["rollout", "status", "deployment/coredns", "--timeout=180s"],
    ):
        subprocess.run(["kubectl", "-n", "kube-system", *args], capture_output=True, check=True)


def _pid_of(pod: Obj) -> int:
    """The CoreDNS process of this pod on the node: the one, in a mount namespace of its own
    (the offline internet's DNS is a CoreDNS on the host), whose /etc/coredns/egress-gateways is
    the pod's rules volume (the same tmpfs, by device, as the kubelet's mount of it)."""
    uid = pod["metadata"]["uid"]
    volume = f"/pods/{uid}/volumes/kubernetes.io~projected/egress-gateways"
    host_mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    devices = {line.split()[2] for line in host_mounts if line.split()[4].endswith(volume)}
    host = os.readlink("/proc/self/ns/mnt")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (proc / "comm").read_text().strip() != "coredns":
                continue
            if os.readlink(proc / "ns" / "mnt") == host:
                continue
            for line in (proc / "mountinfo").read_text().splitlines():
                fields = line.split()
                if fields[4] == MOUNT and fields[2] in devices:
                    return int(proc.name)
    raise SystemExit(f"no coredns process mounts the rules volume of pod {uid}")


def _reloads(pod: Obj, since: dt.datetime) -> list[tuple[dt.datetime, dt.datetime]]:
    """(start, end) of each reload CoreDNS logged since then ("Reloading", then "Reloading
    complete" once the new configuration serves), by the container log's timestamps (the
    kubelet's, nanoseconds; the same clock as ours: one machine)."""
    res = subprocess.run(
        ["kubectl", "logs", "-n", "kube-system", pod["metadata"]["name"], "--timestamps",
         f"--since-time={since.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out, start = [], None
    for line in res.stdout.splitlines():
        stamp, _, text = line.partition(" ")
        at = dt.datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00")
        if text.endswith("[INFO] Reloading"):
            start = at
        elif text.endswith("[INFO] Reloading complete") and start is not None:
            out.append((start, at))
            start = None
    return out


TIMEOUTS = {"count": 0}  # queries unanswered within their timeout (while CoreDNS reloads, say)


def _ask(addr: str, name: str, timeout: float = 1.0) -> list[str]:
    host, port = addr.rsplit(":", 1)
    try:
        packet = DNSRecord.question(name, "A").send(host, int(port), timeout=timeout)
    except TimeoutError:
        TIMEOUTS["count"] += 1
        return []
    reply = DNSRecord.parse(packet)
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def _all_answer(addr: str, probes: dict[str, str]) -> bool:
    return all(_ask(addr, name, 0.5) == [ip] for name, ip in probes.items())


def _query_ms(addr: str, name: str, count: int = 200) -> float:
    """p50 of ``count`` queries (after a warm-up, each answered before the next is sent)."""
    for _ in range(5):
        _ask(addr, name)
    times = []
    for _ in range(count):
        t = time.perf_counter()
        _ask(addr, name)
        times.append((time.perf_counter() - t) * 1000)
    return percentile(times, 50)


def _probe(admin: Kube, name: str, dns_name: str) -> str:
    created = create_hijacked_service(admin, name, dns_name, labels={"bench": "dns-scale"})
    return str(created["spec"]["clusterIP"])


def _await(check: Any, what: str, timeout: float = 180.0) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return time.perf_counter() - start


def _add_one(
    admin: Kube, kube: Kube, delivery: DnsDelivery, addr: str, pod: Obj, round_: int, tag: str
) -> tuple[float, float | None, int]:
    """A new real gateway name: (write -> first answer s, the reload's own duration s, ConfigMaps
    written)."""
    name = f"scale-new-{tag}-{round_}"
    dns_name = f"{name}.scale.example.com"
    ip = _probe(admin, name, dns_name)
    writes_before = _configmap_writes(kube)
    started_at = dt.datetime.now(dt.UTC)
    report = delivery.sync(kube)
    assert report.written, report.to_dict()
    start = time.perf_counter()
    _await(lambda: _ask(addr, dns_name, 0.5) == [ip], f"{dns_name} -> {ip}")
    answered = time.perf_counter() - start
    deadline = time.monotonic() + 10
    reloads: list[tuple[dt.datetime, dt.datetime]] = []
    while not reloads and time.monotonic() < deadline:
        reloads = [r for r in _reloads(pod, started_at) if r[0] >= started_at]
        if not reloads:
            time.sleep(0.2)
    took = (reloads[0][1] - reloads[0][0]).total_seconds() if reloads else None
    return answered, took, _configmap_writes(kube) - writes_before


def _configmap_writes(kube: Kube) -> int:
    return sum(
        n
        for (method, path), n in kube.counters.calls.items()
        if method in ("PUT", "POST") and "/configmaps" in path
    )


def bench_cluster(env: dict[str, str], n: int, rounds: int) -> dict[str, float]:
    admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
    kube = Kube(api_client_from_kubeconfig(env["KUBECONFIG_RECONCILER"]))
    settings = dev_settings(coredns_import_path=env["COREDNS_IMPORT_PATH"])
    addr = env["COREDNS_ADDR"]
    tag = str(int(time.time()))
    figures: dict[str, float] = {}
    shards = settings.dns_configmap_shards
    _restart_coredns()
    try:
        for label, extra in (("baseline", []), ("scaled", _synthetic(n, tag))):
            # New real probes, one per ConfigMap the rules spread over: answering them needs
            # this phase's write.
            probes: dict[str, str] = {}
            k = 0
            while len(probes) < shards - 1:
                dns_name = f"probe{k}-{label}-{tag}.scale.example.com"
                if shard_of(dns_name, shards) not in {shard_of(p, shards) for p in probes}:
                    probes[dns_name] = _probe(admin, f"probe-{k}-{label}-{tag}", dns_name)
                k += 1
            delivery = Scaled(settings, extra)
            t = time.perf_counter()
            requests = kube.counters.total
            writes = _configmap_writes(kube)
            report = delivery.sync(kube)
            wall = time.perf_counter() - t
            rules = len(report.rendered.rules)
            sizes = [
                sum(len(v) for v in rules_only(
                    (admin.get(CONFIGMAP, name, "kube-system") or {}).get("data") or {}
                ).values())
                for name in settings.dns_configmap_names
            ]  # fmt: skip
            print(
                f"[{label}] deliver {rules} rules: {wall * 1000:.0f} ms, "
                f"{kube.counters.total - requests} requests, "
                f"{_configmap_writes(kube) - writes} ConfigMap writes; KiB per ConfigMap: "
                + ", ".join(f"{s / 1024:.0f}" for s in sizes)
            )
            waited = _await(
                functools.partial(_all_answer, addr, probes),
                "every probe to answer",
            )
            print(f"[{label}] every probe answers {waited:.2f} s after the write")
            # Settle (as the sweep would once quiet), then let the reload finish.
            time.sleep(SETTLE_AFTER_S + 0.5)
            assert delivery.sync(kube).settled
            _await(
                functools.partial(_all_answer, addr, probes),
                "answers after the settle",
            )
            time.sleep(5)  # two reload ticks: the settle's reload has finished
            pod = _coredns_pod(admin)
            pid = _pid_of(pod)
            rss, hwm = rss_kb(pid)
            hijacked = _query_ms(addr, next(iter(probes)))
            forwarded = _query_ms(addr, "api.example.com")
            missing = _query_ms(addr, "nothing-here.example.org")
            figures.update(
                {
                    f"{label}_rules": rules,
                    f"{label}_rss_kib": rss,
                    f"{label}_hwm_kib": hwm,
                    f"{label}_q_hijacked_ms": hijacked,
                    f"{label}_q_forwarded_ms": forwarded,
                    f"{label}_q_nxdomain_ms": missing,
                }
            )
            print(
                f"[{label}] CoreDNS pid {pid}: VmRSS {rss / 1024:.1f} MiB, VmHWM "
                f"{hwm / 1024:.1f} MiB; query p50: hijacked {hijacked:.2f} ms, forwarded "
                f"{forwarded:.2f} ms, NXDOMAIN {missing:.2f} ms"
            )
            answers, reloads, writes_per = [], [], []
            TIMEOUTS["count"] = 0
            for r in range(rounds):
                answered, reload_s, written = _add_one(
                    admin, kube, delivery, addr, pod, r, f"{label}-{tag}"
                )
                answers.append(answered)
                writes_per.append(written)
                if reload_s is not None:
                    reloads.append(reload_s)
            figures[f"{label}_answer_p50_s"] = statistics.median(answers)
            figures[f"{label}_reload_p50_s"] = statistics.median(reloads) if reloads else -1
            print(
                f"[{label}] one more name, over {rounds} rounds: CoreDNS reload (Reloading -> "
                "Reloading complete) "
                + (
                    f"p50 {statistics.median(reloads):.2f} s max {max(reloads):.2f} s"
                    if reloads
                    else "(no reload line seen)"
                )
                + f"; write -> first answer p50 {statistics.median(answers):.2f} s "
                f"max {max(answers):.2f} s; ConfigMaps written per name: {max(writes_per)}; "
                f"polling queries unanswered within 0.5 s: {TIMEOUTS['count']}"
            )
            rss, hwm = rss_kb(pid)
            figures[f"{label}_hwm_after_kib"] = hwm
            print(
                f"[{label}] after those reloads: VmRSS {rss / 1024:.1f} MiB, "
                f"VmHWM {hwm / 1024:.1f} MiB"
            )
    finally:
        admin.request("DELETE", SERVICE.path(NS), query=[("labelSelector", "bench=dns-scale")])
        DnsDelivery(settings).sync(kube)
    return figures


# -- the CoreDNS binary on its own ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_rules(folder: Path, n: int, tag: str) -> None:
    for old in folder.glob("*.override"):
        old.unlink()
    claims = [
        Claim("2026-01-01T00:00:00Z", f"scale-{i:05d}", f"svc-{i:05d}-{tag}.scale.example.com")
        for i in range(n)
    ]
    for key, text in render(claims, NS, DOMAIN, 8).data.items():
        (folder / key).write_text(text)


def _start(binary: Path, corefile: Path, folder: Path) -> tuple[subprocess.Popen[str], float]:
    """Start CoreDNS on a free port; (the process, seconds until it logged its running
    configuration)."""
    corefile.write_text(
        f".:{_free_port()} {{\n    bind 127.0.0.1\n    import {folder}/*.override\n"
        "    reload 2s\n    whoami\n}\n"
    )
    t = time.perf_counter()
    proc = subprocess.Popen(
        [str(binary), "-conf", str(corefile)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        if RELOAD_LINE in line:
            return proc, time.perf_counter() - t
        seen.append(line.rstrip())
    raise SystemExit(f"CoreDNS exited {proc.wait()}: " + " | ".join(seen[-5:]))


def _until_reload(proc: subprocess.Popen[str]) -> tuple[float, float]:
    """(file changed -> reload complete, the reload itself: "Reloading" -> "complete"), s."""
    assert proc.stdout is not None
    t = time.perf_counter()
    began = t
    for line in proc.stdout:
        if line.rstrip().endswith("[INFO] Reloading"):
            began = time.perf_counter()
        elif "Reloading complete" in line:
            done = time.perf_counter()
            return done - t, done - began
    raise SystemExit("CoreDNS exited while reloading")


def bench_binary(binary: Path, n: int, rounds: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dns-scale-") as tmp:
        folder = Path(tmp) / "rules"
        folder.mkdir()
        corefile = Path(tmp) / "Corefile"
        for label, count in (("baseline", 10), ("scaled", n)):
            _write_rules(folder, count, label)
            starts = []
            for _ in range(rounds):
                proc, started = _start(binary, corefile, folder)
                starts.append(started)
                proc.terminate()
                proc.wait()
            proc, _ = _start(binary, corefile, folder)
            try:
                time.sleep(1)
                rss, _ = rss_kb(proc.pid)
                reloads, durations = [], []
                for r in range(rounds):
                    extra = folder / f"egress-gateways-zz-{r}.override"
                    extra.write_text(
                        f"rewrite stop name exact extra-{r}.scale.example.com "
                        f"extra-{r}.{NS}.svc.{DOMAIN}\n"
                    )
                    changed_to_done, took = _until_reload(proc)
                    reloads.append(changed_to_done)
                    durations.append(took)
                _, hwm = rss_kb(proc.pid)
            finally:
                proc.terminate()
                proc.wait()
                for extra in folder.glob("egress-gateways-zz-*"):
                    extra.unlink()
            figures.update(
                {
                    f"{label}_start_s": statistics.median(starts),
                    f"{label}_rss_kib": rss,
                    f"{label}_hwm_kib": hwm,
                    f"{label}_reload_min_s": min(reloads),
                    f"{label}_reload_p50_s": statistics.median(durations),
                }
            )
            print(
                f"[binary, {count} rules] start-up (parse + set-up) p50 "
                f"{statistics.median(starts) * 1000:.0f} ms; VmRSS {rss / 1024:.1f} MiB, VmHWM "
                f"after {rounds} reloads {hwm / 1024:.1f} MiB; reload (Reloading -> complete) "
                f"p50 {statistics.median(durations) * 1000:.0f} ms max "
                f"{max(durations) * 1000:.0f} ms; file changed -> reloaded (reload 2s) p50 "
                f"{statistics.median(reloads):.2f} s"
            )
    return figures


def _ratio(figures: dict[str, float], key: str) -> str:
    base, scaled = figures.get(f"baseline_{key}", 0), figures.get(f"scaled_{key}", 0)
    return f"x{scaled / base:.2f}" if base > 0 and scaled > 0 else "n/a"


def main() -> int:
    n = int(os.environ.get("BENCH_DNS_SCALE_N", "10000"))
    rounds = int(os.environ.get("BENCH_DNS_SCALE_ROUNDS", "5"))
    bench_render(n)
    with bench_stack() as env:
        cluster = bench_cluster(env, n, rounds)
        binary = Path(env["EGRESS_DEV_BIN_DIR"]) / "coredns"
        alone = bench_binary(binary, n, rounds) if shutil.which(str(binary)) else {}
    print(
        f"ratios {n} rules / baseline ({cluster.get('baseline_rules', 0):.0f} rules), in the "
        f"cluster: VmRSS {_ratio(cluster, 'rss_kib')}, VmHWM {_ratio(cluster, 'hwm_after_kib')}, "
        f"reload {_ratio(cluster, 'reload_p50_s')}, write -> answer "
        f"{_ratio(cluster, 'answer_p50_s')}, query hijacked {_ratio(cluster, 'q_hijacked_ms')}, "
        f"forwarded {_ratio(cluster, 'q_forwarded_ms')}, "
        f"NXDOMAIN {_ratio(cluster, 'q_nxdomain_ms')}"
    )
    if alone:
        print(
            f"ratios {n} rules / 10 rules, the binary alone: start-up {_ratio(alone, 'start_s')}, "
            f"VmRSS {_ratio(alone, 'rss_kib')}, VmHWM {_ratio(alone, 'hwm_kib')}, reload "
            f"{_ratio(alone, 'reload_p50_s')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
