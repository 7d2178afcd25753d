"""Event → converged latency through the whole pipeline, over 100 changes.

A change is a write to an ExternalService through the API server; it is converged when the
ExternalService's status.observedGeneration reaches the new generation *and* the gateway
Service shows the change (the port list). Nothing but the exporter → Pub/Sub → function path
reconciles (no sweep, no manual call). Changes are made one at a time, so the figure is the
pipeline's latency, not its throughput.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench._common import summary
from bench.stack import bench_stack

N_SERVICES = 10
UPDATES_PER_SERVICE = 10


def main() -> None:
    from core import constants as c
    from core.kube import EXTERNAL_SERVICE, SERVICE, Kube, api_client_from_kubeconfig
    from egressctl.pipeline import LocalPipeline, PipelineConfig

    with bench_stack() as env:
        pipeline = LocalPipeline(
            PipelineConfig(
                dev_env=env,
                state_dir=Path(env["EGRESS_DEV_DIR"]),
                sweep_interval_s=None,
                say=lambda msg: None,
            )
        )
        pipeline.start()
        admin = Kube(api_client_from_kubeconfig(env["KUBECONFIG"]))
        names = [f"bench-lat-{i}" for i in range(N_SERVICES)]

        def converged(name: str, generation: int, ports: int) -> bool:
            es = admin.get(EXTERNAL_SERVICE, name) or {}
            if (es.get("status") or {}).get("observedGeneration") != generation:
                return False
            svc = admin.get(SERVICE, name, "egress-operator-system") or {}
            return len((svc.get("spec") or {}).get("ports") or []) == ports

        def wait(name: str, generation: int, ports: int, t0: float) -> float:
            while not converged(name, generation, ports):
                if time.monotonic() - t0 > 60:
                    raise SystemExit(f"{name} did not converge within 60s")
                time.sleep(0.01)
            return (time.monotonic() - t0) * 1000

        creates: list[float] = []
        updates: list[float] = []
        try:
            for name in names:
                body = {
                    "apiVersion": c.API_VERSION,
                    "kind": c.KIND,
                    "metadata": {"name": name},
                    "spec": {"dnsName": f"{name}.example.com", "ports": [{"port": 443}]},
                }
                t0 = time.monotonic()
                created = admin.request("POST", EXTERNAL_SERVICE.path(), body=body)
                creates.append(wait(name, created["metadata"]["generation"], 1, t0))
            for round_ in range(UPDATES_PER_SERVICE):
                for name in names:
                    ports = [{"port": 443}] + [{"port": 8000 + round_}] * (round_ % 2)
                    t0 = time.monotonic()
                    updated = admin.merge_patch(EXTERNAL_SERVICE, name, {"spec": {"ports": ports}})
                    updates.append(wait(name, updated["metadata"]["generation"], len(ports), t0))
        finally:
            for name in names:
                admin.merge_patch(EXTERNAL_SERVICE, name, {"metadata": {"finalizers": None}})
                admin.delete(EXTERNAL_SERVICE, name)
            pipeline.stop()
        print(f"create -> converged: {summary(creates)}")
        print(f"update -> converged: {summary(updates)}")
        print(f"all {len(creates) + len(updates)} changes: {summary(creates + updates)}")


if __name__ == "__main__":
    main()
