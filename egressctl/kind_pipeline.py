"""The event pipeline on your machine against a real cluster (kind, or any other), for
``infra/kind/kind.sh``.

Why a module and not `egressctl run`: ``run`` drives the local control plane, which has no nodes.
Against kind the cluster is real (gateway pods run, CoreDNS is kind's own), so only the
pipeline is local: the same ``LocalPipeline`` the end-to-end tests use (functions-framework
serving each entry point of ``main.py``, the exporter, push subscriptions on the Pub/Sub
emulator with the dead-letter topic, a scheduled sweep), fed with kubeconfigs of the two RBAC
identities instead of the dev stack's. Runs until interrupted.

    python -m egressctl.kind_pipeline --state-dir DIR --kubeconfig ADMIN \\
        --reconciler-kubeconfig R --exporter-kubeconfig E --pubsub-host HOST:PORT
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.settings import DEFAULT_DELETE_GRACE_S
from egressctl.pipeline import FUNCTIONS, LocalPipeline, PipelineConfig

DEFAULT_PROJECT = "egress-kind"
# A real cluster gets the product's DEFAULT_DELETE_GRACE_S (DNS moves in seconds with the
# CoreDNS pod nudge and `reload 2s`, which kind.sh sets; the rest covers cached answers).


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m egressctl.kind_pipeline", description=__doc__)
    p.add_argument("--state-dir", type=Path, required=True, help="logs and pipeline.json")
    p.add_argument("--kubeconfig", required=True, help="admin kubeconfig (for status only)")
    p.add_argument("--reconciler-kubeconfig", required=True)
    p.add_argument("--exporter-kubeconfig", required=True)
    p.add_argument("--pubsub-host", required=True, help="the Pub/Sub emulator, HOST:PORT")
    p.add_argument("--project", default=DEFAULT_PROJECT)
    p.add_argument("--sweep-interval", type=float, default=60.0, help="seconds (0: none)")
    p.add_argument("--delete-grace", type=int, default=DEFAULT_DELETE_GRACE_S)
    p.add_argument(
        "--manage-coredns-import",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the reconciler add the import line to kind's Corefile (default on)",
    )
    return p.parse_args(list(argv))


def config_from(args: argparse.Namespace) -> PipelineConfig:
    env = {
        "KUBECONFIG": args.kubeconfig,
        "KUBECONFIG_RECONCILER": args.reconciler_kubeconfig,
        "KUBECONFIG_EXPORTER": args.exporter_kubeconfig,
        "PUBSUB_EMULATOR_HOST": args.pubsub_host,
        "PUBSUB_PROJECT_ID": args.project,
    }
    args.state_dir.mkdir(parents=True, exist_ok=True)
    return PipelineConfig(
        dev_env=env,
        state_dir=args.state_dir,
        delete_grace_s=args.delete_grace,
        sweep_interval_s=args.sweep_interval or None,
        extra_env={
            "DELETE_GRACE_SECONDS": str(args.delete_grace),
            "MANAGE_COREDNS_IMPORT": "true" if args.manage_coredns_import else "false",
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pipeline = LocalPipeline(config_from(args))
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        pipeline.start()
        for name in FUNCTIONS:
            print(f"[kind] {name}: {pipeline.url(name)}", flush=True)
        print(
            f"[kind] logs in {args.state_dir / 'logs'}; repair with "
            f"`egressctl repair --url {pipeline.url('repair')}`; Ctrl-C stops",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        pipeline.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
