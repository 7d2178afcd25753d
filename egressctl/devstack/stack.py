"""The local control plane: real etcd, kube-apiserver, kube-controller-manager, CoreDNS and
the Pub/Sub emulator, started as plain processes on loopback.

Why: there is no container engine on our machines, so kind cannot run; every capability
is still tested against real servers (like controller-runtime's envtest, plus the garbage
collector, cluster DNS fed from ConfigMaps, and Pub/Sub). Binaries are built from pinned
Go modules by ``infra/dev/build.sh`` and cached outside the clone. Run-time state lives in
``.cache/dev/`` of the repository; ``state.json`` records every started process with its
start time so `dev down` stops exactly those.
"""

from __future__ import annotations

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

from egressctl.devstack import pki
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
SERVICE_CIDR = "10.96.0.0/16"
PUBSUB_PROJECT_ID = "egress-dev"
GATEWAY_NAMESPACE = "egress-operator-system"
IDENTITIES = ("egress-reconciler", "egress-exporter")
STATE_VERSION = 1
PART_TIMEOUT = float(os.environ.get("EGRESS_DEV_PART_TIMEOUT", "120"))


def _say(msg: str, out: TextIO | None = None) -> None:
    print(f"[dev {time.strftime('%H:%M:%S')}] {msg}", file=out or sys.stderr, flush=True)


def find_repo() -> Path:
    """The repository holding infra/dev (the source tree of this package, else cwd)."""
    candidates = [Path(__file__).resolve().parents[2], *[Path.cwd(), *Path.cwd().parents]]
    for c in candidates:
        if (c / "infra" / "dev" / "build.sh").is_file():
            return c
    raise DevStackError("cannot find the repository (no infra/dev/build.sh above the cwd)")


@dataclass(frozen=True)
class Layout:
    """Where everything lives."""

    repo: Path

    @property
    def dev(self) -> Path:
        # EGRESS_DEV_DIR lets a second, independent stack run beside the default one.
        override = os.environ.get("EGRESS_DEV_DIR")
        return Path(override) if override else self.repo / ".cache" / "dev"

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
    def dns(self) -> Path:
        """Projected ConfigMaps: dns/<namespace>/<name>/<key>."""
        return self.dev / "dns"

    def projected(self, namespace: str, name: str) -> Path:
        return self.dns / namespace / name

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
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[ProcRecord] = field(default_factory=list)
    complete: bool = False
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "bin_dir": self.bin_dir,
            "ports": self.ports,
            "procs": [p.to_json() for p in self.procs],
            "complete": self.complete,
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        return cls(
            bin_dir=str(data.get("bin_dir", "")),
            ports={str(k): int(v) for k, v in data.get("ports", {}).items()},
            procs=[ProcRecord.from_json(p) for p in data.get("procs", [])],
            complete=bool(data.get("complete", False)),
            started_at=float(data.get("started_at", 0.0)),
        )

    def proc(self, name: str) -> ProcRecord | None:
        return next((p for p in self.procs if p.name == name), None)


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
        _say("control-plane binaries missing for the current pins: building (minutes on 2 cores)")
    proc = subprocess.run([str(script)], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise DevStackError(f"build: infra/dev/build.sh failed with exit code {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    bin_dir = Path(lines[-1]) if lines else Path()
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "coredns"):
        if not os.access(bin_dir / name, os.X_OK):
            raise DevStackError(f"build: {bin_dir / name} is missing after the build")
    return bin_dir


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


def free_ports(names: list[str], udp_too: set[str]) -> dict[str, int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    ports: dict[str, int] = {}
    with ExitStack() as stack:
        for name in names:
            for _attempt in range(50):
                tcp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                tcp.bind(("127.0.0.1", 0))
                port = int(tcp.getsockname()[1])
                if name in udp_too:
                    udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    try:
                        udp.bind(("127.0.0.1", port))
                    except OSError:
                        continue
                ports[name] = port
                break
            else:
                raise DevStackError(f"ports: no free loopback port for {name}")
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


def admin_ssl_context(layout: Layout) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
    ctx.load_cert_chain(str(layout.pki / "admin.crt"), str(layout.pki / "admin.key"))
    return ctx


def dns_query(
    addr: str, name: str, qtype: str = "A", timeout: float = 2.0
) -> tuple[str, list[str]]:
    """Ask ``addr`` (host:port) over UDP; returns (rcode name, answer rdata strings)."""
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


@dataclass
class Check:
    part: str
    ok: bool
    detail: str


def part_checks(layout: Layout, state: State) -> dict[str, Callable[[], tuple[bool, str]]]:
    """Health probes per part, using only the standard library and dnslib (fast)."""
    p = state.ports
    checks: dict[str, Callable[[], tuple[bool, str]]] = {
        "etcd": lambda: _http_ok(f"http://127.0.0.1:{p['etcd']}/health"),
        "kube-apiserver": lambda: _https_ok(
            f"https://127.0.0.1:{p['apiserver']}/readyz", admin_ssl_context(layout)
        ),
        "kube-controller-manager": lambda: _https_ok(
            f"https://127.0.0.1:{p['kcm']}/healthz", ssl._create_unverified_context()
        ),
        "configsync": lambda: (
            (layout.projected("kube-system", "coredns") / "Corefile").is_file(),
            "Corefile projected",
        ),
        "dns-upstream": lambda: _dns_answers(f"127.0.0.1:{p['upstream_dns']}", "api.example.com"),
        "coredns": lambda: _coredns_ok(p),
        "pubsub": lambda: _http_ok(f"http://127.0.0.1:{p['pubsub']}/"),
    }
    return checks


def _coredns_ok(ports: dict[str, int]) -> tuple[bool, str]:
    ok, detail = _http_ok(f"http://127.0.0.1:{ports['coredns_ready']}/ready")
    if not ok:
        return False, f"not ready: {detail}"
    return _dns_answers(f"127.0.0.1:{ports['dns']}", f"kubernetes.default.svc.{CLUSTER_DOMAIN}")


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
    return results


def healthy(layout: Layout, state: State) -> bool:
    return state.complete and all(c.ok for c in check_all(layout, state))


def _wait_part(layout: Layout, state: State, name: str, timeout: float = PART_TIMEOUT) -> None:
    probe = part_checks(layout, state)[name]
    rec = state.proc(name)
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


def _render(template: Path, dest: Path, **values: object) -> str:
    text = string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return text


def env_values(layout: Layout, state: State) -> dict[str, str]:
    p = state.ports
    values = {
        "KUBECONFIG": str(layout.kubeconfig),
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{p['pubsub']}",
        "PUBSUB_PROJECT_ID": PUBSUB_PROJECT_ID,
        "COREDNS_ADDR": f"127.0.0.1:{p['dns']}",
        "COREDNS_UPSTREAM_ADDR": f"127.0.0.1:{p['upstream_dns']}",
        "COREDNS_IMPORT_DIR": str(layout.projected("kube-system", "egress-gateway-dns")),
        # What the reconciler checks the Corefile for (reconcile.settings COREDNS_IMPORT_PATH).
        "COREDNS_IMPORT_PATH": str(layout.projected("kube-system", "egress-gateway-dns"))
        + "/*.override",
        "EGRESS_DEV_UPSTREAM_HOSTS": str(layout.upstream / "hosts"),
        "EGRESS_DEV_DIR": str(layout.dev),
        "EGRESS_DEV_BIN_DIR": state.bin_dir,
        "EGRESS_DEV_API_SERVER": f"https://127.0.0.1:{p['apiserver']}",
    }
    for ident in IDENTITIES:
        key = "KUBECONFIG_" + ident.removeprefix("egress-").upper()
        values[key] = str(layout.identity_kubeconfig(ident))
    return values


def _write_env(layout: Layout, state: State) -> None:
    lines = ["# Written by `egressctl dev up`; source it: . .cache/dev/env"]
    lines += [f"export {k}='{v}'" for k, v in env_values(layout, state).items()]
    tmp = layout.env_file.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(layout.env_file)


def _kubectl(layout: Layout, *args: str) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise DevStackError("infra: kubectl is not installed (needed to apply infra/)")
    return subprocess.run(
        [kubectl, f"--kubeconfig={layout.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=False,
    )


# What `dev up` installs: the CRD, the gateway namespace and the RBAC bound to the stack's
# certificate users (a kustomize overlay; see infra/).
DEV_OVERLAY = ("overlays", "dev")
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


def _put_configmap(layout: Layout, namespace: str, name: str, data: dict[str, str]) -> None:
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(layout.kubeconfig)))
    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace), data=data
    )
    try:
        api.create_namespaced_config_map(namespace, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise DevStackError(
                f"coredns: cannot create ConfigMap {namespace}/{name}: {exc}"
            ) from exc
        api.replace_namespaced_config_map(name, namespace, body)


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


def _clean_leftovers(layout: Layout, state: State | None) -> None:
    if state is not None:
        stopped = [rec.name for rec in reversed(state.procs) if stop(rec)]
        if stopped:
            _say(f"stopped leftovers of a previous run: {', '.join(stopped)}")
    if layout.dev.exists():
        shutil.rmtree(layout.dev)


@contextmanager
def _stop_on_failure(layout: Layout, state: State) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for rec in reversed(state.procs):
            stop(rec)
        state.complete = False
        save_state(layout, state)
        raise


def up(layout: Layout) -> State:
    """Bring the stack up, or keep a healthy running one. Raises DevStackError."""
    t_start = time.monotonic()
    existing = load_state(layout)
    if existing is not None and healthy(layout, existing):
        _write_env(layout, existing)
        apply_infra(layout)
        _say(f"already up and healthy; source {layout.env_file}")
        return existing
    bin_dir = ensure_binaries(layout)  # before cleaning: a failed build keeps nothing
    _clean_leftovers(layout, existing)
    for d in (layout.pki, layout.logs, layout.dns, layout.upstream):
        d.mkdir(parents=True, exist_ok=True)

    ports = free_ports(
        ["etcd", "etcd_peer", "apiserver", "kcm", "dns", "coredns_health", "coredns_ready",
         "upstream_dns", "pubsub"],
        udp_too={"dns", "upstream_dns"},
    )  # fmt: skip
    state = State(bin_dir=str(bin_dir), ports=ports, started_at=time.time())
    save_state(layout, state)
    b = bin_dir
    logs = layout.logs

    def start(name: str, argv: list[str], **kw: Any) -> None:
        state.procs.append(spawn(name, argv, logs / f"{name}.log", **kw))
        save_state(layout, state)

    with _stop_on_failure(layout, state):
        # PKI: one CA for serving and client certs keeps the kubeconfigs simple.
        ca = pki.CertificateAuthority(layout.pki, "ca")
        serving = ca.issue(
            "apiserver", "kube-apiserver", server=True, ips=("127.0.0.1", "10.96.0.1"),
            dns_names=("localhost", "kubernetes", "kubernetes.default",
                       "kubernetes.default.svc", f"kubernetes.default.svc.{CLUSTER_DOMAIN}"),
        )  # fmt: skip
        admin = ca.issue("admin", "egress-dev-admin", organizations=("system:masters",))
        kcm_cert = ca.issue("kcm", "system:kube-controller-manager")
        ident_certs = {i: ca.issue(i, i) for i in IDENTITIES}
        sa = pki.service_account_keys(layout.pki)
        # The aggregation layer's CA, as kubeadm sets it up: it fills the requestheader
        # part of kube-system/extension-apiserver-authentication that the controller
        # manager (and any aggregated API) reads.
        front_ca = pki.CertificateAuthority(layout.pki, "front-proxy-ca")
        front_client = front_ca.issue("front-proxy-client", "front-proxy-client")

        _say("starting etcd")
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd_peer']}"
        start("etcd", [
            str(b / "etcd"), "--name=dev", f"--data-dir={layout.dev / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=dev={peer_url}", "--unsafe-no-fsync", "--log-level=warn",
        ])  # fmt: skip
        # The JVM is the slowest starter: launch it now, check it at the end.
        start("pubsub", pubsub_emulator_command(ports["pubsub"]))
        _wait_part(layout, state, "etcd")

        _say("starting kube-apiserver")
        server = f"https://127.0.0.1:{ports['apiserver']}"
        start("kube-apiserver", [
            str(b / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.pair.cert}",
            f"--service-account-key-file={sa.cert}",
            f"--service-account-signing-key-file={sa.key}",
            f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            f"--requestheader-client-ca-file={front_ca.pair.cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={front_client.cert}",
            f"--proxy-client-key-file={front_client.key}",
            f"--cert-dir={layout.pki / 'apiserver-generated'}",
            "--profiling=false",
        ])  # fmt: skip
        _wait_part(layout, state, "kube-apiserver")

        _kubeconfig(layout.kubeconfig, server, ca.pair.cert, admin, "egress-dev-admin")
        kcm_kubeconfig = layout.dev / "kubeconfig-kube-controller-manager"
        _kubeconfig(
            kcm_kubeconfig, server, ca.pair.cert, kcm_cert, "system:kube-controller-manager"
        )
        for ident, cert in ident_certs.items():
            _kubeconfig(layout.identity_kubeconfig(ident), server, ca.pair.cert, cert, ident)

        _say("starting kube-controller-manager")
        start("kube-controller-manager", [
            str(b / "kube-controller-manager"),
            f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}",
            f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['kcm']}",
            f"--cert-dir={layout.pki / 'kcm-generated'}",
            "--controllers=*", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={sa.key}",
            f"--root-ca-file={ca.pair.cert}",
            f"--cluster-signing-cert-file={ca.pair.cert}",
            f"--cluster-signing-key-file={ca.pair.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            "--profiling=false",
        ])  # fmt: skip

        apply_infra(layout)

        # Cluster DNS: the Corefile is a ConfigMap, projected to disk like kubelet does.
        import_dir = layout.projected("kube-system", "egress-gateway-dns")
        corefile = _render(
            layout.infra / "dev" / "coredns" / "Corefile.tmpl",
            layout.dev / "Corefile.rendered",
            DNS_PORT=ports["dns"], HEALTH_PORT=ports["coredns_health"],
            READY_PORT=ports["coredns_ready"], CLUSTER_DOMAIN=CLUSTER_DOMAIN,
            KUBECONFIG=layout.kubeconfig, IMPORT_DIR=import_dir,
            UPSTREAM_PORT=ports["upstream_dns"],
        )  # fmt: skip
        _put_configmap(layout, "kube-system", "coredns", {"Corefile": corefile})
        sync_config = layout.dev / "configsync.json"
        listed = json.loads((layout.infra / "dev" / "projected-configmaps.json").read_text())
        sync_config.write_text(json.dumps([
            {**p, "dir": str(layout.projected(p["namespace"], p["name"]))} for p in listed
        ], indent=2))  # fmt: skip
        start("configsync", [
            sys.executable, "-m", "egressctl.devstack.configsync",
            f"--kubeconfig={layout.kubeconfig}", f"--config={sync_config}",
        ], cwd=layout.repo)  # fmt: skip
        _wait_part(layout, state, "configsync")

        hosts = layout.upstream / "hosts"
        shutil.copyfile(layout.infra / "dev" / "coredns" / "upstream.hosts", hosts)
        _render(
            layout.infra / "dev" / "coredns" / "upstream.Corefile.tmpl",
            layout.upstream / "Corefile",
            UPSTREAM_PORT=ports["upstream_dns"], HOSTS_FILE=hosts,
            ROOT_ZONE=layout.infra / "dev" / "coredns" / "upstream-root.db",
        )  # fmt: skip
        start("dns-upstream", [
            str(b / "coredns"), "-conf", str(layout.upstream / "Corefile"),
        ], cwd=layout.upstream)  # fmt: skip
        _wait_part(layout, state, "dns-upstream")

        coredns_conf = layout.projected("kube-system", "coredns") / "Corefile"
        start("coredns", [str(b / "coredns"), "-conf", str(coredns_conf)], cwd=layout.dev)
        _wait_part(layout, state, "kube-controller-manager")
        _wait_default_service_account(layout)
        _wait_part(layout, state, "coredns")
        _wait_part(layout, state, "pubsub")

        state.complete = True
        save_state(layout, state)
        _write_env(layout, state)
    _say(f"stack is up in {time.monotonic() - t_start:.1f}s; source {layout.env_file}")
    return state


def down(layout: Layout) -> int:
    """Stop exactly the recorded processes; returns how many were stopped."""
    state = load_state(layout)
    if state is None:
        _say("nothing recorded in .cache/dev/state.json; nothing to stop")
        return 0
    stopped = 0
    for rec in reversed(state.procs):
        if stop(rec):
            stopped += 1
            _say(f"stopped {rec.name} (pid {rec.pid})")
    state.complete = False
    state.procs = []
    save_state(layout, state)
    if layout.env_file.exists():
        layout.env_file.unlink()
    return stopped
