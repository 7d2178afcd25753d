"""Every Corefile the editor's tests edit is one the real CoreDNS loads, with our import live.

Why: the editor (dns/corefile.py) mirrors CoreDNS's Corefile lexer and parser, and its unit
tests can only compare it with what we believe CoreDNS does. CoreDNS has no validate-only mode,
so each edited Corefile (tests/unit/test_corefile.py's CASES and a fixed set of its generated
Corefiles) is run by the CoreDNS binary the dev stack built: on a free 127.0.0.1 port
(``{$DNS_PORT}``), its ``kubernetes`` plugin on the stack's API server (``{$KUBECONFIG}``). A
Corefile CoreDNS refuses makes it exit with the reason before it prints its banner. Once it
serves, one query for a name only our imported rewrite rule answers shows that the import
landed in the block serving the cluster domain. The Corefiles the editor refuses to edit are
checked to be ones CoreDNS refuses too. Traffic goes to 127.0.0.1 and the API server
only: no Corefile here forwards anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, DNSRecord

from core.kube import SERVICE, Kube
from dns.corefile import ensure_import
from dns.render import KEY_SUFFIX, Rule, settled, shard, target_name
from tests.conftest import DevStack
from tests.unit.test_corefile import CASES, LEFT_OPEN, REFUSED, sample_corefile

pytestmark = pytest.mark.cluster

DOMAIN = "cluster.local"
PROBE = "egress-probe.cluster.local"  # NXDOMAIN unless our rewrite rule is imported
START_DEADLINE_S = 20.0  # the kubernetes plugin waits up to 5 s for the API before serving
GENERATED = 24

CORPUS: dict[str, str] = {
    **{name: c.text for name, c in CASES.items()},
    **{
        f"generated #{seed}": sample_corefile(random.Random(seed)).text for seed in range(GENERATED)
    },
}


class Refused(Exception):
    """CoreDNS exited instead of serving."""


@pytest.fixture(scope="module")
def coredns(dev_stack: DevStack) -> Path:
    binary = Path(dev_stack.env["EGRESS_DEV_BIN_DIR"]) / "coredns"
    assert os.access(binary, os.X_OK), f"no CoreDNS binary at {binary}"
    return binary


@pytest.fixture(scope="module")
def kubernetes_ip(admin: Kube) -> str:
    svc = admin.get(SERVICE, "kubernetes", "default")
    assert svc is not None
    return str(svc["spec"]["clusterIP"])


@pytest.fixture(scope="module")
def import_line(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Our import, of a rule that answers PROBE with the API server's Service."""
    rules = tmp_path_factory.mktemp("overrides")
    (rules / "probe.override").write_text(
        f"rewrite stop name exact {PROBE} kubernetes.default.svc.cluster.local\n"
    )
    return f"import {rules}/*.override"


def _free_port() -> int:
    """A 127.0.0.1 port free for both UDP and TCP (CoreDNS listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no free loopback port for both UDP and TCP")


def _wait_for_banner(proc: subprocess.Popen[bytes]) -> str:
    """CoreDNS's output up to its start banner; Refused with the output if it exits first."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    output = b""
    deadline = time.monotonic() + START_DEADLINE_S
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            chunk = os.read(fd, 65536)
            if not chunk:  # it exited
                code = proc.wait(timeout=left)
                raise Refused(f"CoreDNS exited with {code}:\n{output.decode(errors='replace')}")
            output += chunk
            if re.search(rb"(^|\n)CoreDNS-", output):
                return output.decode(errors="replace")
    raise AssertionError(
        f"CoreDNS neither served nor exited in {START_DEADLINE_S}s:\n"
        + output.decode(errors="replace")
    )


@contextlib.contextmanager
def serving(binary: Path, corefile: str, kubeconfig: str, workdir: Path) -> Iterator[int]:
    """Run CoreDNS on ``corefile``; yield its port once it serves."""
    conf = workdir / "Corefile"
    conf.write_text(corefile, encoding="utf-8", newline="")  # byte for byte, CRLF included
    port = _free_port()
    env = {"PATH": os.environ.get("PATH", ""), "DNS_PORT": str(port), "KUBECONFIG": kubeconfig}
    proc = subprocess.Popen(
        [str(binary), "-conf", str(conf)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_banner(proc)
        yield port
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _answers(port: int) -> list[tuple[str, str]]:
    reply = DNSRecord.parse(DNSRecord.question(PROBE, "A").send("127.0.0.1", port, timeout=3))
    return [(str(rr.rname).rstrip("."), str(rr.rdata)) for rr in reply.rr if rr.rtype == QTYPE.A]


@pytest.mark.parametrize("name", list(CORPUS))
def test_coredns_serves_the_edited_corefile_with_our_import(
    name: str,
    coredns: Path,
    dev_stack: DevStack,
    kubernetes_ip: str,
    import_line: str,
    tmp_path: Path,
) -> None:
    original = CORPUS[name]
    edited = ensure_import(original, import_line, DOMAIN)
    assert edited != original
    try:
        with serving(coredns, edited, dev_stack.kubeconfig, tmp_path) as port:
            assert _answers(port) == [(PROBE, kubernetes_ip)], (
                f"our import is not in the cluster block of {edited!r}"
            )
    except Refused as refused:
        try:
            with serving(coredns, original, dev_stack.kubeconfig, tmp_path):
                before = "the original loads"
        except Refused as also:
            before = f"the original is refused too (a bad test case): {also}"
        pytest.fail(f"CoreDNS refuses the edited Corefile {edited!r}: {refused}\n({before})")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_coredns_refuses_what_the_editor_will_not_edit(
    name: str, coredns: Path, dev_stack: DevStack, tmp_path: Path
) -> None:
    with (
        pytest.raises(Refused, match=r"Error during parsing|Syntax error"),
        serving(coredns, REFUSED[name], dev_stack.kubeconfig, tmp_path),
    ):
        pass


def test_a_block_left_open_loads_but_takes_no_line_after_it(
    coredns: Path, dev_stack: DevStack, import_line: str, tmp_path: Path
) -> None:
    with serving(coredns, LEFT_OPEN, dev_stack.kubeconfig, tmp_path):
        pass
    appended = LEFT_OPEN + f"    {import_line}\n    reload 2s\n"
    with (
        pytest.raises(Refused, match="Syntax error"),
        serving(coredns, appended, dev_stack.kubeconfig, tmp_path),
    ):
        pass


def test_a_change_during_a_reload_is_missed_until_the_rules_settle(
    coredns: Path, tmp_path: Path
) -> None:
    """The race dns.delivery settles. On a changed Corefile CoreDNS parses the imports to start
    the new configuration, then, once its plugins have started, once more to record the
    checksum that later checks compare with: rules that change in between are recorded but never
    served, and nothing heals it. The settle marker (one more change once the rules are quiet)
    does. A ``kubernetes`` plugin with no API to reach holds the window open for its
    ``startup_timeout``; its "waiting" line says the first parse is done."""
    namespace = "egress-operator-system"
    targets = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}
    name = "stale.example.com"

    def deliver(data: dict[str, str]) -> None:
        """Write the keys as the kubelet does: whole files, atomically, the rest removed."""
        for old in rules_dir.glob(f"*{KEY_SUFFIX}"):
            if old.name not in data:
                old.unlink()
        for key, text in data.items():
            staged = rules_dir / f".{key}"
            staged.write_text(text, encoding="utf-8")
            staged.replace(rules_dir / key)

    def rules(target: str) -> dict[str, str]:
        return shard([Rule(name, target_name(target, namespace, DOMAIN))])

    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    deliver(rules("a"))
    hosts = "".join(
        f"        {ip} {target_name(t, namespace, DOMAIN)}\n" for t, ip in targets.items()
    )
    conf = tmp_path / "Corefile"
    conf.write_text(
        ".:{$DNS_PORT} {\n    bind 127.0.0.1\n"
        f"    import {rules_dir}/*{KEY_SUFFIX}\n"
        f"    hosts {{\n{hosts}    }}\n"
        f"    kubernetes unused.test {{\n        endpoint http://127.0.0.1:{_free_port()}\n"
        "        startup_timeout 3s\n    }\n"
        "    reload 2s\n}\n",
        encoding="utf-8",
    )
    port = _free_port()
    proc = subprocess.Popen(
        [str(coredns), "-conf", str(conf)],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "DNS_PORT": str(port)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def follow() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    def await_line(pattern: str, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=left)
                if re.search(pattern, line):
                    return line
        raise AssertionError(f"CoreDNS printed no line matching {pattern!r} in {timeout_s}s")

    def answer() -> list[str]:
        reply = DNSRecord.parse(DNSRecord.question(name, "A").send("127.0.0.1", port, timeout=3))
        return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]

    def served(target: str, timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while answer() != [targets[target]]:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    threading.Thread(target=follow, daemon=True).start()
    try:
        await_line(r"^CoreDNS-")
        assert answer() == [targets["a"]]
        deliver(rules("b"))
        await_line(r"\[INFO\] Reloading$")
        await_line(r"waiting for Kubernetes API")  # b is parsed and starting
        deliver(rules("c"))  # lands before the checksum is taken
        await_line(r"Reloading complete")
        assert served("b")
        # c is on disk, recorded as loaded, and not served: checks for three reload intervals
        # change nothing.
        assert not served("c", timeout_s=6.0), "CoreDNS healed without a change"
        # What the kubelet delivers after a settle: the same rules and the marker key.
        deliver(settled(rules("c")))
        assert served("c", timeout_s=20.0), "the settle did not bring the rules"
    finally:
        proc.kill()
        proc.wait()
