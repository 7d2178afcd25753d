"""What the API server itself counted, and the bench stack's controller-manager paused.

Requests are read from the API server's own counter ``apiserver_request_total`` (its /metrics,
as the admin) before and after a pass, so a figure is what reached the server, whatever the
client believes it sent. Only the resources the reconciler (or the original operator) touches
are counted: the node's agents keep writing leases, events and pod status meanwhile, and those
are not ours. WATCH is left out (a long-lived request, counted once when it opens).

The controller-manager is paused (SIGSTOP, SIGCONT after) while converges are measured, as in
issue 14's side-by-side run: otherwise the same 2 cores also create a ReplicaSet and a pod per
gateway, and its HPA controller reads every Deployment's scale.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import TransientError
from core.kube import Kube

# The kinds the reconciler reads or writes, by the API server's resource name.
RESOURCES = frozenset(
    {
        "externalservices",
        "configmaps",
        "services",
        "deployments",
        "horizontalpodautoscalers",
        "networkpolicies",
        "poddisruptionbudgets",
        "endpointslices",
        "pods",
    }
)
# Subresources the reconciler writes; the others (pods/status, deployments/status, ...) are
# the node's and the controllers'.
SUBRESOURCES = frozenset({"", "status"})
VERBS = ("LIST", "GET", "POST", "APPLY", "PATCH", "PUT", "DELETE")
WRITE_VERBS = frozenset({"POST", "APPLY", "PATCH", "PUT", "DELETE"})
_SAMPLE = re.compile(r"^apiserver_request_total\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')

Sample = tuple[str, str, str, str]  # verb, resource, subresource, code


def metrics_text(admin: Kube) -> str:
    """The API server's ``/metrics``, as the Prometheus text it serves."""
    response = admin.api.call_api(
        "/metrics",
        "GET",
        header_params={"Accept": "text/plain"},
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=30,
    )
    raw = response[0] if isinstance(response, tuple) else response
    return str(raw.data.decode())


def request_total(admin: Kube) -> Counter[Sample]:
    """The API server's ``apiserver_request_total``, by verb, resource, subresource, code."""
    out: Counter[Sample] = Counter()
    for line in metrics_text(admin).splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group(1)))
        key = (
            labels.get("verb", ""),
            labels.get("resource", ""),
            labels.get("subresource", ""),
            labels.get("code", ""),
        )
        out[key] += int(float(match.group(2)))
    return out


def ours(before: Counter[Sample], after: Counter[Sample]) -> dict[str, Any]:
    """Requests between two readings on the reconciler's resources: by verb, writes, 429s."""
    by_verb: Counter[str] = Counter()
    by_resource: Counter[str] = Counter()
    throttled = 0
    for key, value in after.items():
        verb, resource, subresource, code = key
        n = value - before.get(key, 0)
        if n <= 0 or resource not in RESOURCES or subresource not in SUBRESOURCES:
            continue
        if verb not in VERBS:
            continue
        by_verb[verb] += n
        by_resource[f"{verb} {resource}{'/' + subresource if subresource else ''}"] += n
        if code == "429":
            throttled += n
    return {
        "byVerb": {v: by_verb[v] for v in VERBS if by_verb[v]},
        "total": sum(by_verb.values()),
        "writes": sum(n for v, n in by_verb.items() if v in WRITE_VERBS),
        "throttled429": throttled,
        "byResource": dict(sorted(by_resource.items())),
    }


def verbs_text(fig: dict[str, Any]) -> str:
    return ", ".join(f"{verb} {n}" for verb, n in fig["byVerb"].items()) or "none"


def _part_pid(part: str) -> int | None:
    """The pid of a part of the bench stack, if it is the process the stack started."""
    from egressctl.devstack.procs import is_running
    from egressctl.devstack.stack import Layout, load_state

    layout = Layout(Path(__file__).resolve().parents[1])
    if layout.dev == layout.repo / ".cache" / "dev":
        return None  # the shared stack that tests use: never paused by a benchmark
    state = load_state(layout)
    record = state.proc(part) if state is not None else None
    if record is None or not is_running(record):
        return None
    return record.pid


# The control plane's parts whose CPU a pass costs (the node's kube-router re-syncs its rules
# on every NetworkPolicy change).
SERVER_PARTS = ("kube-apiserver", "etcd", "kube-router")


def cpu_seconds(parts: tuple[str, ...] = SERVER_PARTS) -> dict[str, float]:
    """CPU time (user and system) each part of the bench stack has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for part in parts:
        pid = _part_pid(part)
        if pid is None:
            continue
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[part] = (int(fields[11]) + int(fields[12])) / tick
    return out


def own_cpu_seconds() -> float:
    """CPU time (user and system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 2)


@contextlib.contextmanager
def paused(part: str = "kube-controller-manager") -> Iterator[bool]:
    """Stop one process of the bench stack (SIGSTOP) for the block, then let it go on."""
    pid = _part_pid(part)
    if pid is None:
        print(f"[bench] {part} not found: measuring with it running", file=sys.stderr)
        yield False
        return
    os.kill(pid, signal.SIGSTOP)
    try:
        yield True
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def node_paused() -> Iterator[list[str]]:
    """The controller-manager and the node's agents that react to gateway objects, paused for
    the block: the 2 cores then measure the reconciler and the API server, not kube-router
    resyncing its rules for each NetworkPolicy (what a separate API server would see)."""
    with contextlib.ExitStack() as stack:
        yield [
            part
            for part in ("kube-controller-manager", "kube-proxy", "kube-router")
            if stack.enter_context(paused(part))
        ]


def delete_all(admin: Kube, path: str, selector: str) -> None:
    """A collection DELETE, again until it completes: with thousands of objects one request
    can outlast the API server's 60 s (504), having deleted only some."""
    for _ in range(30):
        try:
            admin.request("DELETE", path, query=[("labelSelector", selector)])
            return
        except TransientError:
            continue
    raise RuntimeError(f"could not empty {path}")


def own_peak_rss_mib() -> float:
    """This process's own peak RSS since it started (VmHWM of its address space).

    Not ``ru_maxrss``: Linux carries it across exec, so a child started by a big parent
    (vfork/fork, then exec) reports at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def emit(result: dict[str, Any]) -> None:
    """A child pass's result, on the last line of its stdout."""
    print(json.dumps(result), flush=True)
