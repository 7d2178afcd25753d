"""Helpers shared by the cluster tests: polling with a deadline, ExternalServices, settings for
the dev node, and real pod readiness."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from core import constants as c
from core.kube import DEPLOYMENT, EXTERNAL_SERVICE, GATEWAY_KINDS, POD, SERVICE, Kube
from core.settings import Settings

T = TypeVar("T")
GATEWAY_NS = "egress-operator-system"
# How long a DNS rule may take to reach answers in a test. The CoreDNS nudge makes it seconds
# (p95 1.7 s, bench.data_path), but a kubelet can sync the nudged pod before its ConfigMap cache
# holds the write; the rule then waits for the kubelet's periodic sync (60 s + jitter). Seen once
# in a full run: the deadline covers it rather than fail on it.
DNS_PROPAGATION_S = 150
# How often await_dns runs the DNS sync that the scheduled sweep runs in production.
SWEEP_EVERY_S = 5.0


def eventually(
    check: Callable[[], T | None],
    timeout_s: float = 30.0,
    what: str = "condition",
    between: Callable[[], object] | None = None,
    between_every_s: float = SWEEP_EVERY_S,
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline.

    ``between``, if given, runs every ``between_every_s`` while waiting (a scheduled job)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    last: T | None = None
    next_run = time.monotonic() + between_every_s
    while True:
        last = check()
        if last:
            return last
        if between is not None and time.monotonic() >= next_run:
            between()
            next_run = time.monotonic() + between_every_s
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what} (last: {last!r})"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def external_service(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dnsName": f"{name}.example.com",
        "ports": [{"port": 443}],
        "minReplicas": 1,
    }
    body.update(spec)
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": body}


def create_es(admin: Kube, obj: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = admin.request("POST", EXTERNAL_SERVICE.path(), body=obj)
    return created


def update_spec(admin: Kube, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = admin.merge_patch(EXTERNAL_SERVICE, name, {"spec": spec})
    return result


def purge(admin: Kube, name: str) -> None:
    """Remove an ExternalService and every object of its gateway, finalizer or not."""
    live = admin.get(EXTERNAL_SERVICE, name)
    if live is not None:
        if live["metadata"].get("finalizers"):
            admin.merge_patch(EXTERNAL_SERVICE, name, {"metadata": {"finalizers": None}})
        admin.delete(EXTERNAL_SERVICE, name)
    for resource in GATEWAY_KINDS:
        admin.delete(resource, name, GATEWAY_NS)


def children(admin: Kube, name: str) -> dict[str, dict[str, Any]]:
    out = {}
    for resource in GATEWAY_KINDS:
        obj = admin.get(resource, name, GATEWAY_NS)
        if obj is not None:
            out[resource.kind] = obj
    return out


def apply_orphan(admin: Kube, name: str) -> None:
    """A ConfigMap labelled as gateway ``name``'s with no ExternalService of that name: an
    orphan, which a sweep prunes."""
    admin.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": GATEWAY_NS,
                "labels": {c.LABEL_APP: c.APP_VALUE, c.LABEL_GATEWAY: name},
            },
        }
    )


def create_hijacked_service(
    admin: Kube, name: str, dns_name: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A gateway Service in the hijacked state for ``dns_name``, without the rest of a gateway:
    what DNS delivery reads. Returns it as created (with its ClusterIP)."""
    created: dict[str, Any] = admin.request(
        "POST",
        SERVICE.path(GATEWAY_NS),
        body={
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "labels": {c.LABEL_GATEWAY: name, c.LABEL_HIJACK_DNS: "true", **(labels or {})},
                "annotations": {c.ANNOTATION_DNS_NAME: dns_name},
            },
            "spec": {"ports": [{"port": 443}], "selector": {c.LABEL_GATEWAY: name}},
        },
    )
    return created


def dev_settings(**overrides: Any) -> Settings:
    """Reconciler settings for the dev node: its locally built Envoy image (nothing is ever
    pulled there), everything else the product's defaults unless overridden."""
    overrides.setdefault("envoy_image", os.environ["ENVOY_IMAGE"])
    return Settings(**overrides)


def await_dns(
    check: Callable[[], T | None], admin: Kube, what: str, timeout_s: float = DNS_PROPAGATION_S
) -> T:
    """Wait for a DNS answer as production gets it: while polling, run every few seconds the DNS
    sync that the scheduled sweep runs, which settles the rules once they are quiet (CoreDNS can
    miss the last of two quick changes; see dns.delivery)."""
    from dns.delivery import DnsDelivery

    delivery = DnsDelivery(dev_settings())
    return eventually(check, timeout_s, what, between=lambda: delivery.sync(admin))


def gateway_pods(admin: Kube, name: str) -> list[dict[str, Any]]:
    items, _ = admin.list_all(POD, GATEWAY_NS, label_selector=f"{c.LABEL_GATEWAY}={name}")
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def envoy_admin(pod: dict[str, Any], path: str) -> subprocess.CompletedProcess[str]:
    """POST to the Envoy admin API inside a gateway pod (kubectl exec: API server, kubelet,
    containerd), as an operator would."""
    port = pod["metadata"]["annotations"][c.ANNOTATION_ADMIN_PORT]
    return subprocess.run(
        ["kubectl", "exec", "-n", GATEWAY_NS, pod["metadata"]["name"], "--",
         "wget", "-q", "-O-", "--post-data=", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@contextlib.contextmanager
def no_room_for_new_pods() -> Iterator[None]:
    """Cordon the dev node: new gateway pods stay Pending (so a gateway is observed "not ready"
    without racing its first readiness probe), and uncordon it afterwards."""
    node = os.environ["EGRESS_DEV_NODE"]
    subprocess.run(["kubectl", "cordon", node], capture_output=True, check=True)
    try:
        yield
    finally:
        subprocess.run(["kubectl", "uncordon", node], capture_output=True, check=True)


def set_pods_ready(admin: Kube, name: str, ready: bool, timeout_s: float = 120.0) -> None:
    """Make the gateway's real pods Ready (or not) and wait for the Deployment to follow.

    Ready comes from Envoy passing its readiness probe. Unready is Envoy failing it on
    purpose (admin ``/healthcheck/fail`` turns ``/ready`` into 503); ready again undoes that.
    Pods that appear meanwhile (a rollout) are treated the same as they start. The kubelet
    probes every 10 s and needs 3 failures, so unready takes up to about 30 s.
    """
    path = "/healthcheck/ok" if ready else "/healthcheck/fail"
    done: set[str] = set()

    def converged() -> bool:
        for pod in gateway_pods(admin, name):
            uid = pod["metadata"]["uid"]
            if uid in done or (pod.get("status") or {}).get("phase") != "Running":
                continue
            if envoy_admin(pod, path).returncode == 0:
                done.add(uid)
        dep = admin.get(DEPLOYMENT, name, GATEWAY_NS) or {}
        ready_replicas = int((dep.get("status") or {}).get("readyReplicas") or 0)
        return bool(done) and (ready_replicas >= 1 if ready else ready_replicas == 0)

    eventually(
        converged, timeout_s, f"Deployment {name} to have {'a' if ready else 'no'} Ready pod"
    )


def kubectl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_pod(
    k8s: Any,
    namespace: str,
    name: str,
    image: str,
    command: list[str],
    labels: dict[str, str] | None = None,
    ports: list[int] | None = None,
) -> dict[str, Any]:
    """Create a pod and wait until it runs; returns it (with its IP)."""
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "ports": [{"containerPort": p} for p in ports or []],
                }
            ],
        },
    }
    core.create_namespaced_pod(namespace, pod)

    def running() -> dict[str, Any] | None:
        got = core.read_namespaced_pod(name, namespace).to_dict()
        status = got.get("status") or {}
        return got if status.get("phase") == "Running" and status.get("pod_ip") else None

    result: dict[str, Any] = eventually(running, 90, f"pod {namespace}/{name} to run")
    return result


def sh(
    namespace: str, pod: str, script: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return kubectl("exec", "-n", namespace, pod, "--", "sh", "-c", script, timeout=timeout)


def serve_offline_name(env: dict[str, str], dns_name: str, ip: str | None = None) -> str:
    """Make the offline internet's DNS answer ``dns_name`` (with its test services' address
    unless ``ip`` says otherwise) and wait until it does: it re-reads its hosts file every 2 s,
    and a gateway that looks the name up before that would have no upstream for its first
    seconds. Returns the name."""
    from dnslib import QTYPE, DNSRecord

    address = ip or env["EGRESS_DEV_UPSTREAM_IP"]
    with Path(env["EGRESS_DEV_UPSTREAM_HOSTS"]).open("a") as hosts:
        hosts.write(f"{address} {dns_name}\n")
    host, port = env["COREDNS_UPSTREAM_ADDR"].rsplit(":", 1)

    def answers() -> bool:
        reply = DNSRecord.parse(DNSRecord.question(dns_name).send(host, int(port), timeout=2))
        return address in {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}

    eventually(answers, 15, f"the offline DNS to answer {dns_name}")
    return dns_name


@dataclasses.dataclass(frozen=True)
class Sample:
    """One request of a :class:`ContinuousClient`: when it ended, and what came back."""

    at: float  # the machine's boot-time clock, seconds (same in pods: one kernel)
    reply: str

    @property
    def ok(self) -> bool:
        return self.reply.startswith("upstream tcp/")

    @property
    def peer(self) -> str:
        for word in self.reply.split():
            if word.startswith("peer="):
                return word.removeprefix("peer=").rsplit(":", 1)[0]
        return ""


def boot_clock() -> float:
    """The clock a pod's ``/proc/uptime`` shows, read on the machine."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class ContinuousClient:
    """TCP requests by name from a client pod, ``pause_s`` apart on ``loops`` parallel loops, as an
    application without a DNS cache sends them: every request resolves the name anew (the
    pod's resolv.conf, cluster DNS), connects, sends a line, reads the reply, closes.

    The loops run detached inside the pod and log to a file there (a long ``kubectl exec``
    stream can stall); ``stop()`` ends them and returns every request with its end time on the
    machine's boot clock, so that callers can split them into the phases of a change.
    """

    def __init__(
        self,
        namespace: str,
        pod: str,
        host: str,
        port: int | str,
        loops: int = 2,
        pause_s: float = 0.05,
    ):
        self.namespace, self.pod = namespace, pod
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        self.stop_file, self.log = f"/tmp/stop-{tag}", f"/tmp/log-{tag}"
        one = (
            f"while [ ! -e {self.stop_file} ]; do "
            f"r=$(echo hi | nc -N -w 2 {host} {port} 2>&1 | head -c 300 | tr '\\n' ' '); "
            f'read up _ < /proc/uptime; echo "$up $r"; sleep {pause_s}; done'
        )
        loops_ = " & ".join([f"( {one} )"] * loops)
        script = f"( {loops_} & wait; echo end ) > {self.log} 2>&1 < /dev/null &"
        res = kubectl("exec", "-n", namespace, pod, "--", "sh", "-c", script)
        assert res.returncode == 0, res.stderr

    def answered(self) -> bool:
        """Whether some request has been answered by the upstream yet."""
        return "upstream tcp/" in self._log()

    def _log(self) -> str:
        res = kubectl("exec", "-n", self.namespace, self.pod, "--", "cat", self.log)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def stop(self) -> list[Sample]:
        kubectl("exec", "-n", self.namespace, self.pod, "--", "sh", "-c", f": > {self.stop_file}")

        def ended() -> str:
            text = self._log()
            return text if text.endswith("end\n") else ""

        out = eventually(ended, 30, "the client to stop")
        samples = []
        for line in out.splitlines():
            at, _, reply = line.partition(" ")
            with contextlib.suppress(ValueError):
                samples.append(Sample(float(at), reply.strip()))
        assert samples, f"the client sent nothing: {out[-2000:]}"
        return sorted(samples, key=lambda s: s.at)
