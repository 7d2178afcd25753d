"""access.report and `egressctl access`'s argument handling: tables, JSON, the CSV matrix read
back with the csv module, and the SVG heat map parsed as XML."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from access.model import Audit, Snapshot, audit
from access.report import (
    BLOCKED,
    REACHABLE,
    UNGRANTED,
    all_view,
    matrix,
    matrix_csv,
    matrix_svg,
    render_view,
    service_view,
    table,
    workload_view,
)
from egressctl.access_cmds import KIND_ALIASES, parse_source
from tests.unit.test_access_model import cluster, es, gateway_objects, ns, pod

ROOT = Path(__file__).resolve().parents[2]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def result() -> Audit:
    return audit(Snapshot.from_objects(**cluster()))


def test_table_is_kubectl_style() -> None:
    text = table(["NAME", "PORT"], [["a", "443/TCP"], ["longer-name", "22/TCP"]])
    assert text.splitlines() == [
        "NAME         PORT",
        "a            443/TCP",
        "longer-name  22/TCP",
    ]


def test_service_view_table(result: Audit) -> None:
    view = service_view(result, "github")
    text = render_view(view, show_service=False)
    lines = text.splitlines()
    assert lines[0].startswith("ExternalService github (github.example.com): 443/TCP,22/TCP")
    assert "1 pod(s)" in lines[0]
    header = lines[2].split()
    assert header == [
        "NAMESPACE",
        "WORKLOAD",
        "PODS",
        "PORT",
        "GRANT",
        "POLICY",
        "REACHABLE",
        "DIRECT",
    ]
    body = [line.split() for line in lines[3:9]]
    assert [
        "locked",
        "StatefulSet/db",
        "1",
        "443/TCP",
        "allowed-gateway",
        "egress-denied",
        "no",
        "no",
    ] in body
    assert [
        "good",
        "CronJob/report",
        "1",
        "22/TCP",
        "allowed-<name>",
        "allowed",
        "yes",
        "no",
    ] in body
    assert "grant-blocked" in text and "allowed-gateway-form" in text
    assert {r.external_service for r in view.rows} == {"github"}
    assert all(f.external_service == "github" for f in view.findings)


def test_unknown_service_view(result: Audit) -> None:
    view = service_view(result, "nope")
    assert view.title == "ExternalService nope: not found"
    assert [f.code for f in view.findings] == ["unknown-gateway"]


def test_workload_view(result: Audit) -> None:
    view = workload_view(result, "open", "Deployment", "web")
    assert [(r.external_service, r.direct) for r in view.rows] == [("google", True)]
    assert [w.direct_egress for w in view.workloads] == [True]
    text = render_view(view, show_workloads=True)
    assert "EGRESS-POLICIES" in text and "<none>" in text
    # Namespace findings show in the workload's view too.
    assert "no-default-deny" in text
    whole = workload_view(result, "good")
    assert {w.name for w in whole.workloads} == {"report", "agent", "debug"}
    assert {f.code for f in whole.findings} == {"unknown-gateway"}


def test_json_view_round_trips(result: Audit) -> None:
    data = json.loads(json.dumps(all_view(result).to_dict()))
    assert len(data["rows"]) == len(result.rows)
    assert data["rows"][0] == result.rows[0].to_dict()
    assert {f["code"] for f in data["findings"]} == {f.code for f in result.findings}


def test_matrix_csv_reads_back(result: Audit) -> None:
    m = matrix(result)
    rows = list(csv.DictReader(io.StringIO(matrix_csv(m))))
    assert len(rows) == len(result.workloads)
    header = list(rows[0])
    assert header[:5] == ["namespace", "kind", "workload", "pods", "direct_internet"]
    assert header[5:] == ["echo", "github", "google", "unloved"]
    by = {(r["namespace"], r["kind"], r["workload"]): r for r in rows}
    web = by[("open", "Deployment", "web")]
    assert (web["google"], web["github"], web["direct_internet"]) == ("reachable+direct", "", "yes")
    db = by[("locked", "StatefulSet", "db")]
    assert (db["github"], db["direct_internet"]) == ("blocked", "no")
    assert by[("monitoring", "StatefulSet", "prom")]["google"] == "ungranted+direct"
    assert by[("public", "StatefulSet", "crawler")]["echo"] == "blocked+direct"
    assert by[("good", "DaemonSet", "agent")]["google"] == ""
    report = by[("good", "CronJob", "report")]
    assert (report["google"], report["github"], report["unloved"]) == ("reachable", "reachable", "")


def test_matrix_svg_parses_and_has_one_rect_per_cell_with_access(result: Audit) -> None:
    m = matrix(result)
    root = ET.fromstring(matrix_svg(m))
    assert root.tag == f"{SVG}svg"
    cells = [r for r in root.iter(f"{SVG}rect") if r.get("data-external-service") is not None]
    # The cells without access are the background pattern.
    assert len(cells) == len(m.cells) == 8
    states = {
        (c.get("data-workload"), c.get("data-external-service")): c.get("class") for c in cells
    }
    assert states == {
        (f"{k.namespace}/{k.kind}/{k.name}", es): cell.state for (k, es), cell in m.cells.items()
    }
    assert states[("open/Deployment/web", "google")] == REACHABLE
    assert states[("locked/StatefulSet/db", "github")] == BLOCKED
    assert states[("monitoring/StatefulSet/prom", "google")] == UNGRANTED
    assert ("good/DaemonSet/agent", "google") not in states
    assert any(p.get("id") == "empty" for p in root.iter(f"{SVG}pattern"))
    internet = {
        r.get("data-workload"): r.get("class")
        for r in root.iter(f"{SVG}rect")
        if (r.get("class") or "").startswith("internet")
    }
    assert internet["open/Deployment/web"] == "internet yes"
    assert internet["good/CronJob/report"] == "internet no"
    texts = "".join(root.itertext())
    assert "open/Deployment/web" in texts and "Legend" in texts


def test_svg_escapes_names() -> None:
    # Label values cannot hold markup, but owner names and tooltips are still escaped.
    obj = es("google")
    pol, svc = gateway_objects(obj)
    hostile = pod("app", "x", {}, "10.244.0.2", ("Thing", 'a<b>&"c'))
    result = audit(
        Snapshot.from_objects(
            pods=[hostile],
            namespaces=[ns("app")],
            policies=[pol],
            external_services=[obj],
            services=[svc],
        )
    )
    text = matrix_svg(matrix(result))
    root = ET.fromstring(text)
    assert 'app/Thing/a<b>&"c' in "".join(root.itertext())


def test_empty_matrix_is_valid() -> None:
    result = audit(Snapshot.from_objects())
    ET.fromstring(matrix_svg(matrix(result)))
    assert matrix_csv(matrix(result)) == "namespace,kind,workload,pods,direct_internet\n"


# -- the command line (no cluster needed for these) ---------------------------------------------------


def test_parse_source() -> None:
    assert parse_source("app") == ("app", "", "")
    assert parse_source("app/deploy/web") == ("app", "Deployment", "web")
    assert parse_source("app/StatefulSet/db") == ("app", "StatefulSet", "db")
    assert parse_source("app/cj/report") == ("app", "CronJob", "report")
    for bad in ("", "app/web", "app//web", "a/b/c/d"):
        with pytest.raises(ValueError):
            parse_source(bad)
    assert set(KIND_ALIASES.values()) == {
        "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of"),
        (["google", "--all"], "exactly one of"),
        (["--from", "app", "--all"], "exactly one of"),
        (["google", "--csv", "x.csv"], "use them with --all"),
        (["--from", "app/web"], "NAMESPACE or NAMESPACE/KIND/NAME"),
        (["--all", "--probe", "example.com"], "not an IP address"),
    ],
)
def test_usage_errors_exit_2_before_touching_a_cluster(args: list[str], message: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "egressctl", "access", *args, "--kubeconfig", "/nonexistent"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert message in res.stderr


def test_fail_on_exits_3_at_or_above_the_severity(result: Audit) -> None:
    from egressctl.access_cmds import EXIT_FINDINGS, EXIT_OK, _findings_exit

    view = all_view(result)
    assert _findings_exit(view, None) == EXIT_OK
    assert _findings_exit(view, "error") == EXIT_FINDINGS
    clean = service_view(result, "google")  # warnings and infos only
    assert {f.severity for f in clean.findings} <= {"warning", "info"}
    assert _findings_exit(clean, "error") == EXIT_OK
    assert _findings_exit(service_view(result, "unloved"), "warning") == EXIT_FINDINGS
