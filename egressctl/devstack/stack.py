"""The local cluster: real etcd, kube-apiserver, kube-controller-manager and kube-scheduler,
one real node (containerd, runc, CNI, kubelet, kube-proxy, kube-router as the NetworkPolicy
enforcer), cluster DNS as a CoreDNS pod, an offline internet, and the Pub/Sub emulator.

Why: there is no container engine on our machines, so kind cannot run; every capability
is still tested against real servers and every promise about traffic with real packets.
Binaries are built from pinned Go modules by ``infra/dev/build.sh`` and cached outside the
clone; images are built locally (``images.py``), never pulled. The node and the offline
internet live in network namespaces of their own (``node.py``). Run-time state lives in
``.cache/dev/`` of the repository; ``state.json`` records every started process with its
start time and the stack's address slot, so `dev down` (or the next `dev up` after a crash)
removes exactly what this stack made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from egressctl.devstack import images, node, pki
from egressctl.devstack.node import AddressPlan, NodePaths
from egressctl.devstack.procs import (
    DevStackError,
    ProcRecord,
    is_running,
    spawn,
    stop,
    tail,
    wait_for,
)

CLUSTER_DOMAIN = "cluster.local"
PUBSUB_PROJECT_ID = "egress-dev"
GATEWAY_NAMESPACE = "egress-operator-system"
# egress-reconciler-nodns: the reconciler as GKE Autopilot binds it (CLUSTER_DNS=none, no grant
# in kube-system); infra/ binds it to nothing, its test binds it (test_cluster_dns_none.py).
IDENTITIES = ("egress-reconciler", "egress-exporter", "egress-auditor", "egress-reconciler-nodns")
# Groups an identity's certificate carries (its subject's O): infra/rbac binds the read-only
# access audit to the group egress-auditors, as a cluster would bind its people.
IDENTITY_GROUPS: dict[str, tuple[str, ...]] = {"egress-auditor": ("egress-auditors",)}
STATE_VERSION = 2
PART_TIMEOUT = float(os.environ.get("EGRESS_DEV_PART_TIMEOUT", "120"))
# The kubelet's periodic pod sync, which is also when it refreshes mounted ConfigMaps
# (cluster DNS rules). Kubernetes' default, 60 s, as on users' clusters: DNS changes reach
# CoreDNS in seconds because the reconciler nudges its pods, not because this is short.
KUBELET_SYNC_S = int(os.environ.get("EGRESS_DEV_KUBELET_SYNC_S", "60"))
BINARIES = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "coredns",
    "kubelet", "kube-proxy", "kube-router",
)  # fmt: skip


def _say(msg: str, out: TextIO | None = None) -> None:
    print(f"[dev {time.strftime('%H:%M:%S')}] {msg}", file=out or sys.stderr, flush=True)


def find_repo() -> Path:
    """The repository holding infra/dev (the source tree of this package, else cwd)."""
    candidates = [Path(__file__).resolve().parents[2], *[Path.cwd(), *Path.cwd().parents]]
    for c in candidates:
        if (c / "infra" / "dev" / "build.sh").is_file():
            return c
    raise DevStackError("cannot find the repository (no infra/dev/build.sh above the cwd)")


def node_paths(dev: Path) -> NodePaths:
    """The node's folder: inside the stack's, unless that path is so long that the kubelet's
    sockets under it would pass the 107-byte limit of a unix socket path; then a short,
    stable one derived from it (so a crashed stack's leftovers are still found)."""
    path = dev / "node"
    if len(str(path)) > 48:
        digest = hashlib.sha256(str(dev).encode()).hexdigest()[:12]
        path = Path("/run/egress-dev") / digest
    return NodePaths(path)


@dataclass(frozen=True)
class Layout:
    """Where everything lives."""

    repo: Path

    @property
    def dev(self) -> Path:
        # EGRESS_DEV_DIR lets a second, independent stack run beside the default one.
        override = os.environ.get("EGRESS_DEV_DIR")
        return Path(override).resolve() if override else self.repo / ".cache" / "dev"

    @property
    def state_file(self) -> Path:
        return self.dev / "state.json"

    @property
    def env_file(self) -> Path:
        return self.dev / "env"

    @property
    def kubeconfig(self) -> Path:
        return self.dev / "kubeconfig"

    def identity_kubeconfig(self, identity: str) -> Path:
        return self.dev / f"kubeconfig-{identity}"

    @property
    def pki(self) -> Path:
        return self.dev / "pki"

    @property
    def logs(self) -> Path:
        return self.dev / "logs"

    @property
    def node(self) -> NodePaths:
        return node_paths(self.dev)

    @property
    def upstream(self) -> Path:
        return self.dev / "upstream"

    @property
    def infra(self) -> Path:
        return self.repo / "infra"


@dataclass
class State:
    """The content of state.json."""

    bin_dir: str = ""
    slot: int = -1
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[ProcRecord] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    # Seconds from the start of `dev up` to each part turning healthy (for `make bench`).
    timings: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "bin_dir": self.bin_dir,
            "slot": self.slot,
            "ports": self.ports,
            "procs": [p.to_json() for p in self.procs],
            "images": self.images,
            "timings": self.timings,
            "complete": self.complete,
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        return cls(
            bin_dir=str(data.get("bin_dir", "")),
            slot=int(data.get("slot", -1)),
            ports={str(k): int(v) for k, v in data.get("ports", {}).items()},
            procs=[ProcRecord.from_json(p) for p in data.get("procs", [])],
            images={str(k): str(v) for k, v in data.get("images", {}).items()},
            timings={str(k): float(v) for k, v in data.get("timings", {}).items()},
            complete=bool(data.get("complete", False)),
            started_at=float(data.get("started_at", 0.0)),
        )

    def proc(self, name: str) -> ProcRecord | None:
        return next((p for p in self.procs if p.name == name), None)

    @property
    def plan(self) -> AddressPlan | None:
        return AddressPlan(self.slot) if self.slot >= 0 else None


def load_state(layout: Layout) -> State | None:
    try:
        return State.from_json(json.loads(layout.state_file.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        _say(f"ignoring unreadable {layout.state_file}: {exc}")
        return None


def save_state(layout: Layout, state: State) -> None:
    layout.dev.mkdir(parents=True, exist_ok=True)
    tmp = layout.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    tmp.replace(layout.state_file)


# --------------------------------------------------------------------------- binaries


def ensure_binaries(layout: Layout) -> Path:
    """Build (or reuse from the cache) the pinned binaries; returns their directory."""
    script = layout.repo / "infra" / "dev" / "build.sh"
    check = subprocess.run([str(script), "--check"], check=False)
    if check.returncode != 0:
        _say("cluster binaries missing for the current pins: building (minutes on 2 cores)")
    proc = subprocess.run([str(script)], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise DevStackError(f"build: infra/dev/build.sh failed with exit code {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    bin_dir = Path(lines[-1]) if lines else Path()
    for name in BINARIES:
        if not os.access(bin_dir / name, os.X_OK):
            raise DevStackError(f"build: {bin_dir / name} is missing after the build")
    return bin_dir


def image_cache(bin_dir: Path) -> Path:
    """Image archives are cached beside the binaries (outside the clone)."""
    return bin_dir.parent.parent / "images"


def coredns_version(bin_dir: Path) -> str:
    pins = (bin_dir / "PINS").read_text() if (bin_dir / "PINS").is_file() else ""
    for line in pins.splitlines():
        if "github.com/coredns/coredns " in line:
            return line.split()[-1]
    return "dev"


DASH = Path("/bin/dash")


def image_specs(bin_dir: Path) -> dict[str, images.ImageSpec]:
    """The node's images (pause, client, Envoy, CoreDNS), by role."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    nc = Path(shutil.which("nc.openbsd") or "/bin/nc.openbsd")
    return {
        "pause": images.pause_image(busybox),
        "client": images.client_image(busybox, nc, DASH),
        "envoy": images.envoy_image(images.envoy_binary(), busybox, images.envoy_version()),
        "coredns": images.coredns_image(bin_dir / "coredns", coredns_version(bin_dir)),
    }


def pubsub_emulator_command(port: int) -> list[str]:
    """Run the emulator jar directly (gcloud's wrapper adds seconds and extra processes)."""
    jar = os.environ.get("EGRESS_PUBSUB_EMULATOR_JAR")
    if not jar:
        gcloud = shutil.which("gcloud")
        if gcloud:
            root = Path(gcloud).resolve().parent.parent / "platform" / "pubsub-emulator" / "lib"
            jars = sorted(root.glob("cloud-pubsub-emulator-*.jar"))
            if jars:
                jar = str(jars[-1])
    java = shutil.which("java")
    if jar and java:
        return [java, "-Xms64m", "-Xmx512m", "-jar", jar, "--host=127.0.0.1", f"--port={port}"]
    gcloud = shutil.which("gcloud")
    if gcloud:
        return [gcloud, "beta", "emulators", "pubsub", "start", f"--host-port=127.0.0.1:{port}"]
    raise DevStackError(
        "pubsub: neither the emulator jar (+java) nor gcloud was found; install the "
        "gcloud pubsub-emulator component or set EGRESS_PUBSUB_EMULATOR_JAR"
    )


# --------------------------------------------------------------------------- ports


def free_ports(names: list[str]) -> dict[str, int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    with ExitStack() as stack:
        ports: dict[str, int] = {}
        for name in names:
            tcp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            tcp.bind(("127.0.0.1", 0))
            ports[name] = int(tcp.getsockname()[1])
        return ports


# --------------------------------------------------------------------------- health


def _https_ok(url: str, ctx: ssl.SSLContext) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=3) as resp:
            body = resp.read(200).decode(errors="replace")
            return resp.status == 200, body
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read(300).decode(errors='replace')}"
    except (OSError, ssl.SSLError) as exc:
        return False, str(exc)


def _http_ok(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200, resp.read(200).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except OSError as exc:
        return False, str(exc)


def _tcp_ok(host: str, port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"health\n")
            line = sock.recv(200).decode(errors="replace")
        return bool(line), line
    except OSError as exc:
        return False, str(exc)


def _udp_ok(host: str, port: int) -> tuple[bool, str]:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.sendto(b"health\n", (host, port))
            reply = sock.recv(200).decode(errors="replace")
        return bool(reply), reply
    except OSError as exc:
        return False, str(exc)


def _upstream_ok(host: str, tcp: int, udp: int) -> tuple[bool, str]:
    ok_tcp, detail_tcp = _tcp_ok(host, tcp)
    ok_udp, detail_udp = _udp_ok(host, udp)
    return ok_tcp and ok_udp, f"{detail_tcp.strip()}; {detail_udp.strip()}"


def _unix_ok(path: Path) -> tuple[bool, str]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
        return True, f"listening on {path}"
    except OSError as exc:
        return False, str(exc)


def admin_ssl_context(layout: Layout) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
    ctx.load_cert_chain(str(layout.pki / "admin.crt"), str(layout.pki / "admin.key"))
    return ctx


def dns_query(
    addr: str, name: str, qtype: str = "A", timeout: float = 2.0
) -> tuple[str, list[str]]:
    """Ask ``addr`` (host:port) over UDP; returns (rcode name, answer rdata strings)."""
    from egressctl.optional import needed

    with needed("dnslib", "the dev stack's DNS checks"):
        from dnslib import QTYPE, RCODE, DNSRecord

    host, port = addr.rsplit(":", 1)
    raw = DNSRecord.question(name, qtype).send(host, int(port), timeout=timeout)
    reply = DNSRecord.parse(raw)
    answers = [str(rr.rdata) for rr in reply.rr if rr.rtype == getattr(QTYPE, qtype)]
    return str(RCODE.get(reply.header.rcode)), answers


def _dns_answers(addr: str, name: str) -> tuple[bool, str]:
    try:
        rcode, answers = dns_query(addr, name)
    except OSError as exc:
        return False, str(exc)
    return bool(answers), f"{rcode} {answers}"


def _node_ready(layout: Layout) -> tuple[bool, str]:
    from kubernetes import client, config

    try:
        api = client.CoreV1Api(config.new_client_from_config(config_file=str(layout.kubeconfig)))
        got = api.read_node(node.NODE_NAME, _request_timeout=3)
    except Exception as exc:
        return False, str(exc)[:200]
    for cond in got.status.conditions or []:
        if cond.type == "Ready":
            return cond.status == "True", f"Ready={cond.status} {cond.message or ''}"
    return False, "no Ready condition yet"


@dataclass
class Check:
    part: str
    ok: bool
    detail: str


def part_checks(layout: Layout, state: State) -> dict[str, Callable[[], tuple[bool, str]]]:
    """Health probes per part, using only the standard library, dnslib and the client."""
    p = state.ports
    plan = state.plan or AddressPlan(0)
    checks: dict[str, Callable[[], tuple[bool, str]]] = {
        "etcd": lambda: _http_ok(f"http://127.0.0.1:{p['etcd']}/health"),
        "kube-apiserver": lambda: _https_ok(
            f"https://{plan.host_ip}:{p['apiserver']}/readyz", admin_ssl_context(layout)
        ),
        "kube-controller-manager": lambda: _https_ok(
            f"https://127.0.0.1:{p['kcm']}/healthz", ssl._create_unverified_context()
        ),
        "kube-scheduler": lambda: _https_ok(
            f"https://127.0.0.1:{p['scheduler']}/healthz", ssl._create_unverified_context()
        ),
        "containerd": lambda: _unix_ok(layout.node.containerd_socket),
        "kubelet": lambda: _node_ready(layout),
        "kube-proxy": lambda: _http_ok(f"http://{plan.node_ip}:10256/healthz"),
        "kube-router": lambda: _http_ok(f"http://{plan.node_ip}:20244/healthz"),
        "dns-upstream": lambda: _dns_answers(f"{plan.upstream_dns_ip}:53", node.UPSTREAM_NAME),
        "upstream": lambda: _upstream_ok(
            plan.upstream_ip, node.UPSTREAM_TCP_PORT, node.UPSTREAM_UDP_PORT
        ),
        "pubsub": lambda: _http_ok(f"http://127.0.0.1:{p['pubsub']}/"),
    }
    return checks


def cluster_dns_ok(state: State) -> tuple[bool, str]:
    plan = state.plan or AddressPlan(0)
    return _dns_answers(f"{plan.cluster_dns_ip}:53", f"kubernetes.default.svc.{CLUSTER_DOMAIN}")


def check_all(layout: Layout, state: State) -> list[Check]:
    results = []
    checks = part_checks(layout, state)
    for name, probe in checks.items():
        rec = state.proc(name)
        if rec is None:
            results.append(Check(name, False, "not started"))
            continue
        if not is_running(rec):
            results.append(Check(name, False, f"pid {rec.pid} not running; log {rec.log}"))
            continue
        ok, detail = probe()
        results.append(Check(name, ok, f"pid {rec.pid}: {detail.strip()[:120]}"))
    ok, detail = cluster_dns_ok(state)
    results.append(Check("cluster-dns", ok, f"kube-dns Service: {detail.strip()[:120]}"))
    return results


def healthy(layout: Layout, state: State) -> bool:
    return state.complete and all(c.ok for c in check_all(layout, state))


def _wait(name: str, probe: Callable[[], tuple[bool, str]], rec: ProcRecord | None,
          timeout: float = PART_TIMEOUT, state: State | None = None) -> None:  # fmt: skip
    last = [""]
    t0 = time.monotonic()

    def ready() -> bool:
        if rec is not None and not is_running(rec):
            raise DevStackError(
                f"{name}: exited during start-up; last lines of {rec.log}:\n{tail(rec.log)}"
            )
        ok, last[0] = probe()
        return ok

    if not wait_for(ready, timeout, interval=0.1, max_interval=0.5):
        log = rec.log if rec else "?"
        raise DevStackError(
            f"{name}: not healthy after {timeout:.0f}s (last probe: {last[0].strip()[:300]}); "
            f"last lines of {log}:\n{tail(log)}"
        )
    _say(f"{name} is healthy ({time.monotonic() - t0:.1f}s)")
    if state is not None:
        state.timings[name] = round(time.time() - state.started_at, 2)


def _wait_part(layout: Layout, state: State, name: str, timeout: float = PART_TIMEOUT) -> None:
    _wait(name, part_checks(layout, state)[name], state.proc(name), timeout, state)


# --------------------------------------------------------------------------- files


def _kubeconfig(path: Path, server: str, ca: Path, cert: pki.CertPair, user: str) -> None:
    import yaml

    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "egress-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(cert.cert), "client-key": str(cert.key)},
            }
        ],
        "contexts": [
            {"name": f"{user}@egress-dev", "context": {"cluster": "egress-dev", "user": user}}
        ],
        "current-context": f"{user}@egress-dev",
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)


def ensure_identities(layout: Layout, state: State) -> list[str]:
    """Issue a kubeconfig for each identity a running stack lacks (one added to IDENTITIES
    since it started), from the stack's own CA; rewrite the env file if any was. Returns the
    identities issued. Idempotent and quick, so a reused stack gains new identities."""
    missing = [i for i in IDENTITIES if not layout.identity_kubeconfig(i).is_file()]
    if not missing:
        return []
    ca = pki.CertificateAuthority.load(layout.pki, "ca")
    server = env_values(layout, state)["EGRESS_DEV_API_SERVER"]
    for ident in missing:
        cert = ca.issue(ident, ident, organizations=IDENTITY_GROUPS.get(ident, ()))
        _kubeconfig(layout.identity_kubeconfig(ident), server, ca.pair.cert, cert, ident)
    _write_env(layout, state)
    _say(f"issued identities {', '.join(missing)} from the running stack's CA")
    return missing


def _render(template: Path, dest: Path, **values: object) -> str:
    text = string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return text


def env_values(layout: Layout, state: State) -> dict[str, str]:
    p = state.ports
    plan = state.plan or AddressPlan(0)
    refs = state.images
    values = {
        "KUBECONFIG": str(layout.kubeconfig),
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{p['pubsub']}",
        "PUBSUB_PROJECT_ID": PUBSUB_PROJECT_ID,
        # Cluster DNS (the CoreDNS pod behind kube-dns), reachable from the machine.
        "COREDNS_ADDR": f"{plan.cluster_dns_ip}:53",
        "COREDNS_UPSTREAM_ADDR": f"{plan.upstream_dns_ip}:53",
        # Where the CoreDNS pod sees our rules ConfigMap (the product's default).
        "COREDNS_IMPORT_PATH": "/etc/coredns/egress-gateways/*.override",
        "ENVOY_IMAGE": refs.get("envoy", ""),
        "EGRESS_DEV_CLIENT_IMAGE": refs.get("client", ""),
        "EGRESS_DEV_UPSTREAM_NAME": node.UPSTREAM_NAME,
        "EGRESS_DEV_UPSTREAM_IP": plan.upstream_ip,
        "EGRESS_DEV_UPSTREAM_ALT_IP": plan.upstream_alt_ip,
        "EGRESS_DEV_INET_NETNS": plan.inet_netns,
        "EGRESS_DEV_UPSTREAM_TCP_PORT": str(node.UPSTREAM_TCP_PORT),
        "EGRESS_DEV_UPSTREAM_UDP_PORT": str(node.UPSTREAM_UDP_PORT),
        "EGRESS_DEV_UPSTREAM_HOSTS": str(layout.upstream / "hosts"),
        "EGRESS_DEV_NODE": node.NODE_NAME,
        "EGRESS_DEV_NODE_NETNS": plan.node_netns,
        "EGRESS_DEV_POD_CIDR": plan.pod_cidr,
        "EGRESS_DEV_SERVICE_CIDR": plan.service_cidr,
        "EGRESS_DEV_DIR": str(layout.dev),
        "EGRESS_DEV_BIN_DIR": state.bin_dir,
        "EGRESS_DEV_API_SERVER": f"https://{plan.host_ip}:{p['apiserver']}",
    }
    for ident in IDENTITIES:
        values[identity_env_key(ident)] = str(layout.identity_kubeconfig(ident))
    return values


def identity_env_key(identity: str) -> str:
    """The env file's variable for an identity's kubeconfig: egress-reconciler-nodns ->
    KUBECONFIG_RECONCILER_NODNS."""
    return "KUBECONFIG_" + identity.removeprefix("egress-").upper().replace("-", "_")


def _write_env(layout: Layout, state: State) -> None:
    lines = ["# Written by `egressctl dev up`; source it: . .cache/dev/env"]
    lines += [f"export {k}='{v}'" for k, v in env_values(layout, state).items()]
    tmp = layout.env_file.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(layout.env_file)


def _kubectl(
    layout: Layout, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise DevStackError("infra: kubectl is not installed (needed to apply infra/)")
    return subprocess.run(
        [kubectl, f"--kubeconfig={layout.kubeconfig}", *args],
        capture_output=True,
        text=True,
        input=stdin,
        check=False,
    )


# What `dev up` installs: the CRD, the gateway namespace and the RBAC bound to the stack's
# certificate users (a kustomize overlay; see infra/).
DEV_OVERLAY = ("overlays", "dev")
NODE_KUSTOMIZATION = ("dev", "node")
CRD_FILE = ("crd", "externalservices.yaml")


def apply_infra(layout: Layout) -> None:
    """Apply infra/overlays/dev (server-side) and wait for the CRD to be Established.

    Idempotent and quick (about half a second), so a running stack is brought up to date with
    the working tree's CRD and RBAC whenever it is reused."""
    overlay = layout.infra.joinpath(*DEV_OVERLAY)
    if not (overlay / "kustomization.yaml").is_file():
        raise DevStackError(f"infra: {overlay} has no kustomization.yaml")
    res = _kubectl(
        layout, "apply", "--server-side", "--force-conflicts",
        "--field-manager=egressctl-dev", "-k", str(overlay),
    )  # fmt: skip
    if res.returncode != 0:
        raise DevStackError(f"infra: applying {overlay} failed:\n{res.stderr.strip()}")
    _say(f"applied {overlay.relative_to(layout.repo)} ({len(res.stdout.splitlines())} objects)")
    res = _kubectl(
        layout, "wait", "--for=condition=Established", "--timeout=60s",
        "-f", str(layout.infra.joinpath(*CRD_FILE)),
    )  # fmt: skip
    if res.returncode != 0:
        raise DevStackError(f"infra: CRDs not Established:\n{res.stderr.strip()}")


def node_manifests(layout: Layout, plan: AddressPlan, coredns_image: str) -> str:
    """infra/dev/node with the slot's cluster DNS address and the local CoreDNS image."""
    import yaml

    path = layout.infra.joinpath(*NODE_KUSTOMIZATION)
    res = _kubectl(layout, "kustomize", str(path))
    if res.returncode != 0:
        raise DevStackError(f"infra: kustomize {path} failed:\n{res.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    for doc in docs:
        if doc["kind"] == "Service" and doc["metadata"]["name"] == "kube-dns":
            doc["spec"]["clusterIP"] = plan.cluster_dns_ip
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "coredns":
            doc["spec"]["template"]["spec"]["containers"][0]["image"] = coredns_image
    return str(yaml.safe_dump_all(docs, sort_keys=False))


def apply_node_manifests(layout: Layout, plan: AddressPlan, coredns_image: str) -> None:
    res = _kubectl(
        layout, "apply", "--server-side", "--force-conflicts",
        "--field-manager=egressctl-dev", "-f", "-",
        stdin=node_manifests(layout, plan, coredns_image),
    )  # fmt: skip
    if res.returncode != 0:
        raise DevStackError(f"infra: applying infra/dev/node failed:\n{res.stderr.strip()}")


def refresh_node_manifests(layout: Layout, state: State) -> None:
    """Bring a running stack's node manifests (cluster DNS and its wiring) up to the working
    tree's, as apply_infra does for infra/: nothing changes when they are the same; a changed
    CoreDNS Deployment rolls its pod once, and this waits for that."""
    plan, image = state.plan, state.images.get("coredns", "")
    if plan is None or not image:
        return
    apply_node_manifests(layout, plan, image)
    res = _kubectl(
        layout, "-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=180s"
    )
    if res.returncode != 0:
        raise DevStackError(f"infra: CoreDNS did not roll out:\n{res.stderr.strip()}")


def _wait_default_service_account(layout: Layout) -> None:
    """The serviceaccount controller creating `default` proves the controllers run."""
    t0 = time.monotonic()

    def exists() -> bool:
        return _kubectl(layout, "get", "serviceaccount", "default", "-n", "default").returncode == 0

    if not wait_for(exists, PART_TIMEOUT, interval=0.2, max_interval=1.0):
        raise DevStackError(
            "kube-controller-manager: the serviceaccount controller never created "
            f"default/default; see {layout.logs / 'kube-controller-manager.log'}"
        )
    _say(f"controllers are running ({time.monotonic() - t0:.1f}s)")


# --------------------------------------------------------------------------- up/down


def owned_plan(layout: Layout, state: State) -> AddressPlan | None:
    """The stack's addresses if its slot is still its own (else another stack took it, and
    clean-up must stay inside this stack's folder)."""
    plan = state.plan
    return plan if plan is not None and node.owns_slot(plan.slot, layout.dev) else None


def _clean_leftovers(layout: Layout, state: State | None) -> None:
    if state is not None:
        stopped = [rec.name for rec in reversed(state.procs) if stop(rec, timeout=5.0)]
        if stopped:
            _say(f"stopped leftovers of a previous run: {', '.join(stopped)}")
        removed = node.teardown(owned_plan(layout, state), layout.node)
        if removed:
            _say(f"removed leftovers of the node: {', '.join(removed)}")
    elif layout.node.root.exists():
        removed = node.teardown(None, layout.node)
        if removed:
            _say(f"removed leftovers of the node: {', '.join(removed)}")
    shutil.rmtree(layout.node.root, ignore_errors=True)
    if layout.dev.exists():
        shutil.rmtree(layout.dev)


@contextmanager
def _stop_on_failure(layout: Layout, state: State) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for rec in reversed(state.procs):
            stop(rec, timeout=5.0)
        node.teardown(owned_plan(layout, state), layout.node)
        state.complete = False
        save_state(layout, state)
        raise


@dataclass(frozen=True)
class Certificates:
    """Every certificate and key the stack's processes use, issued by its own CAs."""

    ca: pki.CertificateAuthority
    serving: pki.CertPair
    admin: pki.CertPair
    kubelet_client: pki.CertPair
    service_accounts: pki.CertPair
    front_proxy_ca: pki.CertificateAuthority
    front_proxy_client: pki.CertPair
    # Each part's client certificate and the user it names, for its kubeconfig.
    parts: dict[str, tuple[pki.CertPair, str]]
    identities: dict[str, pki.CertPair]


def issue_certificates(layout: Layout, plan: AddressPlan) -> Certificates:
    ca = pki.CertificateAuthority(layout.pki, "ca")
    serving = ca.issue(
        "apiserver", "kube-apiserver", server=True,
        ips=("127.0.0.1", plan.host_ip, plan.api_service_ip),
        dns_names=("localhost", "kubernetes", "kubernetes.default",
                   "kubernetes.default.svc", f"kubernetes.default.svc.{CLUSTER_DOMAIN}"),
    )  # fmt: skip
    admin = ca.issue("admin", "egress-dev-admin", organizations=("system:masters",))
    parts = {
        "kube-controller-manager": (
            ca.issue("kcm", "system:kube-controller-manager"),
            "system:kube-controller-manager",
        ),
        "kube-scheduler": (ca.issue("scheduler", "system:kube-scheduler"), "system:kube-scheduler"),
        "kubelet": (
            ca.issue("kubelet", f"system:node:{node.NODE_NAME}", organizations=("system:nodes",)),
            f"system:node:{node.NODE_NAME}",
        ),
    }
    ca.issue(
        "kubelet-serving", node.NODE_NAME, server=True, ips=(plan.node_ip,),
        dns_names=(node.NODE_NAME,),
    )  # fmt: skip
    kubelet_client = ca.issue(
        "apiserver-kubelet-client", "kube-apiserver-kubelet-client",
        organizations=("system:masters",),
    )  # fmt: skip
    parts["kube-proxy"] = (ca.issue("kube-proxy", "system:kube-proxy"), "system:kube-proxy")
    parts["kube-router"] = (ca.issue("kube-router", "system:kube-router"), "system:kube-router")
    identities = {i: ca.issue(i, i, organizations=IDENTITY_GROUPS.get(i, ())) for i in IDENTITIES}
    service_accounts = pki.service_account_keys(layout.pki)
    # The aggregation layer's CA, as kubeadm sets it up: it fills the requestheader part of
    # kube-system/extension-apiserver-authentication that the controller manager (and any
    # aggregated API) reads.
    front_ca = pki.CertificateAuthority(layout.pki, "front-proxy-ca")
    front_client = front_ca.issue("front-proxy-client", "front-proxy-client")
    return Certificates(
        ca, serving, admin, kubelet_client, service_accounts, front_ca, front_client, parts,
        identities,
    )  # fmt: skip


@dataclass
class Starter:
    """What every process's starter needs while the stack comes up (as envtest's, one starter
    per process; ``up`` decides the order and what to wait for)."""

    layout: Layout
    state: State
    plan: AddressPlan
    bin: Path
    certs: Certificates
    kubeconfigs: dict[str, Path] = field(default_factory=dict)

    @property
    def ports(self) -> dict[str, int]:
        return self.state.ports

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['etcd']}"

    @property
    def server(self) -> str:
        return f"https://{self.plan.host_ip}:{self.ports['apiserver']}"

    def start(self, name: str, argv: list[str], netns: str | None = None, **kw: Any) -> None:
        if netns is not None:
            argv = node.in_netns(netns, argv)
        self.state.procs.append(spawn(name, argv, self.layout.logs / f"{name}.log", **kw))
        save_state(self.layout, self.state)


def start_etcd(s: Starter) -> None:
    peer_url = f"http://127.0.0.1:{s.ports['etcd_peer']}"
    s.start("etcd", [
        str(s.bin / "etcd"), "--name=dev", f"--data-dir={s.layout.dev / 'etcd'}",
        f"--listen-client-urls={s.etcd_url}", f"--advertise-client-urls={s.etcd_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=dev={peer_url}", "--unsafe-no-fsync", "--log-level=warn",
    ])  # fmt: skip


def start_pubsub(s: Starter) -> None:
    s.start("pubsub", pubsub_emulator_command(s.ports["pubsub"]))


def start_containerd(s: Starter) -> None:
    npaths = s.layout.node
    cni_bin = node.cni_bin_dir()
    npaths.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    (npaths.cni_conf_dir / "10-egdev.conflist").write_text(node.cni_conflist(s.plan, npaths))
    npaths.containerd_config.parent.mkdir(parents=True, exist_ok=True)
    npaths.containerd_config.write_text(
        node.containerd_config(npaths, cni_bin, s.state.images["pause"])
    )
    s.start("containerd", [
        shutil.which("containerd") or "containerd",
        f"--config={npaths.containerd_config}", "--log-level=warn",
    ], netns=s.plan.node_netns)  # fmt: skip


def start_apiserver(s: Starter) -> None:
    certs, ca = s.certs, s.certs.ca.pair
    s.start("kube-apiserver", [
        str(s.bin / "kube-apiserver"),
        f"--etcd-servers={s.etcd_url}",
        f"--bind-address={s.plan.host_ip}", f"--secure-port={s.ports['apiserver']}",
        f"--advertise-address={s.plan.host_ip}",
        f"--tls-cert-file={certs.serving.cert}", f"--tls-private-key-file={certs.serving.key}",
        f"--client-ca-file={ca.cert}",
        f"--service-account-key-file={certs.service_accounts.cert}",
        f"--service-account-signing-key-file={certs.service_accounts.key}",
        f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        f"--service-cluster-ip-range={s.plan.service_cidr}",
        "--allow-privileged=true",
        f"--kubelet-client-certificate={certs.kubelet_client.cert}",
        f"--kubelet-client-key={certs.kubelet_client.key}",
        f"--kubelet-certificate-authority={ca.cert}",
        "--kubelet-preferred-address-types=InternalIP",
        f"--requestheader-client-ca-file={certs.front_proxy_ca.pair.cert}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={certs.front_proxy_client.cert}",
        f"--proxy-client-key-file={certs.front_proxy_client.key}",
        f"--cert-dir={s.layout.pki / 'apiserver-generated'}",
        "--profiling=false",
    ])  # fmt: skip


def write_kubeconfigs(s: Starter) -> None:
    """The admin's, each part's and each identity's kubeconfig, for the API server now up."""
    ca = s.certs.ca.pair.cert
    _kubeconfig(s.layout.kubeconfig, s.server, ca, s.certs.admin, "egress-dev-admin")
    for part, (cert, user) in s.certs.parts.items():
        s.kubeconfigs[part] = s.layout.dev / f"kubeconfig-{part}"
        _kubeconfig(s.kubeconfigs[part], s.server, ca, cert, user)
    for ident, cert in s.certs.identities.items():
        _kubeconfig(s.layout.identity_kubeconfig(ident), s.server, ca, cert, ident)


def start_controller_manager(s: Starter) -> None:
    kubeconfig = s.kubeconfigs["kube-controller-manager"]
    ca = s.certs.ca.pair
    s.start("kube-controller-manager", [
        str(s.bin / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1", f"--secure-port={s.ports['kcm']}",
        f"--cert-dir={s.layout.pki / 'kcm-generated'}",
        "--controllers=*", "--use-service-account-credentials=true",
        f"--service-account-private-key-file={s.certs.service_accounts.key}",
        f"--root-ca-file={ca.cert}",
        f"--cluster-signing-cert-file={ca.cert}",
        f"--cluster-signing-key-file={ca.key}",
        f"--service-cluster-ip-range={s.plan.service_cidr}",
        "--allocate-node-cidrs=true", f"--cluster-cidr={s.plan.pod_cidr}",
        "--node-cidr-mask-size=24",
        "--leader-elect=false",
        "--profiling=false",
    ])  # fmt: skip


def start_scheduler(s: Starter) -> None:
    kubeconfig = s.kubeconfigs["kube-scheduler"]
    s.start("kube-scheduler", [
        str(s.bin / "kube-scheduler"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1", f"--secure-port={s.ports['scheduler']}",
        "--leader-elect=false",
        "--profiling=false",
    ])  # fmt: skip


def start_kubelet(s: Starter) -> None:
    npaths = s.layout.node
    npaths.resolv_conf.write_text(node.resolv_conf(s.plan))
    npaths.kubelet_config.write_text(
        node.kubelet_config(s.plan, npaths, s.layout.pki, KUBELET_SYNC_S)
    )
    s.start("kubelet", [
        str(s.bin / "kubelet"),
        f"--config={npaths.kubelet_config}",
        f"--kubeconfig={s.kubeconfigs['kubelet']}",
        f"--root-dir={npaths.kubelet_root}",
        f"--cert-dir={npaths.root / 'kubelet-pki'}",
        f"--hostname-override={node.NODE_NAME}",
        f"--node-ip={s.plan.node_ip}",
        "--v=1",
    ], netns=s.plan.node_netns)  # fmt: skip


def start_kube_proxy(s: Starter) -> None:
    npaths = s.layout.node
    npaths.kube_proxy_config.write_text(node.kube_proxy_config(s.plan, s.kubeconfigs["kube-proxy"]))
    s.start("kube-proxy", [
        str(s.bin / "kube-proxy"), f"--config={npaths.kube_proxy_config}", "--v=1",
    ], netns=s.plan.node_netns)  # fmt: skip


def start_kube_router(s: Starter) -> None:
    s.start("kube-router", [
        str(s.bin / "kube-router"),
        f"--kubeconfig={s.kubeconfigs['kube-router']}",
        f"--hostname-override={node.NODE_NAME}",
        "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
        f"--service-cluster-ip-range={s.plan.service_cidr}",
        "--health-port=20244", "--metrics-port=0", "--v=1",
    ], netns=s.plan.node_netns)  # fmt: skip


def start_offline_internet(s: Starter) -> None:
    """The upstream DNS server and the test services, in the stack's own "internet" netns."""
    layout = s.layout
    hosts = layout.upstream / "hosts"
    base_hosts = (layout.infra / "dev" / "coredns" / "upstream.hosts").read_text()
    hosts.write_text(node.upstream_hosts(s.plan, base_hosts))
    _render(
        layout.infra / "dev" / "coredns" / "upstream.Corefile.tmpl",
        layout.upstream / "Corefile",
        UPSTREAM_ADDR=s.plan.upstream_dns_ip, HOSTS_FILE=hosts,
        ROOT_ZONE=layout.infra / "dev" / "coredns" / "upstream-root.db",
    )  # fmt: skip
    s.start("dns-upstream", [
        str(s.bin / "coredns"), "-conf", str(layout.upstream / "Corefile"),
    ], netns=s.plan.inet_netns, cwd=layout.upstream)  # fmt: skip
    s.start("upstream", [
        sys.executable, "-m", "egressctl.devstack.upstream", f"--bind={s.plan.upstream_ip}",
        f"--bind={s.plan.upstream_alt_ip}",
        f"--tcp={node.UPSTREAM_TCP_PORT}", f"--udp={node.UPSTREAM_UDP_PORT}",
    ], netns=s.plan.inet_netns, cwd=layout.repo)  # fmt: skip


def up(layout: Layout) -> State:
    """Bring the stack up, or keep a healthy running one. Raises DevStackError, or
    MissingDependency (before anything starts) without the dev extra's packages."""
    from egressctl.optional import DEV_STACK_PACKAGES, require

    require("the dev stack (egressctl dev up, egressctl run)", *DEV_STACK_PACKAGES)
    t_start = time.monotonic()
    existing = load_state(layout)
    if existing is not None and healthy(layout, existing):
        ensure_identities(layout, existing)
        _write_env(layout, existing)
        apply_infra(layout)
        _say(f"already up and healthy; source {layout.env_file}")
        return existing
    if os.geteuid() != 0:
        raise DevStackError("the node needs root (network namespaces, containerd, kubelet)")
    node.ensure_packages(_say)
    bin_dir = ensure_binaries(layout)  # before cleaning: a failed build keeps nothing
    specs = image_specs(bin_dir)
    archives = images.build_images(image_cache(bin_dir), list(specs.values()))
    refs = {role: spec.ref for role, spec in specs.items()}
    _clean_leftovers(layout, existing)
    for d in (layout.pki, layout.logs, layout.upstream, layout.node.root):
        d.mkdir(parents=True, exist_ok=True)

    slot = node.claim_slot(
        layout.dev, existing.slot if existing is not None and existing.slot >= 0 else None
    )
    plan = AddressPlan(slot)
    ports = free_ports(["etcd", "etcd_peer", "apiserver", "kcm", "scheduler", "pubsub"])
    state = State(bin_dir=str(bin_dir), slot=slot, ports=ports, images=refs, started_at=time.time())
    save_state(layout, state)

    with _stop_on_failure(layout, state):
        _say(f"creating the node's network (slot {slot}: {plan.node_netns}, {plan.inet_netns})")
        node.setup_network(plan)
        s = Starter(layout, state, plan, bin_dir, issue_certificates(layout, plan))

        _say("starting etcd")
        start_etcd(s)
        start_pubsub(s)  # the JVM is the slowest starter: launch it now, check it at the end
        start_containerd(s)  # needs no API server: start it now, import the images meanwhile
        _wait_part(layout, state, "etcd")

        _say("starting kube-apiserver")
        start_apiserver(s)
        _wait_part(layout, state, "containerd")
        t0 = time.monotonic()
        npaths = layout.node
        images.import_images(shutil.which("ctr") or "ctr", str(npaths.containerd_socket), archives)
        _say(f"images imported into the node ({time.monotonic() - t0:.1f}s)")
        state.timings["images-imported"] = round(time.time() - state.started_at, 2)
        _wait_part(layout, state, "kube-apiserver")
        node.guard_pods(plan, ports["apiserver"])
        write_kubeconfigs(s)

        _say("starting kube-controller-manager and kube-scheduler")
        start_controller_manager(s)
        start_scheduler(s)

        _say("starting the node: kubelet, kube-proxy, kube-router")
        start_kubelet(s)
        start_kube_proxy(s)
        start_kube_router(s)

        _say("starting the offline internet (upstream DNS and test services)")
        start_offline_internet(s)

        _wait_part(layout, state, "kube-controller-manager")
        _wait_part(layout, state, "kube-scheduler")
        apply_infra(layout)
        apply_node_manifests(layout, plan, refs["coredns"])
        for part in ("dns-upstream", "upstream", "kubelet", "kube-proxy", "kube-router"):
            _wait_part(layout, state, part)
        _wait_default_service_account(layout)
        _wait("cluster-dns", lambda: cluster_dns_ok(state), None, state=state)
        _wait_part(layout, state, "pubsub")

        state.complete = True
        state.timings["up"] = round(time.time() - state.started_at, 2)
        save_state(layout, state)
        _write_env(layout, state)
    _say(f"stack is up in {time.monotonic() - t_start:.1f}s; source {layout.env_file}")
    return state


def down(layout: Layout) -> int:
    """Stop exactly the recorded processes and remove the node; returns how many stopped."""
    state = load_state(layout)
    if state is None:
        _say("nothing recorded in .cache/dev/state.json; nothing to stop")
        return 0
    stopped = 0
    for rec in reversed(state.procs):
        if stop(rec, timeout=10.0):
            stopped += 1
            _say(f"stopped {rec.name} (pid {rec.pid})")
    plan = owned_plan(layout, state)
    removed = node.teardown(plan, layout.node)
    if removed:
        _say(f"removed {', '.join(removed)}")
    left = node.leftovers(plan, layout.node) if plan else []
    if left:
        raise DevStackError("dev down left these behind: " + "; ".join(left))
    if plan is not None:
        node.release_slot(plan.slot, layout.dev)
    # Containers' state lives under the node folder: gone with it, nothing else keeps it.
    shutil.rmtree(layout.node.root, ignore_errors=True)
    state.complete = False
    state.procs = []
    save_state(layout, state)
    if layout.env_file.exists():
        layout.env_file.unlink()
    return stopped
