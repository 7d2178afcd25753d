"""Project ConfigMaps into directories the way kubelet does, for the dev CoreDNS.

Why: in a cluster, CoreDNS reads its Corefile (and anything it imports) from ConfigMaps
mounted by kubelet, which swaps a ``..data`` symlink atomically on every change. The dev
stack has no kubelet, so this small loop watches the listed ConfigMaps and writes them
the same way; the path from "reconciler writes a ConfigMap" to "CoreDNS answers
differently" is then the same as in a real cluster (only faster than kubelet's sync).

Run as ``python -m egressctl.devstack.configsync --kubeconfig K --config C`` where C is a
JSON list of ``{"namespace": ..., "name": ..., "dir": ...}``. A missing ConfigMap
projects as an empty directory (an optional volume).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("configsync")

DATA_LINK = "..data"


@dataclass(frozen=True)
class Projection:
    namespace: str
    name: str
    dir: Path


def load_config(path: Path) -> list[Projection]:
    raw = json.loads(path.read_text())
    return [Projection(str(p["namespace"]), str(p["name"]), Path(p["dir"])) for p in raw]


def current_files(target: Path) -> dict[str, str] | None:
    """What is projected now, or None if nothing was ever projected."""
    data = target / DATA_LINK
    if not data.is_dir():
        return None
    return {p.name: p.read_text() for p in data.iterdir() if p.is_file()}


def project(target: Path, files: Mapping[str, str]) -> bool:
    """Atomically make ``target`` hold exactly ``files`` (kubelet's AtomicWriter scheme).

    Returns False when the content was already there (nothing written).
    """
    if current_files(target) == dict(files):
        return False
    target.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    new_dir = target / stamp
    new_dir.mkdir()
    for key, value in files.items():
        if "/" in key or key.startswith(".."):
            log.warning("skipping unsafe key %r in %s", key, target)
            continue
        (new_dir / key).write_text(value)
    old = os.readlink(target / DATA_LINK) if (target / DATA_LINK).is_symlink() else None
    tmp_link = target / "..data_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(stamp, tmp_link)
    os.replace(tmp_link, target / DATA_LINK)  # the atomic switch
    # Per-key symlinks through ..data, as kubelet creates them.
    for key in files:
        link = target / key
        if not link.is_symlink():
            if link.exists():
                link.unlink()
            os.symlink(f"{DATA_LINK}/{key}", link)
    for entry in target.iterdir():
        if entry.name.startswith(".."):
            continue
        if entry.is_symlink() and entry.name not in files:
            entry.unlink()
    if old and old != stamp:
        shutil.rmtree(target / old, ignore_errors=True)
    return True


def _watch_namespace(
    kubeconfig: str, namespace: str, projections: Sequence[Projection], stop: threading.Event
) -> None:
    from kubernetes import client, config, watch

    api_client = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api_client)
    wanted = {p.name: p for p in projections}

    def apply(name: str, data: Mapping[str, str] | None) -> None:
        proj = wanted.get(name)
        if proj is None:
            return
        if project(proj.dir, data or {}):
            log.info(
                "projected %s/%s into %s (%d keys)", namespace, name, proj.dir, len(data or {})
            )

    while not stop.is_set():
        try:
            listing = core.list_namespaced_config_map(namespace)
            seen: set[str] = set()
            for cm in listing.items:
                seen.add(cm.metadata.name)
                apply(cm.metadata.name, cm.data)
            for name in wanted:
                if name not in seen:
                    apply(name, None)
            rv = listing.metadata.resource_version
            w = watch.Watch()
            for event in w.stream(
                core.list_namespaced_config_map,
                namespace,
                resource_version=rv,
                timeout_seconds=300,
                allow_watch_bookmarks=True,
            ):
                kind: str = event["type"]
                obj: Any = event["object"]
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    apply(obj.metadata.name, None)
                elif kind in ("ADDED", "MODIFIED"):
                    apply(obj.metadata.name, obj.data)
                if stop.is_set():
                    break
        except Exception as exc:  # keep projecting through API blips; re-list after
            log.warning("watch of configmaps in %s failed: %s; re-listing", namespace, exc)
            stop.wait(1.0)


def run(kubeconfig: str, projections: Sequence[Projection]) -> None:
    by_ns: dict[str, list[Projection]] = {}
    for p in projections:
        by_ns.setdefault(p.namespace, []).append(p)
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_watch_namespace, args=(kubeconfig, ns, ps, stop), daemon=True, name=ns
        )
        for ns, ps in by_ns.items()
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run(args.kubeconfig, load_config(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
