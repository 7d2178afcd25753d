"""Benchmark: `egressctl access` over 1,000 ExternalServices and 5,000 pods in 500 namespaces.

Creates, through the API on the benchmarks' own stack (in parallel; idempotent, so a rerun on a
stack kept with EGRESS_DEV_KEEP=1 reuses what is there):

- 1,000 ExternalServices (a tenth with two ports, a few on 5432 or DNS over UDP and TCP, one in
  twenty with an ipOverride in 10.0.0.0/8), each with the gateway Service and NetworkPolicy the
  reconciler renders (``gateway.render``, applied under its field manager) and one gateway pod
  made from its Deployment's pod template. No gateway Deployments: their pods would run, 1,000
  Envoys on 2 cores; the audit reads pods, not Deployments.
- 500 namespaces: half with the README's default-deny egress example
  (infra/examples/default-deny-egress), a fifth with a default-deny that forgets the gateway
  namespace, a tenth with the example plus a policy opening the internet to one workload and an
  ingress policy, a fifth with no egress policy (half of them with an ingress-only one).
- 5,000 pods, 10 a namespace: Deployment ``api`` (4 pods, 3 per-gateway grants), Deployment
  ``worker`` (3 pods, one grant; either label form; one namespace in 25 mid-rollout, an old
  ReplicaSet without the grant), CronJob ``report`` -> Job (1 pod, one grant), Job ``migrate``
  and a bare Pod ``debug`` (ungranted; a few name a missing gateway or give a value other than
  "true"). Every pod carries a scheduling gate: the scheduler leaves it alone, nothing runs.

The controller manager runs every controller, so the owners are made to leave our pods alone:
Deployments are paused (they create no ReplicaSet), the ReplicaSets we create (with the
Deployment as controller, ``replicas`` = their pods) have a pod template naming a PriorityClass
that does not exist, so the ReplicaSet controller cannot add pods while ours are being created
(at most a refused create each, then it counts ours), and Jobs are ``managedBy`` nobody. (The
mid-rollout Deployments see one transient scale of their first ReplicaSet, undone as soon as
the second exists: nothing is created or deleted; ``check`` verifies every pod is still there.)

Then measures, each in a fresh process as the read-only auditor ($KUBECONFIG_AUDITOR), with
wall time, API requests (a LIST counted once per page, from the client's own counters) and peak
RSS (the child's VmHWM: its ru_maxrss would include this process's, see ``_peak_kib``):
``--all --json`` (BENCH_REPEAT times, default 3), the same without the counting wrapper,
``--all --csv --svg``, one ExternalService and one namespace; and, in one more process through
the Python API, the split between the LISTs, parsing, the evaluation and each rendering.

Run: `make bench` (or `.venv/bin/python -m bench.access`; `--clean` removes the objects).
Sizes: BENCH_ES, BENCH_NS (10 pods each). The machine's 2 cores are shared with the dev node
(kube-router re-syncs on every NetworkPolicy change) and whatever else runs: expect noise.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

from bench._apiserver import metrics_text
from bench._common import rss_kb
from bench.stack import REPO, bench_stack

if TYPE_CHECKING:
    from core.kube import Kube, Obj, Resource

SUITE_LABEL = "bench.egress.monzo.com/suite"
SUITE = "access"
SELECTOR = f"{SUITE_LABEL}={SUITE}"
GATE = "bench.egress.monzo.com/never"
NO_SUCH_PRIORITY_CLASS = "bench-egress-no-such-class"
MANAGED_BY = "bench.egress.monzo.com/nobody"
ES_PREFIX = "svc-"
NS_PREFIX = "app-"
PODS_PER_NS = 10
WORKERS = 8
ALNUM = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes draws generated name suffixes from
WRITE_VERBS = ('verb="POST"', 'verb="PUT"', 'verb="PATCH"', 'verb="DELETE"', 'verb="APPLY"')


def _es_name(i: int) -> str:
    return f"{ES_PREFIX}{i:04d}"


def _ns_name(i: int) -> str:
    return f"{NS_PREFIX}{i:03d}"


def _suffix(seed: str, n: int) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(ALNUM[b % len(ALNUM)] for b in digest[:n])


def _mib(kib: int) -> float:
    return kib / 1024


# -- the objects --------------------------------------------------------------------------------


def _es_body(i: int) -> Obj:
    from core import constants as c

    name = _es_name(i)
    spec: Obj = {"dnsName": f"{name}.example.com", "ports": [{"port": 443}], "minReplicas": 1}
    if i % 10 == 0:
        spec["ports"] = [{"port": 443}, {"port": 80}]
    elif i % 50 == 5:
        spec["ports"] = [{"port": 5432}]
    elif i % 100 == 7:
        spec["ports"] = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    if i % 20 == 3:
        spec["ipOverride"] = [f"10.20.{i // 250}.{i % 250 + 1}"]
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name, "labels": {SUITE_LABEL: SUITE}},
        "spec": spec,
    }


@functools.cache
def _default_deny_example_text() -> str:
    return (REPO / "infra/examples/default-deny-egress/networkpolicy.yaml").read_text()


def _default_deny_example() -> Obj:
    import yaml

    example: Obj = yaml.safe_load(_default_deny_example_text())
    return example


def _policies(i: int) -> list[Obj]:
    """The namespace's NetworkPolicies, by i % 10: 0-4 the default-deny example, 5-6 a
    default-deny that forgets the gateway namespace, 7 the example plus an internet opening for
    ``worker`` and an ingress policy, 8 none, 9 an ingress-only policy."""
    from core.settings import DEFAULT_GATEWAY_NAMESPACE

    example = _default_deny_example()
    same_namespace: Obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-same-namespace"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
        },
    }
    kind = i % 10
    out: list[Obj] = []
    if kind <= 4 or kind == 7:
        out.append(example)
    elif kind in (5, 6):
        forgetful = copy.deepcopy(example)
        forgetful["metadata"]["name"] = "deny-egress"
        forgetful["spec"]["egress"] = [
            rule
            for rule in forgetful["spec"]["egress"]
            if DEFAULT_GATEWAY_NAMESPACE not in json.dumps(rule)
        ]
        out.append(forgetful)
    if kind == 7:
        out.append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "allow-internet-worker"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "worker"}},
                    "policyTypes": ["Egress"],
                    "egress": [
                        {
                            "to": [
                                {
                                    "ipBlock": {
                                        "cidr": "0.0.0.0/0",
                                        "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
                                    }
                                }
                            ],
                            "ports": [{"port": 443, "protocol": "TCP"}],
                        }
                    ],
                },
            }
        )
    if kind in (7, 9):
        out.append(same_namespace)
    for policy in out:
        policy["metadata"].setdefault("labels", {})[SUITE_LABEL] = SUITE
    return out


def _grants(i: int, n_es: int) -> dict[str, dict[str, str]]:
    """Grant labels per workload of namespace ``i``."""
    from core import constants as c

    def es(k: int) -> str:
        return _es_name(k % n_es)

    worker = es(7 * i + 501)
    debug: dict[str, str] = {}
    if i % 50 == 0:
        debug = {c.grant_label("svc-retired"): c.GRANT_LABEL_VALUE}  # names no ExternalService
    elif i % 50 == 25:
        debug = {c.grant_label(es(3 * i)): "yes"}  # a value the gateway ignores
    return {
        "api": {c.grant_label(es(3 * i + k)): c.GRANT_LABEL_VALUE for k in range(3)},
        "worker": (
            {c.GRANT_LABEL_GATEWAY: worker}
            if i % 4 == 0
            else {c.grant_label(worker): c.GRANT_LABEL_VALUE}
        ),
        "report": {c.grant_label(es(11 * i + 3)): c.GRANT_LABEL_VALUE},
        "migrate": {},
        "debug": debug,
    }


def _pod_spec(namespace: str, app: str, *, job: bool = False, template: bool = False) -> Obj:
    container: Obj = {
        "name": app,
        "image": f"registry.example.com/{namespace}/{app}:1.4.2",
        "env": [
            {"name": "LOG_LEVEL", "value": "info"},
            {"name": "REGION", "value": "europe-west2"},
            {"name": "SERVICE_NAME", "value": f"{namespace}-{app}"},
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": app, "key": "db"}}},
        ],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "256Mi"},
        },
    }
    spec: Obj = {"containers": [container], "schedulingGates": [{"name": GATE}]}
    if job:
        spec["restartPolicy"] = "Never"
    else:
        container["ports"] = [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
        container["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}}
        spec["terminationGracePeriodSeconds"] = 30
    if template:
        spec["priorityClassName"] = NO_SUCH_PRIORITY_CLASS
    return spec


def _owner(obj: Obj) -> Obj:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(name: str, labels: dict[str, str] | None = None, owner: Obj | None = None) -> Obj:
    meta: Obj = {"name": name, "labels": {**(labels or {}), SUITE_LABEL: SUITE}}
    if owner is not None:
        meta["ownerReferences"] = [_owner(owner)]
    return meta


# -- creating them ------------------------------------------------------------------------------


class Creator:
    """POSTs objects that do not exist yet (a LIST per kind first, so a rerun is cheap)."""

    def __init__(self, admin: Kube) -> None:
        self.admin = admin
        self.live: dict[tuple[str, str, str], Obj] = {}
        self.created: Counter[str] = Counter()

    def load(self, resources: list[Resource], gateway_namespace: str) -> None:
        from core.kube import NETWORK_POLICY, POD, SERVICE

        for res in resources:
            items, _ = self.admin.list_all(res, label_selector=SELECTOR)
            self._remember(items)
        for res in (SERVICE, NETWORK_POLICY, POD):
            items, _ = self.admin.list_all(res, gateway_namespace)
            self._remember(items)

    def _remember(self, items: list[Obj]) -> None:
        for item in items:
            meta = item["metadata"]
            self.live[(item["kind"], meta.get("namespace", ""), meta["name"])] = item

    def exists(self, kind: str, namespace: str, name: str) -> bool:
        return (kind, namespace, name) in self.live

    def ensure(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        from core.errors import PermanentError

        key = (res.kind, namespace or "", obj["metadata"]["name"])
        found = self.live.get(key)
        if found is not None:
            return found
        obj = {"apiVersion": res.api_version, "kind": res.kind, **obj}
        deadline = time.monotonic() + 120
        while True:
            try:
                live: Obj = self.admin.request(
                    "POST", res.path(namespace), body=obj, final_statuses=frozenset({409})
                )
                self.created[res.kind] += 1
                break
            except PermanentError as exc:
                if exc.status == 409:
                    got = self.admin.get(res, obj["metadata"]["name"], namespace)
                    assert got is not None
                    live = got
                    break
                # A new namespace's default ServiceAccount comes a moment after it.
                no_account = "serviceaccount" in str(exc).replace(" ", "").lower()
                if exc.status == 403 and no_account and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise
        live.setdefault("apiVersion", res.api_version)
        live.setdefault("kind", res.kind)
        self.live[key] = live
        return live


def _gateway(creator: Creator, i: int) -> None:
    """An ExternalService and what the reconciler would make of it for the audit to read."""
    from core.hijack import HijackState
    from core.kube import EXTERNAL_SERVICE, NETWORK_POLICY, POD, SERVICE
    from core.spec import parse_external_service
    from gateway import render
    from tests.integration.helpers import dev_settings

    settings = dev_settings()
    ns = settings.gateway_namespace
    es = parse_external_service(creator.ensure(EXTERNAL_SERVICE, _es_body(i)))
    for res, obj in (
        (NETWORK_POLICY, render.network_policy(es, settings)),
        (SERVICE, render.service(es, settings, HijackState.FALSE)),
    ):
        if not creator.exists(res.kind, ns, es.name):
            creator.admin.apply(obj)
            creator.created[res.kind] += 1
    template = render.deployment(es, settings)["spec"]["template"]
    pod_hash = _suffix(es.name, 10)
    spec = {**template["spec"], "schedulingGates": [{"name": GATE}]}
    pod: Obj = {
        "metadata": {
            **_meta(
                f"{es.name}-{pod_hash}-{_suffix(es.name + '/0', 5)}",
                {**template["metadata"]["labels"], "pod-template-hash": pod_hash},
            ),
            "annotations": template["metadata"]["annotations"],
        },
        "spec": spec,
    }
    creator.ensure(POD, pod, ns)


def _deployment(
    creator: Creator, ns: str, app: str, sets: list[tuple[dict[str, str], int]]
) -> None:
    """A paused Deployment and its ReplicaSets (the last one current), each with its pods."""
    from core.kube import DEPLOYMENT, POD, REPLICA_SET

    base = {"app": app, "app.kubernetes.io/name": app, "app.kubernetes.io/part-of": ns}
    current = {**base, **sets[-1][0]}
    dep = creator.ensure(
        DEPLOYMENT,
        {
            "metadata": _meta(app, base),
            "spec": {
                "paused": True,
                "replicas": sum(n for _, n in sets),
                "selector": {"matchLabels": {"app": app}},
                # No surge: a paused Deployment with two ReplicaSets would otherwise scale
                # them proportionally up to replicas + maxSurge.
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
                },
                "template": {
                    "metadata": {"labels": current},
                    "spec": _pod_spec(ns, app, template=True),
                },
            },
        },
        ns,
    )
    for grants, n in sets:
        labels = {**base, **grants}
        pod_hash = _suffix(f"{ns}/{app}/{sorted(labels.items())}", 10)
        labels["pod-template-hash"] = pod_hash
        rs_name = f"{app}-{pod_hash}"
        rs = creator.ensure(
            REPLICA_SET,
            {
                "metadata": _meta(rs_name, labels, dep),
                "spec": {
                    "replicas": n,
                    "selector": {"matchLabels": {"app": app, "pod-template-hash": pod_hash}},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": _pod_spec(ns, app, template=True),
                    },
                },
            },
            ns,
        )
        for k in range(n):
            pod = {
                "metadata": _meta(f"{rs_name}-{_suffix(f'{rs_name}/{k}', 5)}", labels, rs),
                "spec": _pod_spec(ns, app),
            }
            creator.ensure(POD, pod, ns)


def _job(creator: Creator, ns: str, name: str, grants: dict[str, str], owner: Obj | None) -> None:
    """A Job nobody manages (``managedBy``) and its one pod."""
    from core.kube import JOB, POD

    app = name.split("-")[0]
    job = creator.ensure(
        JOB,
        {
            "metadata": _meta(name, {"app": app}, owner),
            "spec": {
                "managedBy": MANAGED_BY,
                "template": {
                    "metadata": {"labels": {"app": app, **grants}},
                    "spec": _pod_spec(ns, app, job=True),
                },
            },
        },
        ns,
    )
    labels = job["spec"]["template"]["metadata"]["labels"]  # with the API server's job labels
    pod = {
        "metadata": _meta(f"{name}-{_suffix(name, 5)}", labels, job),
        "spec": _pod_spec(ns, app, job=True),
    }
    creator.ensure(POD, pod, ns)


CRON_JOB_RESOURCE = ("batch/v1", "CronJob", "cronjobs")


def _namespace(creator: Creator, i: int, n_es: int) -> None:
    from core.kube import NETWORK_POLICY, POD, Resource

    cron_job = Resource(*CRON_JOB_RESOURCE)
    ns = _ns_name(i)
    for policy in _policies(i):
        creator.ensure(NETWORK_POLICY, policy, ns)
    grants = _grants(i, n_es)
    _deployment(creator, ns, "api", [(grants["api"], 4)])
    if i % 25 == 3:  # mid-rollout: the grant is new, one old pod lacks it
        _deployment(creator, ns, "worker", [({}, 1), (grants["worker"], 2)])
    else:
        _deployment(creator, ns, "worker", [(grants["worker"], 3)])
    cj = creator.ensure(
        cron_job,
        {
            "metadata": _meta("report", {"app": "report"}),
            "spec": {
                "schedule": "17 3 * * *",
                "suspend": True,
                "jobTemplate": {
                    "spec": {
                        "managedBy": MANAGED_BY,
                        "template": {
                            "metadata": {"labels": {"app": "report", **grants["report"]}},
                            "spec": _pod_spec(ns, "report", job=True),
                        },
                    }
                },
            },
        },
        ns,
    )
    _job(creator, ns, "report-29418777", grants["report"], cj)
    _job(creator, ns, "migrate-v42", grants["migrate"], None)
    labels = {"app": "debug", "run": "debug", **grants["debug"]}
    creator.ensure(POD, {"metadata": _meta("debug", labels), "spec": _pod_spec(ns, "debug")}, ns)


def _parallel(fn: Callable[[int], None], n: int) -> None:
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(fn, range(n)))


def setup(admin: Kube, n_es: int, n_ns: int) -> dict[str, Any]:
    from core.kube import (
        DEPLOYMENT,
        EXTERNAL_SERVICE,
        JOB,
        NAMESPACE,
        NETWORK_POLICY,
        POD,
        REPLICA_SET,
        Resource,
    )
    from core.settings import DEFAULT_GATEWAY_NAMESPACE

    creator = Creator(admin)
    t = time.perf_counter()
    kinds = [NAMESPACE, EXTERNAL_SERVICE, NETWORK_POLICY, DEPLOYMENT, REPLICA_SET, JOB, POD]
    creator.load([*kinds, Resource(*CRON_JOB_RESOURCE)], DEFAULT_GATEWAY_NAMESPACE)
    found = len(creator.live)

    def namespace(i: int) -> None:
        name = _ns_name(i)
        labels = {"team": f"team-{i % 20:02d}", "env": "staging" if i % 3 == 0 else "prod"}
        creator.ensure(NAMESPACE, {"metadata": _meta(name, labels)})

    _parallel(namespace, n_ns)
    _parallel(lambda i: _gateway(creator, i), n_es)  # meanwhile the default ServiceAccounts come
    _parallel(lambda i: _namespace(creator, i, n_es), n_ns)
    return {
        "seconds": time.perf_counter() - t,
        "found": found,
        "created": dict(creator.created),
        "requests": admin.counters.total,
    }


def _metric_sum(admin: Kube, name: str, needles: tuple[str, ...]) -> float:
    total = 0.0
    for line in metrics_text(admin).splitlines():
        if line.startswith(name + "{") and any(n in line for n in needles):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settle(admin: Kube, quiet_writes_per_s: float = 2.0, window_s: float = 6.0) -> float:
    """Wait until the API server's write rate is low (the controllers' status updates and
    events after the setup are done); returns the seconds waited (capped by BENCH_SETTLE_S)."""
    cap = float(os.environ.get("BENCH_SETTLE_S", "300"))
    start = time.perf_counter()
    before = _metric_sum(admin, "apiserver_request_total", WRITE_VERBS)
    while time.perf_counter() - start < cap:
        time.sleep(window_s)
        now = _metric_sum(admin, "apiserver_request_total", WRITE_VERBS)
        if (now - before) / window_s <= quiet_writes_per_s:
            break
        before = now
    return time.perf_counter() - start


def check(admin: Kube, n_es: int, n_ns: int) -> dict[str, int]:
    """What the controllers did to our objects: pods must all be there, still owned."""
    from core.kube import POD

    pods, _ = admin.list_all(POD, label_selector=SELECTOR)
    owned = Counter(
        next((r["kind"] for r in p["metadata"].get("ownerReferences", [])), "none") for p in pods
    )
    gated = sum(1 for p in pods if p["spec"].get("schedulingGates"))
    expected = n_es + n_ns * PODS_PER_NS
    return {"pods": len(pods), "expected": expected, "gated": gated, **owned}


def cleanup(admin: Kube) -> None:
    """Remove everything this benchmark made (namespaces take a while to go)."""
    from core.kube import EXTERNAL_SERVICE, NAMESPACE, POD
    from core.settings import DEFAULT_GATEWAY_NAMESPACE

    query = [("labelSelector", SELECTOR)]
    admin.request("DELETE", POD.path(DEFAULT_GATEWAY_NAMESPACE), query=query)
    # The gateway Services and NetworkPolicies are owned by their ExternalService: the garbage
    # collector removes them.
    for res in (EXTERNAL_SERVICE, NAMESPACE):
        items, _ = admin.list_all(res, label_selector=SELECTOR)
        for item in items:
            admin.delete(res, item["metadata"]["name"])


# -- measuring ----------------------------------------------------------------------------------


def child_cli(argv: list[str]) -> int:
    """Run `egressctl ARGV` in this process and write the client's request counters to
    $BENCH_ACCESS_STATS (the CLI makes one client: count its requests)."""
    from core.kube import Kube
    from egressctl import access_cmds
    from egressctl.cli import main as cli_main

    clients: list[Kube] = []

    class CountingKube(Kube):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            clients.append(self)

    with mock.patch.object(access_cmds, "Kube", CountingKube):
        code = cli_main(argv)
    sys.stdout.flush()
    calls: Counter[str] = Counter()
    for kube in clients:
        for (verb, path), n in kube.counters.calls.items():
            calls[f"{verb} {path}"] += n
    stats = {"exit": code, "calls": calls, "peakRssKiB": _peak_kib()}
    Path(os.environ["BENCH_ACCESS_STATS"]).write_text(json.dumps(stats))
    return code


def _peak_kib() -> int:
    """This process's peak RSS. Not ru_maxrss: across fork and exec that keeps the parent's
    high-water mark (a child of a 500 MiB process reports 500 MiB); VmHWM is the new image's."""
    return rss_kb(os.getpid())[1]


# The uncounted run: plain `egressctl ARGV`, which records only its peak RSS on the way out.
PLAIN = (
    "import atexit, json, os, sys\n"
    "from bench._common import rss_kb\n"
    "def done():\n"
    "    stats = json.dumps({'peakRssKiB': rss_kb(os.getpid())[1]})\n"
    "    open(os.environ['BENCH_ACCESS_STATS'], 'w').write(stats)\n"
    "atexit.register(done)\n"
    "from egressctl.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def child_phases(argv: list[str]) -> int:
    """The --all audit through the Python API, each phase timed, peak RSS after each; then the
    evaluation alone for one ExternalService and for one namespace (ARGV: their names), what
    the NAME and --from views would cost if they evaluated only their part. Prints JSON."""
    import dataclasses

    from access.model import audit, snapshot_from_kube
    from access.report import all_view, matrix, matrix_csv, matrix_svg, render_view
    from core.kube import Kube, api_client_from_kubeconfig
    from core.settings import Settings

    def peak() -> float:
        return _mib(_peak_kib())

    kube = Kube(api_client_from_kubeconfig(os.environ["KUBECONFIG_AUDITOR"]))
    rss = {"imports": peak()}
    lists: dict[str, dict[str, float]] = {}
    list_all = kube.list_all

    def timed_list(res: Resource, *args: Any, **kwargs: Any) -> tuple[list[Obj], str]:
        before = kube.counters.total
        t = time.perf_counter()
        out = list_all(res, *args, **kwargs)
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        size = sum(len(json.dumps(o)) for o in out[0])  # not the audit's: taken out below
        lists[res.plural] = {
            "seconds": seconds,
            "pages": kube.counters.total - before,
            "items": len(out[0]),
            "bytes": size,
            "sizing": time.perf_counter() - t,
        }
        return out

    phases: dict[str, float] = {}

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        phases[name] = time.perf_counter() - t

    with mock.patch.object(kube, "list_all", timed_list), phase("snapshot"):
        snapshot = snapshot_from_kube(kube, Settings.from_env(os.environ))
    phases["snapshot"] -= sum(v["sizing"] for v in lists.values())
    rss["snapshot"] = peak()
    with phase("audit"):
        result = audit(snapshot)
    rss["audit"] = peak()
    with phase("json"):
        view = all_view(result)
        as_json = json.dumps(view.to_dict(), indent=2)
    with phase("table"):
        as_table = render_view(view)
    with phase("csv"):
        m = matrix(result)
        as_csv = matrix_csv(m)
    with phase("svg"):
        as_svg = matrix_svg(m)
    rss["renders"] = peak()
    es_name, ns_name = argv
    one_service = dataclasses.replace(
        snapshot,
        external_services=tuple(e for e in snapshot.external_services if e.name == es_name),
        services=tuple(s for s in snapshot.services if s.name == es_name),
    )
    with phase("auditOneService"):
        audit(one_service)
    one_namespace = dataclasses.replace(
        snapshot, pods=tuple(p for p in snapshot.pods if p.namespace == ns_name)
    )
    with phase("auditOneNamespace"):
        audit(one_namespace)
    ports = sum(len(es.ports) for es in snapshot.external_services)
    print(
        json.dumps(
            {
                "lists": lists,
                "phases": phases,
                "requests": kube.counters.total,
                "counts": {
                    "externalServices": len(snapshot.external_services),
                    "gatewayPorts": ports,
                    "services": len(snapshot.services),
                    "namespaces": len(snapshot.namespaces),
                    "policies": len(snapshot.policies),
                    "pods": len(snapshot.pods),
                    "gatewayPods": len(snapshot.gateway_pods),
                    "owners": len(snapshot.owners),
                    "workloads": len(result.workloads),
                    "rows": len(result.rows),
                    "findings": len(result.findings),
                },
                "findings": Counter(f.code for f in result.findings),
                "workloadKinds": Counter(w.kind for w in result.workloads),
                "sizes": {
                    "json": len(as_json),
                    "table": len(as_table),
                    "csv": len(as_csv),
                    "svg": len(as_svg),
                },
                "svgHeader": as_svg.split("\n", 2)[1][:160],
                "peakRssMiB": rss,
            }
        )
    )
    return 0


def _run(argv: list[str], env: dict[str, str], counted: bool = True) -> dict[str, Any]:
    """One fresh process: wall time, peak RSS (its VmHWM), stdout size, requests."""
    with tempfile.TemporaryDirectory(prefix="bench-access-") as tmp:
        out_path, err_path, stats_path = (Path(tmp) / n for n in ("out", "err", "stats"))
        cmd = [sys.executable, "-m", "bench.access", "--cli", *argv]
        if not counted:
            cmd = [sys.executable, "-c", PLAIN, *argv]
        files = {a: Path(tmp) / a.removeprefix("FILE:") for a in argv if a.startswith("FILE:")}
        cmd = [str(files[a]) if a in files else a for a in cmd]
        child_env = {
            **os.environ,
            **env,
            "KUBECONFIG": env["KUBECONFIG_AUDITOR"],
            "BENCH_ACCESS_STATS": str(stats_path),
        }
        with out_path.open("wb") as out, err_path.open("wb") as err:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=out, stderr=err)
            proc.wait()
            wall = time.perf_counter() - t
        stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        fig: dict[str, Any] = {
            "exit": proc.returncode,
            "wall": wall,
            "rssMiB": _mib(stats.get("peakRssKiB", 0)),
            "out": out_path.stat().st_size,
            "stderr": err_path.read_text()[-2000:],
            "files": {p.name: p.stat().st_size for p in files.values() if p.exists()},
        }
        if "calls" in stats:
            calls: dict[str, int] = stats["calls"]
            fig["calls"] = calls
            fig["requests"] = sum(calls.values())
            fig["verbs"] = Counter(k.split(" ", 1)[0] for k, n in calls.items() for _ in range(n))
        if argv[-1] == "--json" and proc.returncode == 0:
            doc = json.loads(out_path.read_text())
            fig["rows"], fig["findings"] = len(doc["rows"]), len(doc["findings"])
        return fig


def _pages(calls: dict[str, int]) -> str:
    parts = []
    for key, n in sorted(calls.items(), key=lambda kv: -kv[1]):
        verb, path = key.split(" ", 1)
        parts.append(f"{path.rsplit('/', 1)[-1]} {n}" if verb == "GET" else f"{key} {n}")
    return ", ".join(parts)


def _spread(values: list[float], unit: str, fmt: str = ".1f") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}} {unit}"
    return (
        f"{statistics.median(values):{fmt}} {unit} "
        f"({min(values):{fmt}}-{max(values):{fmt}}, n={len(values)})"
    )


def _kb(n: int) -> str:
    return f"{n / 1000:,.0f} KB" if n < 10_000_000 else f"{n / 1e6:,.1f} MB"


def _report(
    runs: list[tuple[str, list[dict[str, Any]]]], ph: dict[str, Any], runs_s: float
) -> None:
    print()
    print(
        f"{'egressctl access, fresh process':34} {'wall':>22}  {'requests':>8}  "
        f"{'peak RSS':>24}  output"
    )
    for label, figs in runs:
        first = figs[0]
        out = _kb(first["out"])
        if "rows" in first:
            out += f" ({first['rows']} rows, {first['findings']} findings)"
        if first["files"]:
            out += " + " + ", ".join(f"{k} {_kb(v)}" for k, v in first["files"].items())
        print(
            f"{label:34} {_spread([f['wall'] for f in figs], 's'):>22}  "
            f"{first.get('requests', '-'):>8}  "
            f"{_spread([f['rssMiB'] for f in figs], 'MiB', '.0f'):>24}  {out}"
        )
    first = runs[0][1][0]
    verbs = ", ".join(f"{n} {verb}" for verb, n in first["verbs"].items())
    print(f"requests of --all: {verbs}; LIST pages: {_pages(first['calls'])}")
    counts = ph["counts"]
    print(
        f"audited: {counts['externalServices']} ExternalServices ({counts['gatewayPorts']} "
        f"ports, {counts['services']} gateway Services, {counts['gatewayPods']} gateway pods), "
        f"{counts['namespaces']} namespaces, {counts['policies']} NetworkPolicies, "
        f"{counts['pods']} pods in {counts['workloads']} workloads ("
        + ", ".join(f"{k} {v}" for k, v in sorted(ph["workloadKinds"].items()))
        + f"; {counts['owners']} ReplicaSets and Jobs); {counts['rows']} rows, "
        f"{counts['findings']} findings ("
        + ", ".join(f"{k} {v}" for k, v in sorted(ph["findings"].items()))
        + ")"
    )
    lists, p, rss = ph["lists"], ph["phases"], ph["peakRssMiB"]
    list_s = sum(v["seconds"] for v in lists.values())
    listed = sum(v["items"] for v in lists.values())
    list_mb = sum(v["bytes"] for v in lists.values()) / 1e6
    print(
        f"in-process, --all (one run): LISTs {list_s:.2f} s ("
        + ", ".join(
            f"{k} {v['items']} in {v['pages']} page(s) {v['seconds']:.2f} s"
            for k, v in sorted(lists.items(), key=lambda kv: -kv[1]["seconds"])
        )
        + f"), parse {p['snapshot'] - list_s:.2f} s, evaluate {p['audit']:.2f} s; then "
        f"JSON {p['json']:.2f} s, table {p['table']:.2f} s, matrix+CSV {p['csv']:.2f} s, "
        f"SVG {p['svg']:.2f} s"
    )
    print(
        f"peak RSS of that process: {rss['imports']:.0f} MiB after imports, "
        f"{rss['snapshot']:.0f} after the LISTs ({listed} objects, {list_mb:.1f} MB as JSON), "
        f"{rss['audit']:.0f} after the evaluation, {rss['renders']:.0f} after the renders"
    )
    pairs = counts["workloads"] * counts["gatewayPorts"]
    audit_s = p["snapshot"] + p["audit"]
    print(
        f"ratios: {first['requests'] / listed * 1000:.1f} requests per 1,000 objects listed; "
        f"LISTs+parse {p['snapshot'] / audit_s:.0%} and evaluation {p['audit'] / audit_s:.0%} "
        f"of the audit; evaluation {p['audit'] / pairs * 1e6:.1f} us per workload x gateway "
        f"port ({pairs:,} pairs); evaluating only one ExternalService would take "
        f"{p['auditOneService']:.2f} s, only one namespace {p['auditOneNamespace']:.2f} s "
        "(the NAME and --from views evaluate everything, then filter)"
    )
    print(f"SVG: {ph['svgHeader']}")
    print(f"measuring took {runs_s:.0f} s")


def _stack_running() -> bool:
    """Is the benchmarks' stack up already (then bench_stack leaves it up, objects and all)?"""
    os.environ.setdefault("EGRESS_DEV_DIR", str(REPO / ".cache" / "dev-bench"))
    from egressctl.devstack.stack import Layout, healthy, load_state

    layout = Layout(REPO)
    state = load_state(layout)
    return state is not None and healthy(layout, state)


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--cli":
        return child_cli(sys.argv[2:])
    if len(sys.argv) >= 2 and sys.argv[1] == "--phases":
        return child_phases(sys.argv[2:])
    n_es = int(os.environ.get("BENCH_ES", "1000"))
    n_ns = int(os.environ.get("BENCH_NS", "500"))
    repeat = int(os.environ.get("BENCH_REPEAT", "3"))
    t_all = time.perf_counter()
    from core.kube import Kube, api_client_from_kubeconfig

    keep = os.environ.get("EGRESS_DEV_KEEP") == "1"
    was_running = _stack_running()
    with bench_stack() as env:
        os.environ.update(env)
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
        up = "was up already" if was_running else f"up in {time.perf_counter() - t_all:.1f} s"
        print(f"stack: {up} ({env['EGRESS_DEV_DIR']})")
        if "--clean" in sys.argv:
            cleanup(admin)
            return 0
        made = setup(admin, n_es, n_ns)
        created = sum(made["created"].values())
        print(
            f"setup: {n_es} ExternalServices, {n_ns} namespaces, {n_ns * PODS_PER_NS} pods: "
            f"{created} objects created, {made['found']} found, {made['requests']} requests, "
            f"{made['seconds']:.1f} s ("
            + ", ".join(f"{k} {v}" for k, v in sorted(made["created"].items()))
            + ")"
        )
        waited = settle(admin)
        state = check(admin, n_es, n_ns)
        print(
            f"settle: API server writes quiet after {waited:.0f} s; pods {state['pods']} of "
            f"{state['expected']}, gated {state['gated']}, owners "
            + ", ".join(f"{k} {v}" for k, v in sorted(state.items()) if k[0].isupper())
            + f", bare {state.get('none', 0)}; load average {os.getloadavg()[0]:.1f}"
        )
        if state["pods"] != state["expected"] or state["gated"] != state["pods"]:
            print("error: the pods are not what the benchmark made", file=sys.stderr)
            return 1

        es_name, ns_name = _es_name(0), _ns_name(5 % n_ns)
        t_runs = time.perf_counter()
        all_json = ["access", "--all", "--json"]
        files = ["access", "--all", "--csv", "FILE:access.csv", "--svg", "FILE:access.svg"]
        runs: list[tuple[str, list[dict[str, Any]]]] = [
            ("--all --json", [_run(all_json, env) for _ in range(repeat)]),
            ("--all --json (plain egressctl)", [_run(all_json, env, counted=False)]),
            ("--all --csv --svg (+table)", [_run(files, env)]),
            (f"{es_name} (one ExternalService)", [_run(["access", es_name], env)]),
            (f"--from {ns_name}", [_run(["access", "--from", ns_name], env)]),
        ]
        phases_out = subprocess.run(
            [sys.executable, "-m", "bench.access", "--phases", es_name, ns_name],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        ph: dict[str, Any] = json.loads(phases_out.stdout)
        runs_s = time.perf_counter() - t_runs
        failed = [(label, f) for label, figs in runs for f in figs if f["exit"] != 0]
        for label, f in failed:
            print(f"error: access {label} exited {f['exit']}: {f['stderr']}", file=sys.stderr)
        _report(runs, ph, runs_s)
        if keep:
            outcome = "objects kept (EGRESS_DEV_KEEP=1)"
        elif was_running:
            cleanup(admin)
            outcome = "objects deleted (the stack was up before: it stays up)"
        else:
            outcome = "the stack is stopped, objects and all"
        print(f"total {time.perf_counter() - t_all:.0f} s (stack, setup, settle, runs); {outcome}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
