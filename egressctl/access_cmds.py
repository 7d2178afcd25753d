"""`egressctl access`: who can reach which gateway, as the cluster enforces it.

Three views of one audit (``access.model``), read from live state with one LIST per kind:

    egressctl access NAME                          # one ExternalService: who reaches it, how
    egressctl access --from NAMESPACE[/KIND/NAME]  # one namespace or workload: what it reaches
    egressctl access --all [--csv F] [--svg F]     # everything, and the matrix as files

Read-only: it runs as any identity allowed to list pods, namespaces, NetworkPolicies,
ReplicaSets and Jobs cluster-wide, ExternalServices, and Services in the gateway namespace
(the ``egress-auditor`` ClusterRole in infra/rbac/auditor.yaml), and writes nothing to the
cluster. The reconciler's identity may not read pods, by design.

Exit codes: 0 success, 1 a transient failure (retry), 2 invalid input, an unknown name or a
refused request, 3 findings at or above ``--fail-on`` (for CI).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any

from access.model import PUBLIC_PROBE, SEVERITY_ORDER, Audit, Severity, audit, snapshot_from_kube
from access.policy import IPAddress, PolicyError
from access.report import (
    View,
    all_view,
    matrix,
    matrix_csv,
    matrix_svg,
    render_view,
    service_view,
    workload_view,
)
from core.errors import PermanentError, TransientError
from core.kube import Kube, api_client_from_kubeconfig
from core.settings import Settings, SettingsError

EXIT_OK = 0
EXIT_TRANSIENT = 1
EXIT_PERMANENT = 2
EXIT_FINDINGS = 3

# kubectl's names for the workload kinds, so `--from app/deploy/web` works as people type it.
KIND_ALIASES = {
    alias: kind
    for kind, aliases in {
        "Deployment": ("deployment", "deployments", "deploy"),
        "StatefulSet": ("statefulset", "statefulsets", "sts"),
        "DaemonSet": ("daemonset", "daemonsets", "ds"),
        "ReplicaSet": ("replicaset", "replicasets", "rs"),
        "Job": ("job", "jobs"),
        "CronJob": ("cronjob", "cronjobs", "cj"),
        "Pod": ("pod", "pods", "po"),
    }.items()
    for alias in aliases
}

FORBIDDEN_HINT = (
    "this identity may not read what the audit needs; use one bound to the read-only "
    "egress-auditor ClusterRole and Role (infra/rbac/auditor.yaml)"
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "access",
        help="who can reach which gateway, as NetworkPolicy enforces it (read-only)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="an ExternalService")
    p.add_argument(
        "--from",
        dest="source",
        metavar="NAMESPACE[/KIND/NAME]",
        help="a namespace, or one workload in it (kind as kubectl spells it: deploy, sts, ...)",
    )
    p.add_argument("--all", action="store_true", help="every workload and ExternalService")
    p.add_argument("--csv", type=Path, metavar="PATH", help="with --all: write the matrix as CSV")
    p.add_argument(
        "--svg", type=Path, metavar="PATH", help="with --all: write the matrix as an SVG heat map"
    )
    p.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="IP",
        help=f"also test direct egress to this address (always: {PUBLIC_PROBE} and ipOverrides)",
    )
    p.add_argument(
        "--fail-on",
        choices=("error", "warning", "info"),
        default=None,
        help="exit 3 when a finding has this severity or a worse one",
    )
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--json", action="store_true", help='print {"rows", "findings", "workloads"}')
    p.set_defaults(func=cmd_access)


def _usage_error(args: argparse.Namespace) -> str | None:
    chosen = [bool(args.name), bool(args.source), bool(args.all)]
    if sum(chosen) != 1:
        return "give exactly one of NAME, --from NAMESPACE[/KIND/NAME] or --all"
    if (args.csv or args.svg) and not args.all:
        return "--csv and --svg write the whole-cluster matrix: use them with --all"
    return None


def parse_source(text: str) -> tuple[str, str, str]:
    """``NAMESPACE`` or ``NAMESPACE/KIND/NAME`` -> (namespace, Kind, name); ValueError if not."""
    parts = text.split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], "", ""
    if len(parts) == 3 and all(parts):
        kind = KIND_ALIASES.get(parts[1].lower(), parts[1])
        return parts[0], kind, parts[2]
    raise ValueError(f"--from {text!r}: expected NAMESPACE or NAMESPACE/KIND/NAME")


def _probes(raw: list[str]) -> tuple[IPAddress, ...]:
    probes: list[IPAddress] = [PUBLIC_PROBE]
    for text in raw:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"--probe {text!r}: not an IP address") from None
        if ip not in probes:
            probes.append(ip)
    return tuple(probes)


def run_audit(args: argparse.Namespace, probes: tuple[IPAddress, ...]) -> Audit:
    settings = Settings.from_env(os.environ)
    kube = Kube(api_client_from_kubeconfig(args.kubeconfig, args.context))
    return audit(snapshot_from_kube(kube, settings), probes)


def cmd_access(args: argparse.Namespace) -> int:
    problem = _usage_error(args)
    source: tuple[str, str, str] | None = None
    probes: tuple[IPAddress, ...] = (PUBLIC_PROBE,)
    if problem is None:
        try:
            source = parse_source(args.source) if args.source else None
            probes = _probes(args.probe)
        except ValueError as exc:
            problem = str(exc)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_PERMANENT
    try:
        result = run_audit(args, probes)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PERMANENT
    except TransientError as exc:
        print(f"error: transient: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT
    except PermanentError as exc:
        hint = f"\n  {FORBIDDEN_HINT}" if exc.status in (401, 403) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return EXIT_PERMANENT
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PERMANENT

    if args.name:
        view = service_view(result, args.name)
        code = _show(view, args.json, show_service=False)
        if args.name not in result.external_services:
            print(f"error: no ExternalService {args.name!r}", file=sys.stderr)
            return EXIT_PERMANENT
    elif source is not None:
        namespace, kind, name = source
        view = workload_view(result, namespace, kind, name)
        if not view.workloads:
            what = f"{kind}/{name} in namespace {namespace}" if kind else f"namespace {namespace}"
            print(f"error: no pods of {what}", file=sys.stderr)
            return EXIT_PERMANENT
        code = _show(view, args.json, show_workloads=True)
    else:
        view = all_view(result)
        code = _show(view, args.json)
        m = matrix(result)
        for path, text in ((args.csv, matrix_csv(m)), (args.svg, matrix_svg(m))):
            if path is not None:
                path.write_text(text)
                print(
                    f"wrote {path} ({len(m.workloads)} workloads x "
                    f"{len(m.external_services)} ExternalServices)",
                    file=sys.stderr,
                )
    if code != EXIT_OK:
        return code
    return _findings_exit(view, args.fail_on)


def _show(view: View, as_json: bool, **kwargs: bool) -> int:
    if as_json:
        print(json.dumps(view.to_dict(), indent=2))
    else:
        sys.stdout.write(render_view(view, **kwargs))
    return EXIT_OK


def _findings_exit(view: View, fail_on: str | None) -> int:
    if fail_on is None:
        return EXIT_OK
    limit = SEVERITY_ORDER[Severity(fail_on)]
    worst = [f for f in view.findings if SEVERITY_ORDER[Severity(f.severity)] <= limit]
    return EXIT_FINDINGS if worst else EXIT_OK
