"""What `make run` shows after the status table: real traffic on the dev node.

Why: the product's promise is that only granted pods reach a declared destination, by its
real name, through a working gateway. `make run` proves it with real packets: a gateway for
the offline internet's test service (hijacked DNS), a granted and an ungranted client pod,
and each one's request, printed with the command that reruns it by hand.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import constants as c

DEMO_NAME = "offline-echo"
DEMO_NAMESPACE = "egress-demo"


@dataclass(frozen=True)
class Probe:
    pod: str
    command: str
    output: str
    ok: bool


def demo_external_service(env: Mapping[str, str]) -> dict[str, Any]:
    """An ExternalService for the offline internet's TCP and UDP test services."""
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": DEMO_NAME},
        "spec": {
            "dnsName": env["EGRESS_DEV_UPSTREAM_NAME"],
            "hijackDns": True,
            "minReplicas": 1,
            "maxReplicas": 2,
            "ports": [
                {"port": int(env["EGRESS_DEV_UPSTREAM_TCP_PORT"]), "protocol": "TCP"},
                {"port": int(env["EGRESS_DEV_UPSTREAM_UDP_PORT"]), "protocol": "UDP"},
            ],
        },
    }


def client_pod(name: str, image: str, granted_for: str | None) -> dict[str, Any]:
    labels = {"app": "egress-demo", "role": name}
    if granted_for:
        labels[c.GRANT_LABEL_PREFIX + granted_for] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": DEMO_NAMESPACE, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "client",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "86400"],
                }
            ],
        },
    }


def tcp_command(env: Mapping[str, str]) -> str:
    return (
        f"echo hi | nc -w 3 {env['EGRESS_DEV_UPSTREAM_NAME']} {env['EGRESS_DEV_UPSTREAM_TCP_PORT']}"
    )


def exec_argv(pod: str, command: str) -> list[str]:
    return ["kubectl", "exec", "-n", DEMO_NAMESPACE, pod, "--", "sh", "-c", command]


def apply_demo(kubeconfig: str, env: Mapping[str, str], default_deny: Path) -> None:
    """Create (or keep) the demo ExternalService, namespace, client pods, and the README's
    default-deny egress policy in the namespace (so the gateway is the only way out)."""
    import yaml

    docs = [
        demo_external_service(env),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE}},
        client_pod("granted", env["EGRESS_DEV_CLIENT_IMAGE"], DEMO_NAME),
        client_pod("ungranted", env["EGRESS_DEV_CLIENT_IMAGE"], None),
    ]
    base = ["kubectl", f"--kubeconfig={kubeconfig}", "apply", "--server-side",
            "--field-manager=egressctl-run"]  # fmt: skip
    for extra, stdin in (
        (["-f", "-"], yaml.safe_dump_all(docs)),
        (["-n", DEMO_NAMESPACE, "-k", str(default_deny)], None),
    ):
        res = subprocess.run(
            [*base, *extra], input=stdin, capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            raise RuntimeError(f"applying the demo failed: {res.stderr.strip()}")


def gateway_ips(kubeconfig: str) -> set[str]:
    res = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", "get", "pods", "-A", "-l",
         f"{c.LABEL_GATEWAY}={DEMO_NAME}", "-o", "jsonpath={.items[*].status.podIP}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return set(res.stdout.split())


def probe(kubeconfig: str, pod: str, command: str) -> Probe:
    """Run ``command`` in a demo pod; ok when the upstream answered through a gateway pod."""
    argv = exec_argv(pod, command)
    res = subprocess.run(
        [argv[0], f"--kubeconfig={kubeconfig}", *argv[1:]],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    lines = res.stdout.strip().splitlines()
    text = lines[-1] if lines else ""
    match = re.search(r"peer=([0-9.]+):", text)
    through_gateway = match is not None and match.group(1) in gateway_ips(kubeconfig)
    return Probe(pod, command, text, through_gateway)


def show(
    kubeconfig: str,
    env: Mapping[str, str],
    say: Callable[[str], None],
    wait: Callable[[Callable[[], bool], float], bool],
) -> bool:
    """Print the granted pod reaching the upstream by name and the ungranted one refused."""
    cmd = tcp_command(env)
    direct = (
        f"echo hi | nc -w 3 {env['EGRESS_DEV_UPSTREAM_IP']} {env['EGRESS_DEV_UPSTREAM_TCP_PORT']}"
    )
    granted: list[Probe] = []

    def granted_gets_through() -> bool:
        granted[:] = [probe(kubeconfig, "granted", cmd)]
        return granted[0].ok

    ok = wait(granted_gets_through, 90.0)
    refused = probe(kubeconfig, "ungranted", cmd)
    bypass = probe(kubeconfig, "granted", direct)
    say("[run] real traffic on the node (namespace egress-demo has the README's default-deny "
        "egress policy); rerun by hand:")  # fmt: skip
    g = granted[0] if granted else Probe("granted", cmd, "", False)
    rows = [
        ("granted", cmd, g, True, "through the gateway pod"),
        ("ungranted", cmd, refused, False, "refused by the gateway's NetworkPolicy"),
        ("granted", direct, bypass, False, "the upstream's own address: denied egress"),
    ]
    for pod, command, result, want, meaning in rows:
        say(f"        {' '.join(exec_argv(pod, '')[:-1])} '{command}'")
        answered = result.output if "upstream" in result.output else "no answer"
        verdict = meaning if result.ok == want else "UNEXPECTED"
        say(f"          -> {answered}   ({verdict})")
    return ok and not refused.output and not bypass.output
