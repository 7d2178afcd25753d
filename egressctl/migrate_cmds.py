"""`egressctl migrate | uninstall`: from Monzo's original egress-operator to this product, and back.

Both print a plan and write nothing unless given ``--apply``; both refuse to act while the
other side's control loop runs. The logic lives in :mod:`reconcile.migration`; see
docs/operations.md, "Migrating from the original operator" and "Rolling back".

Exit codes: 0 done (plan: nothing blocks ``--apply``), 1 a transient failure (retry),
2 refused (the plan says why and what to do) or a permanent failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from core.errors import PermanentError, TransientError
from core.settings import Settings, SettingsError
from reconcile import migration as m

EXIT_OK = 0
EXIT_TRANSIENT = 1
EXIT_REFUSED = 2
DEFAULT_CRD = Path(__file__).resolve().parents[1] / "infra" / "crd" / "externalservices.yaml"


def register(subparsers: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--apply", action="store_true", help="act (default: print the plan only)")
        p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG)")
        p.add_argument("--context", default=None, help="kubeconfig context")
        p.add_argument("--json", action="store_true", help="print the plan or report as JSON")

    p = subparsers.add_parser(
        "migrate",
        help="take over from the original egress-operator: CRD, gateways, DNS steps, settings",
        description="Plan (default) or --apply the switch from the original operator: refuses "
        "while it runs; replaces its CRD in place (stored objects untouched); adopts its "
        "gateway objects (same UIDs, one rolling restart each); prints the CoreDNS steps and "
        "the settings mapping. Run as a cluster admin, with the reconciler's settings in the "
        "environment (ENVOY_IMAGE, ...), as for `egressctl sweep`.",
    )
    p.add_argument("--crd", default=str(DEFAULT_CRD), help="our CRD manifest")
    p.add_argument(
        "--original-namespace", default=m.ORIGINAL_NAMESPACE, help="where the original runs"
    )
    p.add_argument(
        "--original-deployment", default=m.ORIGINAL_DEPLOYMENT, help="its manager Deployment"
    )
    p.add_argument(
        "--original-lock",
        action="append",
        default=None,
        help=f"name of its leader-election lock (repeatable; default {m.ORIGINAL_LOCK_NAMES[0]}"
        ", and any lock held by one of its pods)",
    )
    p.add_argument(
        "--original-manager",
        action="append",
        default=None,
        help=f"its field manager on gateway objects (repeatable; default {m.ORIGINAL_MANAGERS[0]})",
    )
    p.add_argument(
        "--crd-field-manager",
        default=m.CRD_FIELD_MANAGER,
        help="field manager that owns the CRD afterwards (the one your deploy applies with)",
    )
    common(p)
    p.set_defaults(func=cmd_migrate)

    p = subparsers.add_parser(
        "uninstall",
        help="release our finalizers and annotations so the original (or nothing) takes over",
        description="Plan (default) or --apply: with our control loop stopped, remove this "
        "product's finalizer and annotations from every ExternalService (deleted ones then go "
        "at once); gateways, CRD and status stay. --clear-dns also empties our DNS rules.",
    )
    p.add_argument(
        "--clear-dns", action="store_true", help="also remove every rule from our DNS ConfigMap"
    )
    p.add_argument(
        "--exporter",
        default=m.EXPORTER_DEPLOYMENT,
        help="our exporter Deployment in the gateway namespace (refused while it runs)",
    )
    common(p)
    p.set_defaults(func=cmd_uninstall)


def _kube(args: argparse.Namespace) -> Any:
    from core.kube import Kube, api_client_from_kubeconfig

    return Kube(api_client_from_kubeconfig(args.kubeconfig, args.context))


def _load_crd(path: str) -> dict[str, Any]:
    import yaml

    if not Path(path).is_file():
        raise ValueError(
            f"{path}: no such file; run from a clone of this repository or pass --crd with "
            "this release's infra/crd/externalservices.yaml"
        )
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise ValueError(f"{path}: expected one CustomResourceDefinition, found {len(crds)}")
    return dict(crds[0])


def _emit(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))


def _run(args: argparse.Namespace, body: Any) -> int:
    try:
        return int(body())
    except m.MigrationRefused as exc:
        for reason in exc.reasons:
            print(f"refused: {reason}", file=sys.stderr)
        return EXIT_REFUSED
    except (SettingsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except TransientError as exc:
        print(f"error: transient: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT
    except PermanentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def cmd_migrate(args: argparse.Namespace) -> int:
    def body() -> int:
        settings = Settings.from_env(os.environ)
        manifest = _load_crd(args.crd)
        kube = _kube(args)
        where: dict[str, Any] = {
            "namespace": args.original_namespace,
            "deployment": args.original_deployment,
            "lock_names": tuple(args.original_lock or m.ORIGINAL_LOCK_NAMES),
            "managers": tuple(args.original_manager or m.ORIGINAL_MANAGERS),
        }
        plan = m.plan_migration(kube, settings, manifest, **where)
        if not args.apply:
            head = ["egressctl migrate: the plan (nothing written; --apply to act)", ""]
            tail = (
                ["", "BLOCKED:", *(f"  - {b}" for b in plan.blockers)]
                if plan.blockers
                else ["", "nothing blocks: run again with --apply"]
            )
            _emit(args, plan.to_dict(), head + plan.lines() + tail)
            return EXIT_REFUSED if plan.blockers else EXIT_OK
        if plan.blockers:
            raise m.MigrationRefused(plan.blockers)
        from reconcile.app import build_reconciler

        reconciler = build_reconciler(kube, settings)
        report = m.apply_migration(
            kube,
            settings,
            manifest,
            reconciler.sweep,
            crd_field_manager=args.crd_field_manager,
            **where,
        )
        lines = ["egressctl migrate --apply: done", "", *report.lines(), ""]
        lines += ["next, cluster DNS (see the plan's step 5, `egressctl migrate` again):"]
        lines += [
            f"  {'[x]' if done else '[ ]'} {step}"
            for done, step in m.inspect_coredns(kube, settings).steps(settings)
        ]
        _emit(args, report.to_dict(), lines)
        sweep = report.sweep
        return EXIT_TRANSIENT if sweep.get("errors") else EXIT_OK

    return _run(args, body)


def cmd_uninstall(args: argparse.Namespace) -> int:
    def body() -> int:
        settings = Settings.from_env(os.environ)
        kube = _kube(args)
        plan = m.plan_uninstall(kube, settings, args.exporter)
        if not args.apply:
            head = ["egressctl uninstall: the plan (nothing written; --apply to act)", ""]
            tail = (
                ["", "BLOCKED:", *(f"  - {b}" for b in plan.blockers)]
                if plan.blockers
                else ["", "nothing blocks: run again with --apply"]
            )
            _emit(args, plan.to_dict(), head + plan.lines(args.clear_dns) + tail)
            return EXIT_REFUSED if plan.blockers else EXIT_OK
        done = m.apply_uninstall(kube, settings, clear_dns=args.clear_dns, exporter=args.exporter)
        lines = [
            "egressctl uninstall --apply: done",
            f"released: {', '.join(done['released']) or 'nothing'}",
            f"deleted at once (were Terminating): {', '.join(done['deletedOnRelease']) or 'none'}",
            f"DNS rules removed: {done['dnsRulesCleared']}",
        ]
        _emit(args, done, lines)
        return EXIT_OK

    return _run(args, body)
