"""Helpers of the end-to-end tests: the pipeline's JSON logs, a holding API proxy, kubeconfigs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from tests.integration.faultproxy import Fault, FaultProxy


def log_size(path: Path) -> int:
    """Where a log ends now: pass it as ``since`` to read only what a test caused."""
    return path.stat().st_size if path.exists() else 0


def log_entries(path: Path, since: int = 0) -> list[dict[str, Any]]:
    """Every JSON line of a pipeline log from byte ``since`` (non-JSON lines are skipped).

    Logs outlive pipelines and the emulator numbers messages from 1 again after a restart, so
    tests read only what was written after they started.
    """
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with path.open("rb") as fh:
        fh.seek(since)
        text = fh.read().decode(errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


class HoldProxy:
    """Forwards to the API server as the kubeconfig's identity, but *holds* requests matching
    ``(method, path fragment)`` until released, and then drops them unanswered: a request that
    never completed, as when its client dies mid-reconcile."""

    def __init__(self, kubeconfig: str, method: str, fragment: str) -> None:
        self.held = threading.Event()
        self.release = threading.Event()
        self.proxy = FaultProxy.from_kubeconfig(kubeconfig)
        self.proxy.inject(
            Fault(method, fragment, None, times=10**6, held=self.held, release=self.release)
        )

    def start(self) -> None:
        self.proxy.start()

    def write_kubeconfig(self, path: Path) -> str:
        return self.proxy.write_kubeconfig(path)

    def stop(self) -> None:
        self.proxy.stop()


def fingerprint(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What changes only when someone writes an object's spec: its generation where it has
    one (controllers keep updating Deployment and HPA status), else its resourceVersion."""
    out = {}
    for kind, obj in objects.items():
        meta = obj["metadata"]
        out[kind] = f"g{meta['generation']}" if "generation" in meta else meta["resourceVersion"]
    return out
