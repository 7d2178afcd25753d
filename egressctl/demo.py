"""What `make run` shows after the status table: real traffic on the dev node.

Why: the product's promise is that only granted pods reach a declared destination, by its
real name, through a working gateway. `make run` proves it with real packets: a gateway for
the offline internet's test service (hijacked DNS), a granted and an ungranted client pod,
and each one's request, printed with the command that reruns it by hand.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from reconcile import constants as c

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


def apply_demo(kubeconfig: str, env: Mapping[str, str]) -> None:
    """Create (or keep) the demo ExternalService, namespace and client pods."""
    docs = [
        demo_external_service(env),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE}},
        client_pod("granted", env["EGRESS_DEV_CLIENT_IMAGE"], DEMO_NAME),
        client_pod("ungranted", env["EGRESS_DEV_CLIENT_IMAGE"], None),
    ]
    import yaml

    res = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", "apply", "--server-side",
         "--field-manager=egressctl-run", "-f", "-"],
        input=yaml.safe_dump_all(docs), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"applying the demo failed: {res.stderr.strip()}")


def probe(kubeconfig: str, pod: str, command: str, expect: str) -> Probe:
    res = subprocess.run(
        [exec_argv(pod, command)[0], f"--kubeconfig={kubeconfig}", *exec_argv(pod, command)[1:]],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    out = (res.stdout.strip() or res.stderr.strip()).splitlines()
    text = out[-1] if out else ""
    return Probe(pod, command, text, expect in res.stdout)


def show(
    kubeconfig: str,
    env: Mapping[str, str],
    say: Callable[[str], None],
    wait: Callable[[Callable[[], bool], float], bool],
) -> bool:
    """Print the granted pod reaching the upstream by name and the ungranted one refused."""
    cmd = tcp_command(env)
    expect = f"upstream tcp/{env['EGRESS_DEV_UPSTREAM_TCP_PORT']}"
    granted: list[Probe] = []

    def granted_gets_through() -> bool:
        granted[:] = [probe(kubeconfig, "granted", cmd, expect)]
        return granted[0].ok

    ok = wait(granted_gets_through, 90.0)
    refused = probe(kubeconfig, "ungranted", cmd, expect)
    rerun = " ".join(exec_argv("POD", cmd)[:-1]) + f" '{cmd}'"
    say(f"[run] real traffic on the node (rerun by hand: {rerun})")
    g = granted[0] if granted else Probe("granted", cmd, "", False)
    say(
        f"[run]   {DEMO_NAMESPACE}/granted   ({c.GRANT_LABEL_PREFIX + DEMO_NAME}=true) -> "
        f"{g.output or 'no answer'}"
        + ("   (peer = the gateway pod)" if g.ok else "   (EXPECTED AN ANSWER)")
    )
    say(
        f"[run]   {DEMO_NAMESPACE}/ungranted (no grant label)  -> "
        + ("no answer: refused by the gateway's NetworkPolicy" if not refused.ok else
           f"{refused.output}   (EXPECTED NO ANSWER)")
    )  # fmt: skip
    return ok and not refused.ok
