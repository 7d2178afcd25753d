"""The dev stack's real node: its network, its configuration files and its clean-up.

Why a network namespace of its own: the node (containerd, kubelet, kube-proxy, the
NetworkPolicy enforcer) and its pods live in ``egdev<slot>-node``, joined to the machine by
one veth pair, and the "offline internet" (upstream test services and their DNS) lives in
``egdev<slot>-inet`` behind it. The node has no default route, so no pod can reach anything
but the stack's own addresses; every iptables chain, ipset, bridge and route the node makes
is inside namespaces the stack created, and deleting them removes it all. The control plane
stays on the machine and binds the host end of the veth.

Everything here that renders a file is pure; the functions that change the machine are at
the bottom and touch only what is named after the stack's slot or lives under its folder.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from egressctl.devstack.procs import DevStackError, wait_for

NODE_NAME = "egress-dev-node"
MAX_SLOTS = 4
PREFIX = "egdev"
UPSTREAM_TCP_PORT = 8443
UPSTREAM_UDP_PORT = 8053
UPSTREAM_NAME = "echo.offline.test"
# Debian packages the node needs (installed by `dev up` when a command is missing).
PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "ctr": "containerd",
    "iptables": "iptables",
    "ipset": "ipset",
    "conntrack": "conntrack",
    "nsenter": "util-linux",
    "ip": "iproute2",
    "busybox": "busybox-static",
    "nc.openbsd": "netcat-openbsd",
    "dash": "dash",
    "sysctl": "procps",
}
CNI_PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
CNI_PACKAGE = "containernetworking-plugins"


@dataclass(frozen=True)
class AddressPlan:
    """Every address of one stack, derived from its slot (0..3), so stacks never overlap."""

    slot: int

    @property
    def node_netns(self) -> str:
        return f"{PREFIX}{self.slot}-node"

    @property
    def inet_netns(self) -> str:
        return f"{PREFIX}{self.slot}-inet"

    @property
    def host_if(self) -> str:
        return f"{PREFIX}{self.slot}-host"

    @property
    def host_ip(self) -> str:
        """The machine's end of the veth: the API server binds here."""
        return f"10.255.{self.slot}.1"

    @property
    def node_ip(self) -> str:
        return f"10.255.{self.slot}.2"

    @property
    def node_inet_ip(self) -> str:
        return f"10.255.{self.slot}.5"

    @property
    def inet_ip(self) -> str:
        return f"10.255.{self.slot}.6"

    @property
    def pod_cidr(self) -> str:
        return f"10.{244 + self.slot}.0.0/24"

    @property
    def service_cidr(self) -> str:
        return f"10.{96 + self.slot}.0.0/16"

    @property
    def api_service_ip(self) -> str:
        return f"10.{96 + self.slot}.0.1"

    @property
    def cluster_dns_ip(self) -> str:
        return f"10.{96 + self.slot}.0.10"

    @property
    def inet_cidr(self) -> str:
        """The offline internet's addresses (documentation range, RFC 5737)."""
        return f"203.0.113.{64 * self.slot}/26"

    @property
    def upstream_ip(self) -> str:
        return f"203.0.113.{64 * self.slot + 10}"

    @property
    def upstream_alt_ip(self) -> str:
        """A second address of the same test services (for ipOverride: tests remove it to
        make it stop answering)."""
        return f"203.0.113.{64 * self.slot + 11}"

    @property
    def upstream_dns_ip(self) -> str:
        return f"203.0.113.{64 * self.slot + 53}"

    def owns(self, ip: str) -> bool:
        """Whether ``ip`` is one of the stack's own addresses."""
        addr = ipaddress.ip_address(ip)
        nets = [self.pod_cidr, self.service_cidr, self.inet_cidr, f"10.255.{self.slot}.0/29"]
        return any(addr in ipaddress.ip_network(n) for n in nets)


@dataclass(frozen=True)
class NodePaths:
    """Where the node keeps its state: all under the stack's folder."""

    root: Path

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.root / "runc"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy-config.yaml"


# --------------------------------------------------------------------------- rendering


def containerd_config(paths: NodePaths, cni_bin_dir: str, sandbox_image: str) -> str:
    """containerd's own config: its own root, state, sockets and runc root; CRI with CNI.

    ``restrict_oom_score_adj``: the machines lack CAP_SYS_RESOURCE, and runc fails every
    sandbox asking for -998 without it. Pod network namespaces are kept under the state
    folder so clean-up finds exactly ours."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{paths.containerd_root}"
state = "{paths.containerd_state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{paths.containerd_socket}"

[ttrpc]
  address = "{paths.containerd_socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{paths.root / "containerd" / "opt"}"

[{cri}]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{paths.runc_root}"

[{cri}.cni]
  bin_dir = "{cni_bin_dir}"
  conf_dir = "{paths.cni_conf_dir}"
  max_conf_num = 1
"""


def cni_conflist(plan: AddressPlan, paths: NodePaths) -> str:
    """A bridge with host-local IPAM; no masquerade, so upstreams see the pod as the peer."""
    net = ipaddress.ip_network(plan.pod_cidr)
    doc = {
        "cniVersion": "1.0.0",
        "name": f"{PREFIX}{plan.slot}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": f"{PREFIX}br0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(net), "gateway": str(net.network_address + 1)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(doc, indent=2) + "\n"


def kubelet_config(plan: AddressPlan, paths: NodePaths, pki_dir: Path, sync_s: int) -> str:
    """The kubelet's KubeletConfiguration (settings the trial on these machines needed)."""
    import yaml

    doc = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": plan.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": plan.node_ip,
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki_dir / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki_dir / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki_dir / "kubelet-serving.key"),
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "imageServiceEndpoint": f"unix://{paths.containerd_socket}",
        # cgroups here are a v1/v2 hybrid without systemd as the manager.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        # Images are imported, never pulled: garbage-collecting one would break new pods.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "clusterDNS": [plan.cluster_dns_ip],
        "clusterDomain": "cluster.local",
        "resolvConf": str(paths.resolv_conf),
        "podLogsDir": str(paths.pod_logs),
        "syncFrequency": f"{sync_s}s",
        "serializeImagePulls": False,
        "maxPods": 110,
        "nodeStatusReportFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
    }
    return str(yaml.safe_dump(doc, sort_keys=False))


def kube_proxy_config(plan: AddressPlan, kubeconfig: Path) -> str:
    import yaml

    doc = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": plan.pod_cidr,
        "bindAddress": plan.node_ip,
        "healthzBindAddress": f"{plan.node_ip}:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # The conntrack table size is the machine's, not the namespace's: leave it alone.
        "conntrack": {
            "maxPerCore": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
    return str(yaml.safe_dump(doc, sort_keys=False))


def resolv_conf(plan: AddressPlan) -> str:
    """The node's resolver: only the offline internet's DNS (used by dnsPolicy Default pods)."""
    return f"nameserver {plan.upstream_dns_ip}\noptions ndots:1\n"


def upstream_hosts(plan: AddressPlan, base: str) -> str:
    """The offline DNS's hosts file: the checked-in names plus the test services' name."""
    return base.rstrip("\n") + f"\n{plan.upstream_ip}    {UPSTREAM_NAME}\n"


# --------------------------------------------------------------------------- the machine


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise DevStackError(f"node: `{' '.join(argv)}` failed: {res.stderr.strip()}")
    return res


def in_netns(netns: str, argv: list[str]) -> list[str]:
    """Run ``argv`` in a network namespace only (not a new mount namespace, unlike
    `ip netns exec`): the kubelet's mounts must stay visible to containerd."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


def cni_bin_dir() -> str:
    for d in CNI_PLUGIN_DIRS:
        if all((Path(d) / p).is_file() for p in ("bridge", "host-local", "loopback", "portmap")):
            return d
    raise DevStackError(
        f"node: CNI plugins not found in {' or '.join(CNI_PLUGIN_DIRS)} "
        f"(Debian package {CNI_PACKAGE})"
    )


def ensure_packages(say: Callable[[str], None]) -> None:
    """Install the node's Debian packages that are missing (root; CI and fresh machines)."""
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if shutil.which(cmd) is None})
    try:
        cni_bin_dir()
    except DevStackError:
        missing.append(CNI_PACKAGE)
    if not missing:
        return
    if os.geteuid() != 0:
        raise DevStackError(
            f"node: missing Debian packages {' '.join(missing)}; install them as root "
            f"(apt-get install -y {' '.join(missing)})"
        )
    say(f"installing Debian packages for the node: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        res = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise DevStackError(f"node: `{' '.join(argv)}` failed:\n{res.stderr[-2000:]}")


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


SLOT_DIR = Path("/run/egress-dev/slots")


def _slot_file(slot: int) -> Path:
    return SLOT_DIR / f"{PREFIX}{slot}"


def slot_owner(slot: int) -> str | None:
    """The stack folder that claimed ``slot`` (None: nobody)."""
    try:
        return _slot_file(slot).read_text().strip() or None
    except OSError:
        return None


def owns_slot(slot: int, dev: Path) -> bool:
    return slot_owner(slot) == str(dev)


def claim_slot(dev: Path, preferred: int | None = None) -> int:
    """Claim a slot for the stack in ``dev`` (its last one first) and return it.

    A claim is a file naming the stack's folder, so that clean-up after a crash removes the
    namespaces of *this* stack only, never those of another stack that took the slot since.
    A claim whose stack folder no longer has a state file is stale and may be taken over."""
    SLOT_DIR.mkdir(parents=True, exist_ok=True)
    order = ([preferred] if preferred is not None else []) + list(range(MAX_SLOTS))
    for slot in order:
        plan = AddressPlan(slot)
        owner = slot_owner(slot)
        if owner is not None and owner != str(dev) and Path(owner, "state.json").exists():
            continue
        if owner != str(dev) and (
            netns_exists(plan.node_netns)
            or netns_exists(plan.inet_netns)
            or Path("/sys/class/net", plan.host_if).exists()
        ):
            continue  # something else holds these names: never touch it
        tmp = _slot_file(slot).with_suffix(f".{os.getpid()}")
        tmp.write_text(str(dev) + "\n")
        tmp.replace(_slot_file(slot))
        return slot
    raise DevStackError(
        f"node: all {MAX_SLOTS} stack slots are in use ({PREFIX}0..{MAX_SLOTS - 1}, claims in "
        f"{SLOT_DIR}); stop another dev stack (`egressctl dev down` with its EGRESS_DEV_DIR)"
    )


def release_slot(slot: int, dev: Path) -> None:
    if owns_slot(slot, dev):
        with contextlib.suppress(OSError):
            _slot_file(slot).unlink()


def setup_network(plan: AddressPlan) -> None:
    """Create the two namespaces, the veths, the routes and the node's guard."""
    node, inet = plan.node_netns, plan.inet_netns
    _run("ip", "netns", "add", node)
    _run("ip", "netns", "add", inet)
    _run("ip", "link", "add", plan.host_if, "type", "veth", "peer", "name", "eth0", "netns", node)
    _run("ip", "addr", "add", f"{plan.host_ip}/30", "dev", plan.host_if)
    _run("ip", "link", "set", plan.host_if, "up")
    n = ["ip", "-n", node]
    _run(*n, "addr", "add", f"{plan.node_ip}/30", "dev", "eth0")
    _run(*n, "link", "set", "lo", "up")
    _run(*n, "link", "set", "eth0", "up")
    _run(*n, "link", "add", "inet0", "type", "veth", "peer", "name", "eth0", "netns", inet)
    _run(*n, "addr", "add", f"{plan.node_inet_ip}/30", "dev", "inet0")
    _run(*n, "link", "set", "inet0", "up")
    _run(*n, "route", "add", plan.inet_cidr, "via", plan.inet_ip)
    i = ["ip", "-n", inet]
    _run(*i, "link", "set", "lo", "up")
    _run(*i, "addr", "add", f"{plan.inet_ip}/30", "dev", "eth0")
    _run(*i, "link", "set", "eth0", "up")
    _run(*i, "addr", "add", f"{plan.upstream_ip}/32", "dev", "lo")
    _run(*i, "addr", "add", f"{plan.upstream_alt_ip}/32", "dev", "lo")
    _run(*i, "addr", "add", f"{plan.upstream_dns_ip}/32", "dev", "lo")
    # The offline internet answers only the node (which forwards for pods and the host).
    _run(*i, "route", "add", "default", "via", plan.node_inet_ip)
    for cidr in (plan.service_cidr, plan.pod_cidr, plan.inet_cidr):
        _run("ip", "route", "add", cidr, "via", plan.node_ip, "dev", plan.host_if)
    sysctls = {
        "net.ipv4.ip_forward": "1",
        "net.bridge.bridge-nf-call-iptables": "1",
        "net.bridge.bridge-nf-call-ip6tables": "1",
        "net.ipv6.conf.all.disable_ipv6": "1",
    }
    for key, value in sysctls.items():
        _run(*in_netns(node, ["sysctl", "-q", "-w", f"{key}={value}"]))


def guard_pods(plan: AddressPlan, api_port: int) -> None:
    """Pods may reach the machine only at the API server (mangle runs before kube-proxy's
    DNAT and is not used by the policy enforcer, so nothing later can re-open this)."""
    chain = f"{PREFIX.upper()}-GUARD"
    ipt = ["iptables", "-w", "-t", "mangle"]
    cmds = [
        [*ipt, "-N", chain],
        [*ipt, "-A", chain, "-d", plan.host_ip, "-p", "tcp", "--dport", str(api_port), "-j",
         "RETURN"],
        [*ipt, "-A", chain, "-d", f"10.255.{plan.slot}.0/29", "-j", "DROP"],
        [*ipt, "-I", "PREROUTING", "1", "-s", plan.pod_cidr, "-j", chain],
    ]  # fmt: skip
    for argv in cmds:
        _run(*in_netns(plan.node_netns, argv))


# --------------------------------------------------------------------------- clean-up


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def pids_in_netns(name: str) -> list[int]:
    ino = _netns_inode(name)
    if ino is None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino == ino:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if (target + "/").startswith(prefix):
                found.append(target)
    return sorted(found, key=len, reverse=True)


def _containers(paths: NodePaths) -> list[tuple[str, str]]:
    """(runc root, id) of every container runc knows under the node's runc root."""
    out: list[tuple[str, str]] = []
    if not paths.runc_root.is_dir():
        return out
    for root in [p for p in paths.runc_root.iterdir() if p.is_dir()]:
        res = _run("runc", "--root", str(root), "list", "-q", check=False)
        out += [(str(root), cid) for cid in res.stdout.split()]
    return out


def _shim_pids(paths: NodePaths) -> list[int]:
    """containerd's shims outlive it; ours carry our socket in their command line."""
    needle = str(paths.containerd_socket).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmd and needle in cmd:
            pids.append(int(entry.name))
    return pids


def teardown(plan: AddressPlan | None, paths: NodePaths) -> list[str]:
    """Remove everything the node made; safe to run twice and after a crash.

    Order matters: containers and shims first (they hold mounts and pod namespaces), then
    every process still inside our namespaces, then mounts under our folder, then the
    namespaces (which takes their veths, bridge, routes, iptables chains and ipsets along)."""
    done: list[str] = []
    containers = _containers(paths)
    for root, cid in containers:
        _run("runc", "--root", root, "kill", "-a", cid, "KILL", check=False)
    shims = _shim_pids(paths)
    _kill_all(shims)
    for root, cid in containers:
        _run("runc", "--root", root, "delete", "-f", cid, check=False)
    if shims:
        done.append(f"{len(shims)} containerd shim(s)")
    if plan is not None:
        for ns in (plan.node_netns, plan.inet_netns):
            pids = pids_in_netns(ns)
            _kill_all(pids)
            wait_for(lambda ns=ns: not pids_in_netns(ns), 10.0)  # type: ignore[misc]
            if pids:
                done.append(f"{len(pids)} process(es) in {ns}")
    mounts = _mounts_under(paths.root) if paths.root.exists() else []
    for target in mounts:
        _run("umount", "-l", target, check=False)
    if mounts:
        done.append(f"{len(mounts)} mount(s)")
    if plan is not None:
        for ns in (plan.node_netns, plan.inet_netns):
            if netns_exists(ns):
                _run("ip", "netns", "delete", ns, check=False)
                done.append(f"namespace {ns}")
        if Path("/sys/class/net", plan.host_if).exists():
            _run("ip", "link", "delete", plan.host_if, check=False)
            done.append(f"link {plan.host_if}")
    # containerd 1.6's shims put their sockets in /run/containerd/s whatever the config says;
    # they remove their own, and the folders go when nothing else (another containerd) is left.
    for d in (Path("/run/containerd/s"), Path("/run/containerd")):
        with contextlib.suppress(OSError):
            d.rmdir()
    return done


def leftovers(plan: AddressPlan, paths: NodePaths) -> list[str]:
    """What of the node is still on the machine (empty after a clean `dev down`)."""
    found = []
    for ns in (plan.node_netns, plan.inet_netns):
        if netns_exists(ns):
            found.append(f"network namespace {ns}")
        found += [f"process {p} in {ns}" for p in pids_in_netns(ns)]
    if Path("/sys/class/net", plan.host_if).exists():
        found.append(f"link {plan.host_if}")
    routes = _run("ip", "route", "show", check=False).stdout
    for cidr in (plan.service_cidr, plan.pod_cidr, plan.inet_cidr):
        if cidr in routes:
            found.append(f"route {cidr}")
    if paths.root.exists():
        found += [f"mount {m}" for m in _mounts_under(paths.root)]
    found += [f"container {cid}" for _, cid in _containers(paths)]
    found += [f"shim pid {p}" for p in _shim_pids(paths)]
    return found
