"""`egressctl access` against the real API server, run as the read-only egress-auditor identity.

Why: the audit is only worth trusting if it reads what a cluster really holds (defaulted
NetworkPolicies, namespace labels the API server adds, ownerReferences the controllers write,
gateway objects the reconciler renders) with the identity infra/rbac gives it. The scenario
builds each case of the issue in its own namespace, with real controllers creating the pods
(they stay Pending: the audit needs their labels and owners, not their packets):

- ``open``: no egress policy; a Deployment granted gateway A: reachable, and bypassable.
- ``locked``: a default-deny egress policy that allows only DNS (forgets the gateway
  namespace); a StatefulSet granted gateway B with the ``allowed-gateway`` form: blocked.
- ``good``: the README's default-deny (infra/examples/default-deny-egress); a CronJob's Job
  granted A and B: reachable, not bypassable; a bare pod granting a gateway that does not exist.
- ``internal``: egress only to 10.0.0.0/8; a Deployment granted A: reachable because the real
  gateway pod's IP is in that range.
Gateway C exists, with nobody granted: unreachable.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from access.model import Audit, audit, snapshot_from_kube
from core import constants as c
from core.kube import (
    DEPLOYMENT,
    JOB,
    NAMESPACE,
    NETWORK_POLICY,
    POD,
    Kube,
    Resource,
    api_client_from_kubeconfig,
)
from reconcile.app import build_reconciler
from tests.conftest import DevStack
from tests.integration.helpers import (
    GATEWAY_NS,
    create_es,
    dev_settings,
    eventually,
    external_service,
    gateway_pods,
    purge,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
STATEFULSET = Resource("apps/v1", "StatefulSet", "statefulsets")
CRONJOB = Resource("batch/v1", "CronJob", "cronjobs")
# Pods that never schedule: the audit needs them to exist, not to run.
NOWHERE = {"egress.monzo.com/test-no-such-node": "true"}
DNS_ONLY = {
    "podSelector": {},
    "policyTypes": ["Egress"],
    "egress": [
        {
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                    }
                }
            ],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        }
    ],
}
INTERNAL_ONLY = {
    "podSelector": {},
    "policyTypes": ["Egress"],
    "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
}


@dataclass(frozen=True)
class Scenario:
    u: str
    a: str
    b: str
    c: str
    open: str
    locked: str
    good: str
    internal: str

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.open, self.locked, self.good, self.internal)


def _template(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels},
        "spec": {
            "nodeSelector": NOWHERE,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": "egress-dev.local/pause:1"}],
        },
    }


def _create(
    admin: Kube, resource: Resource, namespace: str | None, body: dict[str, Any]
) -> dict[str, Any]:
    body = {"apiVersion": resource.api_version, "kind": resource.kind, **body}
    created: dict[str, Any] = admin.request("POST", resource.path(namespace), body=body)
    return created


def _policy(admin: Kube, namespace: str, name: str, spec: dict[str, Any]) -> None:
    _create(admin, NETWORK_POLICY, namespace, {"metadata": {"name": name}, "spec": spec})


@pytest.fixture(scope="module")
def scenario(dev_stack: DevStack) -> Iterator[Scenario]:
    admin = Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))
    reconciler = build_reconciler(
        Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler"))),
        dev_settings(),
    )
    u = uuid.uuid4().hex[:6]
    s = Scenario(u, f"acc-a-{u}", f"acc-b-{u}", f"acc-c-{u}",
                 f"acc-open-{u}", f"acc-locked-{u}", f"acc-good-{u}", f"acc-internal-{u}")  # fmt: skip
    try:
        for name in (s.a, s.b, s.c):
            ports = [{"port": 443}, {"port": 8443}] if name == s.b else [{"port": 443}]
            create_es(admin, external_service(name, ports=ports))
            assert reconciler.reconcile(name).outcome == "converged"
        for namespace in s.namespaces:
            _create(admin, NAMESPACE, None, {"metadata": {"name": namespace}})
        _policy(admin, s.locked, "dns-only", DNS_ONLY)
        [readme] = yaml.safe_load_all(
            (REPO / "infra/examples/default-deny-egress/networkpolicy.yaml").read_text()
        )
        _policy(admin, s.good, "default-deny-external-egress", readme["spec"])
        _policy(admin, s.internal, "internal-only", INTERNAL_ONLY)

        grant_a = {"app": "web", c.grant_label(s.a): "true"}
        _create(
            admin,
            DEPLOYMENT,
            s.open,
            {
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": _template(grant_a),
                },
            },
        )
        _create(
            admin,
            DEPLOYMENT,
            s.internal,
            {
                "metadata": {"name": "api"},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": _template(grant_a),
                },
            },
        )
        _create(
            admin,
            STATEFULSET,
            s.locked,
            {
                "metadata": {"name": "db"},
                "spec": {
                    "serviceName": "db",
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "db"}},
                    "template": _template({"app": "db", c.GRANT_LABEL_GATEWAY: s.b}),
                },
            },
        )
        job_template = _template({c.grant_label(s.a): "true", c.grant_label(s.b): "true"})
        job_template["spec"]["restartPolicy"] = "Never"
        cron = _create(
            admin,
            CRONJOB,
            s.good,
            {
                "metadata": {"name": "report"},
                "spec": {
                    "schedule": "0 0 1 1 *",
                    "suspend": True,
                    "jobTemplate": {"spec": {"template": job_template}},
                },
            },
        )
        # What `kubectl create job --from=cronjob/report` does: a Job owned by the CronJob.
        _create(
            admin,
            JOB,
            s.good,
            {
                "metadata": {
                    "name": "report-manual",
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "CronJob",
                            "name": "report",
                            "uid": cron["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": {"template": job_template},
            },
        )
        _create(admin, POD, s.good, {"metadata": {"name": "debug", "labels": {c.grant_label(f"nope-{u}"): "true"}},
                                     "spec": _template({})["spec"]})  # fmt: skip

        expected = {s.open: 2, s.locked: 1, s.good: 2, s.internal: 1}

        def all_pods() -> bool:
            return all(
                len(admin.list_all(POD, namespace)[0]) == n for namespace, n in expected.items()
            )

        eventually(all_pods, 60, "the controllers to create every workload's pods")
        # The internal namespace reaches gateways by IP: wait for gateway A's pod to have one.
        eventually(
            lambda: any((p.get("status") or {}).get("podIP") for p in gateway_pods(admin, s.a)),
            90,
            f"a pod IP for gateway {s.a}",
        )
        yield s
    finally:
        for namespace in s.namespaces:
            admin.delete(NAMESPACE, namespace)
        for name in (s.a, s.b, s.c):
            purge(admin, name)


def access(
    dev_stack: DevStack, *args: str, identity: str = "egress-auditor"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": dev_stack.identity_kubeconfig(identity)}
    return subprocess.run(
        [sys.executable, "-m", "egressctl", "access", *args],
        capture_output=True, text=True, cwd=REPO, env=env, check=False, timeout=60,
    )  # fmt: skip


def _rows(
    data: dict[str, Any], s: Scenario
) -> dict[tuple[str, str, str, str, int], dict[str, Any]]:
    return {
        (r["namespace"], r["kind"], r["name"], r["external_service"], r["port"]): r
        for r in data["rows"]
        if r["namespace"] in s.namespaces
    }


def _facts(row: dict[str, Any]) -> tuple[bool, str, bool, bool, bool]:
    return (
        row["granted"],
        row["grant_form"],
        row["policy_allows"],
        row["reachable"],
        row["direct"],
    )


def test_one_external_service_as_the_auditor(dev_stack: DevStack, scenario: Scenario) -> None:
    s = scenario
    res = access(dev_stack, s.a, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    rows = {k: _facts(v) for k, v in _rows(data, s).items()}
    assert rows == {
        (s.open, "Deployment", "web", s.a, 443): (True, "allowed-<name>", True, True, True),
        (s.good, "CronJob", "report", s.a, 443): (True, "allowed-<name>", True, True, False),
        (s.internal, "Deployment", "api", s.a, 443): (True, "allowed-<name>", True, True, False),
    }
    assert _rows(data, s)[(s.open, "Deployment", "web", s.a, 443)]["pods"] == 2
    codes = {(f["code"], f["subject"]) for f in data["findings"]}
    assert ("no-default-deny", f"Namespace/{s.open}") not in codes  # not about gateway A
    # The table for people.
    table = access(dev_stack, s.b)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"ExternalService {s.b} ({s.b}.example.com): 443/TCP,8443/TCP")
    db = [line.split() for line in lines if line.startswith(s.locked)]
    assert [row[3:8] for row in db] == [
        ["443/TCP", "allowed-gateway", "egress-denied", "no", "no"],
        ["8443/TCP", "allowed-gateway", "egress-denied", "no", "no"],
    ]
    assert f"grant-blocked         {s.locked}/StatefulSet/db" in table.stdout
    assert "allowed-gateway-form" in table.stdout


def test_from_a_namespace_and_a_workload(dev_stack: DevStack, scenario: Scenario) -> None:
    s = scenario
    res = access(dev_stack, "--from", s.good)
    assert res.returncode == 0, res.stderr
    workloads = {line.split()[1]: line.split() for line in res.stdout.splitlines() if line.startswith(s.good)
                 and len(line.split()) == 6}  # fmt: skip
    assert workloads["CronJob/report"][2:] == [
        "1",
        "default-deny-external-egress",
        f"{s.a},{s.b}",
        "no",
    ]
    assert workloads["Pod/debug"][4:] == [f"nope-{s.u}", "no"]
    assert f"unknown-gateway  {s.good}/Pod/debug" in res.stdout
    one = access(dev_stack, "--from", f"{s.open}/deploy/web", "--json")
    assert one.returncode == 0, one.stderr
    data = json.loads(one.stdout)
    assert [(w["kind"], w["name"], w["pods"], w["direct_egress"]) for w in data["workloads"]] == [
        ("Deployment", "web", 2, True)
    ]
    assert [(r["external_service"], r["reachable"], r["direct"]) for r in data["rows"]] == [
        (s.a, True, True)
    ]
    assert {f["code"] for f in data["findings"]} == {"no-default-deny"}
    missing = access(dev_stack, "--from", f"{s.open}/deploy/nobody")
    assert missing.returncode == 2 and "no pods of Deployment/nobody" in missing.stderr


def test_a_gateway_that_does_not_exist(dev_stack: DevStack, scenario: Scenario) -> None:
    """Asking about the gateway a grant names in vain: exit 2, and who names it."""
    s = scenario
    res = access(dev_stack, f"nope-{s.u}", "--fail-on", "error")
    assert res.returncode == 2
    assert f"no ExternalService 'nope-{s.u}'" in res.stderr
    assert f"unknown-gateway  {s.good}/Pod/debug" in res.stdout
    # CI's use: any error-severity finding in the cluster fails the job.
    assert access(dev_stack, s.b, "--fail-on", "error").returncode == 3
    assert access(dev_stack, s.a, "--fail-on", "error").returncode == 0


def test_whole_cluster_matrix(dev_stack: DevStack, scenario: Scenario, tmp_path: Path) -> None:
    s = scenario
    csv_path, svg_path = tmp_path / "m.csv", tmp_path / "m.svg"
    res = access(dev_stack, "--all", "--json", "--csv", str(csv_path), "--svg", str(svg_path))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    rows = _rows(data, s)
    assert {k[:4] for k in rows} == {
        (s.open, "Deployment", "web", s.a),
        (s.locked, "StatefulSet", "db", s.b),
        (s.good, "CronJob", "report", s.a),
        (s.good, "CronJob", "report", s.b),
        (s.internal, "Deployment", "api", s.a),
    }
    codes = {(f["code"], f["subject"]) for f in data["findings"]}
    assert {
        ("grant-blocked", f"{s.locked}/StatefulSet/db"),
        ("allowed-gateway-form", f"{s.locked}/StatefulSet/db"),
        ("unknown-gateway", f"{s.good}/Pod/debug"),
        ("no-default-deny", f"Namespace/{s.open}"),
        ("unreachable-gateway", f"ExternalService/{s.c}"),
    } <= codes
    assert ("unreachable-gateway", f"ExternalService/{s.a}") not in codes
    assert not {sub for code, sub in codes if code == "no-default-deny"} & {
        f"Namespace/{n}" for n in (s.locked, s.good, s.internal)
    }
    with csv_path.open() as f:
        matrix = {(r["namespace"], r["kind"], r["workload"]): r for r in csv.DictReader(f)}
    assert matrix[(s.open, "Deployment", "web")][s.a] == "reachable+direct"
    assert matrix[(s.locked, "StatefulSet", "db")][s.b] == "blocked"
    assert matrix[(s.good, "CronJob", "report")][s.b] == "reachable"
    assert matrix[(s.good, "Pod", "debug")][s.a] == ""
    assert matrix[(s.internal, "Deployment", "api")]["direct_internet"] == "no"
    root = ET.parse(svg_path).getroot()
    cell = next(
        r for r in root.iter("{http://www.w3.org/2000/svg}rect")
        if r.get("data-workload") == f"{s.locked}/StatefulSet/db" and r.get("data-external-service") == s.b
    )  # fmt: skip
    assert cell.get("class") == "blocked"
    assert "wrote" in res.stderr


def test_python_api_as_the_auditor(dev_stack: DevStack, scenario: Scenario) -> None:
    """The API the enforcement test and the benchmark call, with the same identity."""
    s = scenario
    kube = Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-auditor")))
    result: Audit = audit(snapshot_from_kube(kube, dev_settings()))
    assert result.reachable(s.open, "Deployment", "web", s.a, 443)
    assert result.reachable(s.good, "CronJob", "report", s.b, 8443)
    assert not result.reachable(s.good, "CronJob", "report", s.b, 22)  # undeclared
    assert not result.reachable(s.locked, "StatefulSet", "db", s.b, 443)
    assert not result.reachable(s.open, "Deployment", "web", s.b, 443)  # no grant
    assert not result.reachable(s.open, "Deployment", "web", s.c, 443)
    # One LIST per kind, nothing else.
    verbs = kube.counters.snapshot()
    assert set(verbs) == {"GET"}
    lists = [path for (_, path) in kube.counters.calls]
    assert len(lists) == len(set(lists)) == 7, lists


def test_the_reconciler_identity_may_not_run_the_audit(dev_stack: DevStack) -> None:
    """By design: the reconciler never reads pods (least privilege); the audit says whom to use."""
    res = access(dev_stack, "--all", identity="egress-reconciler")
    assert res.returncode == 2
    assert "403" in res.stderr and "egress-auditor" in res.stderr


def test_auditor_identity_is_read_only(dev_stack: DevStack) -> None:
    from kubernetes import client

    api = dev_stack.api_client(dev_stack.identity_kubeconfig("egress-auditor"))
    # The dev stack's auditor is a user in the group infra/rbac/auditor.yaml binds.
    review = Kube(api).request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    user = review["status"]["userInfo"]
    assert user["username"] == "egress-auditor" and "egress-auditors" in user["groups"]

    def can(verb: str, resource: str, namespace: str = "", group: str = "") -> bool:
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb=verb, resource=resource, namespace=namespace or None, group=group
                )
            )
        )
        result = client.AuthorizationV1Api(api).create_self_subject_access_review(review)
        return bool(result.status.allowed)

    assert can("list", "pods") and can("list", "namespaces")
    assert can("list", "networkpolicies", group="networking.k8s.io")
    assert can("list", "replicasets", group="apps") and can("list", "jobs", group="batch")
    assert can("list", "externalservices", group=c.GROUP)
    assert can("list", "services", GATEWAY_NS)
    for verb, resource, namespace, group in [
        ("get", "pods", "default", ""),
        ("watch", "pods", "", ""),
        ("list", "secrets", "", ""),
        ("list", "services", "default", ""),
        ("list", "configmaps", GATEWAY_NS, ""),
        ("patch", "externalservices", "", c.GROUP),
        ("create", "networkpolicies", "default", "networking.k8s.io"),
        ("delete", "pods", GATEWAY_NS, ""),
    ]:
        assert not can(verb, resource, namespace, group), (verb, resource, namespace)


def test_a_sweep_reports_the_findings_only_when_asked_and_bound(
    dev_stack: DevStack, scenario: Scenario
) -> None:
    """SWEEP_ACCESS_AUDIT adds the findings to the sweep's report. Unbound, the reconciler's
    sweep still does its work and its report names the component to bind; bound with
    infra/rbac/reconciler-access-audit, the report carries the same findings as the audit."""
    s = scenario
    bindings = REPO / "infra" / "rbac" / "reconciler-access-audit" / "bindings.yaml"
    kube = Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler")))
    quiet = build_reconciler(kube, dev_settings(delete_grace_s=0))
    assert "access" not in quiet.sweep().to_dict(), "off by default"
    auditing = build_reconciler(kube, dev_settings(delete_grace_s=0, sweep_access_audit=True))
    unbound = auditing.sweep()
    assert unbound.access is None
    (error,) = [e for e in unbound.errors if e["name"] == "access-audit"]
    assert "403" in error["error"] and "infra/rbac/reconciler-access-audit" in error["error"]
    applied = subprocess.run(
        ["kubectl", "apply", "-f", str(bindings)], capture_output=True, text=True, check=False
    )
    assert applied.returncode == 0, applied.stderr
    try:
        report = eventually(
            lambda: (r := auditing.sweep()).access is not None and r, 30, "the bound audit"
        )
        assert report.access is not None
        debug = [f for f in report.access if f["subject"] == f"{s.good}/Pod/debug"]
        assert [f["code"] for f in debug] == ["unknown-gateway"], debug
        assert report.to_dict()["access"] == report.access
        assert not [e for e in report.errors if e["name"] == "access-audit"]
    finally:
        subprocess.run(
            ["kubectl", "delete", "--ignore-not-found", "-f", str(bindings)],
            capture_output=True, check=False,
        )  # fmt: skip
