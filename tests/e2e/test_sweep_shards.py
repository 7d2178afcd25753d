"""A sweep in shards, end to end: Pub/Sub emulator → on_sweep (functions-framework, two worker
processes: two instances) → the real API server, with a shard size small enough that the few
ExternalServices of the test cluster fan out.

The scheduler's trigger is published as Cloud Scheduler publishes it; the coordinator publishes
the shard messages on the same topic and the emulator pushes them back to on_sweep. Nothing here
calls the reconciler: the test sets up drift, triggers, and polls the cluster and the function's
log lines (its report) against deadlines.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.kube import CONFIGMAP, Kube, api_client_from_kubeconfig
from core.notice import DEFAULT_SWEEP_TOPIC, parse_time
from core.shards import ShardMessage, shard_of
from egressctl.pipeline import SWEEP_FUNCTION, LocalPipeline
from functions.shards import LABEL_SWEEP, record_name
from tests.conftest import DevStack
from tests.e2e.helpers import fingerprint, log_entries, log_size
from tests.e2e.test_pipeline import converged, events_paused
from tests.integration.helpers import (
    GATEWAY_NS,
    apply_orphan,
    children,
    create_es,
    eventually,
    external_service,
    purge,
)

pytestmark = pytest.mark.cluster
SHARD_SIZE = 3
N_SERVICES = 8
DEADLINE_S = 90.0


@pytest.fixture(scope="module")
def admin(dev_stack: DevStack) -> Kube:
    return Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))


@pytest.fixture
def sharded(pipeline: LocalPipeline) -> Iterator[LocalPipeline]:
    """on_sweep with a tiny SWEEP_SHARD_SIZE, served by two worker processes of one request at
    a time each (two function instances); the package's on_sweep again afterwards."""
    pipeline.kill_function(SWEEP_FUNCTION)
    pipeline.start_function(
        SWEEP_FUNCTION, {"SWEEP_SHARD_SIZE": str(SHARD_SIZE), "WORKERS": "2", "THREADS": "1"}
    )
    try:
        yield pipeline
    finally:
        pipeline.kill_function(SWEEP_FUNCTION)
        pipeline.start_function(SWEEP_FUNCTION)


def _lines(pipeline: LocalPipeline, since: int) -> list[dict[str, Any]]:
    return log_entries(pipeline.log_path(SWEEP_FUNCTION), since)


def _of_sweep(lines: list[dict[str, Any]], sweep_id: str, outcome: str) -> list[dict[str, Any]]:
    return [e for e in lines if e.get("sweepId") == sweep_id and e.get("outcome") == outcome]


def test_sharded_sweep_reconciles_each_name_in_its_shard_and_reports_once(
    sharded: LocalPipeline, admin: Kube, unique: str, cleanup: Callable[..., None]
) -> None:
    names = [f"e2e-sh-{unique}-{i}" for i in range(N_SERVICES)]
    orphan = f"e2e-sh-{unique}-orphan"
    for name in names:
        cleanup(lambda name=name: purge(admin, name))
        create_es(admin, external_service(name))
    cleanup(lambda: admin.delete(CONFIGMAP, orphan, GATEWAY_NS))
    for name in names:
        eventually(converged(admin, name), DEADLINE_S, f"{name} to converge")
    since = log_size(sharded.log_path(SWEEP_FUNCTION))

    with events_paused(sharded):
        # Drift only a sweep finds (ConfigMaps are not watched), and an orphan to prune.
        for name in names:
            admin.delete(CONFIGMAP, name, GATEWAY_NS)
        apply_orphan(admin, orphan)
        sharded.trigger_sweep()

        def fanned_out() -> dict[str, Any] | None:
            found = [e for e in _lines(sharded, since) if e.get("outcome") == "fanned-out"]
            return found[0] if found else None

        fan = eventually(fanned_out, DEADLINE_S, "the coordinator to fan out")
        sweep_id, shards = fan["sweepId"], int(fan["shards"])
        assert shards >= 3, fan  # at least our 8 ExternalServices, 3 to a shard
        assert fan["published"] == list(range(shards))
        record_cleanup = lambda: admin.delete(CONFIGMAP, record_name(sweep_id), GATEWAY_NS)  # noqa: E731
        cleanup(record_cleanup)

        def merged() -> dict[str, Any] | None:
            found = _of_sweep(_lines(sharded, since), sweep_id, "swept")
            return found[0] if found else None

        report = eventually(merged, DEADLINE_S, "the merged report of the sharded sweep")
        for name in names:
            assert admin.get(CONFIGMAP, name, GATEWAY_NS) is not None, f"{name} not repaired"
        assert admin.get(CONFIGMAP, orphan, GATEWAY_NS) is None, "orphan not pruned"
        lines = _lines(sharded, since)

    # Every shard reported once, each on its own line, all before the one merged report.
    shard_lines = _of_sweep(lines, sweep_id, "swept-shard")
    assert sorted(e["shard"] for e in shard_lines) == [f"{k}/{shards}" for k in range(shards)]
    assert len(_of_sweep(lines, sweep_id, "swept")) == 1, "one report"
    assert all(e["time"] <= report["time"] for e in shard_lines), "report before a shard"
    assert report["shards"] == shards
    assert report["externalServices"] == sum(
        s["outcomes"].get(o, 0) for s in shard_lines for o in s["outcomes"]
    )
    assert report["externalServices"] == fan["externalServices"], (report, fan)
    # DNS is delivered by the completing shard only, after every shard.
    assert report["dns"] is not None and "rules" in report["dns"], report
    assert all("dns" not in e for e in shard_lines)

    # Each of our ExternalServices was repaired exactly once, by the shard its name hashes to.
    repaired = [
        e
        for e in lines
        if e.get("sweepId") == sweep_id
        and e.get("externalService") in names
        and any(ch["kind"] == "ConfigMap" for ch in e.get("changes") or [])
    ]
    assert Counter(e["externalService"] for e in repaired) == Counter(names), repaired
    for e in repaired:
        assert e["shard"] == f"{shard_of(e['externalService'], shards)}/{shards}", e
    # The orphan was pruned by the shard its gateway name hashes to.
    [orphan_shard] = [
        e for e in shard_lines if e["shard"] == f"{shard_of(orphan, shards)}/{shards}"
    ]
    assert orphan_shard["pruned"] >= 1, orphan_shard
    assert report["pruned"] >= 1 and report["driftCount"] >= N_SERVICES + 1, report

    # The progress record says the same: every shard, done by the shard that finished.
    record = admin.get(CONFIGMAP, record_name(sweep_id), GATEWAY_NS)
    assert record is not None and record["metadata"]["labels"][LABEL_SWEEP] == sweep_id
    assert {k for k in record["data"] if k.startswith("shard-")} == {
        f"shard-{k:02d}" for k in range(shards)
    }
    done = json.loads(record["data"]["done"])
    assert (
        done["by"] == report["finishedBy"] and done["externalServices"] == fan["externalServices"]
    )

    # A shard message delivered again, late (one that did not finish the sweep and the one that
    # did): acknowledged as a duplicate, nothing reconciled, counted or reported again.
    before = {name: fingerprint(children(admin, name)) for name in names}
    version = record["metadata"]["resourceVersion"]
    started = parse_time(json.loads(record["data"]["sweep"])["started"])
    since = log_size(sharded.log_path(SWEEP_FUNCTION))
    again = {report["finishedBy"], (report["finishedBy"] + 1) % shards}
    for shard in again:
        m = ShardMessage(sweep_id, shard, shards, started)
        sharded.publish(DEFAULT_SWEEP_TOPIC, m.encode(), **m.attributes())

    def duplicates() -> bool:
        return len(_of_sweep(_lines(sharded, since), sweep_id, "duplicate")) >= len(again)

    eventually(duplicates, DEADLINE_S, "the redelivered shard messages to be acknowledged")
    later = _lines(sharded, since)
    assert not _of_sweep(later, sweep_id, "swept"), "reported twice"
    assert not _of_sweep(later, sweep_id, "swept-shard"), "a shard counted twice"
    assert not [e for e in later if e.get("externalService") in names], "reconciled again"
    after = admin.get(CONFIGMAP, record_name(sweep_id), GATEWAY_NS)
    assert after is not None and after["metadata"]["resourceVersion"] == version
    assert {name: fingerprint(children(admin, name)) for name in names} == before
