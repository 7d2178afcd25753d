"""`egressctl reconcile | sweep | plan | status`: the reconciler run by hand against any cluster.

These run the same code as the Cloud Functions, against ``$KUBECONFIG`` (or ``--kubeconfig``),
so an operator can converge, inspect or preview a cluster without going through Pub/Sub.

Exit codes: 0 success (for ``plan``: nothing to change), 1 a transient failure (retry),
2 invalid input or a permanent refusal (also: another field manager keeps rewriting a gateway,
outcome ``contested``), 3 (``plan`` only) changes are pending.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from core.errors import PermanentError, TransientError
from core.kube import EXTERNAL_SERVICE, Kube, api_client_from_kubeconfig
from core.settings import Settings, SettingsError
from reconcile.app import build_reconciler
from reconcile.controller import Reconciler
from reconcile.results import Action, Change, Outcome, Result, SweepReport

EXIT_OK = 0
EXIT_TRANSIENT = 1
EXIT_PERMANENT = 2
EXIT_CHANGES = 3


def register(subparsers: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG)")
        p.add_argument("--context", default=None, help="kubeconfig context")
        p.add_argument("--json", action="store_true", help="print the report as JSON")

    def force_conflicts(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--force-conflicts",
            action="store_true",
            help="take fields back even from a field manager that keeps rewriting them "
            "(Conflict condition); stop that writer first",
        )

    p = subparsers.add_parser("reconcile", help="converge one ExternalService, or all with --all")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true", help="every ExternalService (a sweep)")
    p.add_argument("--dry-run", action="store_true", help="server-side dry run: write nothing")
    force_conflicts(p)
    common(p)
    p.set_defaults(func=cmd_reconcile)

    p = subparsers.add_parser("sweep", help="reconcile everything, prune orphans, report drift")
    p.add_argument("--dry-run", action="store_true", help="server-side dry run: write nothing")
    force_conflicts(p)
    common(p)
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser(
        "plan", help="show what a reconcile would change, field by field (writes nothing)"
    )
    p.add_argument("name", nargs="?")
    common(p)
    p.set_defaults(func=cmd_plan)

    p = subparsers.add_parser("status", help="a table of every ExternalService and its gateway")
    common(p)
    p.set_defaults(func=cmd_status)


def _reconciler(args: argparse.Namespace, dry_run: bool) -> Reconciler:
    settings = Settings.from_env(os.environ)
    kube = Kube(api_client_from_kubeconfig(args.kubeconfig, args.context), dry_run=dry_run)
    reconciler = build_reconciler(kube, settings)
    reconciler.force_conflicts = bool(getattr(args, "force_conflicts", False))
    return reconciler


def _run(args: argparse.Namespace, dry_run: bool, plan: bool) -> int:
    try:
        reconciler = _reconciler(args, dry_run)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PERMANENT
    try:
        if getattr(args, "all", False) or not getattr(args, "name", None):
            report = reconciler.sweep()
            _print_sweep(report, args.json, plan)
            if report.errors:
                return EXIT_TRANSIENT
            changes = bool(report.drift)
            invalid = any(
                r.outcome in (Outcome.INVALID, Outcome.CONFLICT, Outcome.CONTESTED)
                for r in report.results
            )
        else:
            result = reconciler.reconcile(args.name)
            _print_results([result], args.json, plan)
            if result.outcome == Outcome.NOT_FOUND:
                return EXIT_PERMANENT
            changes = bool(result.changes)
            invalid = result.outcome in (Outcome.INVALID, Outcome.CONFLICT, Outcome.CONTESTED)
    except TransientError as exc:
        print(f"error: transient: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT
    except PermanentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PERMANENT
    if invalid:
        return EXIT_PERMANENT
    if plan and changes:
        return EXIT_CHANGES
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    if args.all and args.name:
        print("error: give a NAME or --all, not both", file=sys.stderr)
        return EXIT_PERMANENT
    if not args.all and not args.name:
        print("error: give a NAME or --all", file=sys.stderr)
        return EXIT_PERMANENT
    return _run(args, dry_run=args.dry_run, plan=False)


def cmd_sweep(args: argparse.Namespace) -> int:
    args.all = True
    return _run(args, dry_run=args.dry_run, plan=False)


def cmd_plan(args: argparse.Namespace) -> int:
    args.all = not args.name
    return _run(args, dry_run=True, plan=True)


_SYMBOL = {Action.CREATE: "+", Action.UPDATE: "~", Action.DELETE: "-"}


def _format_change(change: Change) -> list[str]:
    where = f"{change.namespace}/{change.name}" if change.namespace else change.name
    lines = [f"  {_SYMBOL.get(change.action, '?')} {change.kind} {where}"]
    for f in change.fields:
        path = f.path or "(object)"
        lines.append(f"      {path}: {json.dumps(f.live)} -> {json.dumps(f.desired)}")
    return lines


def _print_results(results: list[Result], as_json: bool, plan: bool) -> None:
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    for r in results:
        verb = "would change" if plan and r.changes else r.outcome
        head = f"{r.name}: {verb}"
        if r.message:
            head += f" ({r.message})"
        print(head)
        for change in r.changes:
            print("\n".join(_format_change(change)))
        for fight in r.fights:
            print(f"  ! {fight.describe()}")
            print("      not forced back; stop that writer, then reconcile with --force-conflicts")


def _print_sweep(report: SweepReport, as_json: bool, plan: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    _print_results(
        [r for r in report.results if r.changes or r.outcome != Outcome.IN_SYNC], False, plan
    )
    if report.pruned:
        print("orphans:")
        for change in report.pruned:
            print("\n".join(_format_change(change)))
    counts = report.to_dict()["outcomes"]
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "none"
    fights = f"; {len(report.fights)} field manager fight(s)" if report.fights else ""
    print(
        f"{len(report.results)} ExternalService(s): {summary}; {len(report.drift)} change(s)"
        + fights
    )
    for err in report.errors:
        print(f"error: {err['name']}: {err['error']}", file=sys.stderr)


def _conditions(status: dict[str, Any]) -> str:
    parts = []
    for cond in status.get("conditions") or []:
        mark = {"True": "", "False": "!", "Unknown": "?"}.get(cond.get("status"), "?")
        parts.append(f"{mark}{cond.get('type')}")
    return ",".join(parts) or "-"


def cmd_status(args: argparse.Namespace) -> int:
    try:
        kube = Kube(api_client_from_kubeconfig(args.kubeconfig, args.context))
        items, _ = kube.list_all(EXTERNAL_SERVICE)
    except (TransientError, PermanentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT if isinstance(exc, TransientError) else EXIT_PERMANENT
    rows = []
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        spec = item.get("spec") or {}
        status = item.get("status") or {}
        ports = ",".join(
            f"{p.get('port')}/{p.get('protocol', 'TCP')}"
            for p in spec.get("ports") or []
            if isinstance(p, dict)
        )
        rows.append(
            {
                "name": item["metadata"]["name"],
                "dnsName": spec.get("dnsName", ""),
                "ports": ports,
                "clusterIP": status.get("clusterIP", "-"),
                "ready": str(status.get("readyReplicas", 0)),
                "hijack": status.get("hijackState", "-"),
                "conditions": _conditions(status),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    headers = {
        "name": "NAME",
        "dnsName": "DNS NAME",
        "ports": "PORTS",
        "clusterIP": "CLUSTER-IP",
        "ready": "READY",
        "hijack": "HIJACK",
        "conditions": "CONDITIONS",
    }
    widths = {
        k: max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in headers.items()
    }
    print("  ".join(h.ljust(widths[k]) for k, h in headers.items()).rstrip())
    for r in rows:
        print("  ".join(r[k].ljust(widths[k]) for k in headers).rstrip())
    return EXIT_OK
