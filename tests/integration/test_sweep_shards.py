"""A sweep in shards against the real API server, as the reconciler's own RBAC identity.

The progress record (``functions.shards``) lives in the gateway namespace because the reconciler
may already create, get, list, patch and delete ConfigMaps there: this records every request of
the record's whole life (start, a conflict, shard reports, the end, expiry) and of the count,
and checks that each overlay's grants cover them, so sharding added no grant (test_infra.py
holds the reconciler's grants to exactly what its scenarios need). It also checks the API
server's side of the race safety the protocol relies on: a merge patch carrying a stale
``metadata.resourceVersion`` is refused with 409, and nothing is written.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable

import pytest

from core.kube import CONFIGMAP, EXTERNAL_SERVICE, Kube, api_client_from_kubeconfig
from functions.shards import (
    LABEL_SWEEP,
    ProgressStore,
    Recorded,
    count_external_services,
    record_name,
)
from tests.conftest import DevStack
from tests.integration.helpers import GATEWAY_NS, create_es, eventually, external_service, purge
from tests.integration.rbac_audit import RecordingApiClient, compare, grants, kustomize, needed_by
from tests.integration.test_infra import FIXED_NAMES, INFRA, PLACEHOLDERS, RECONCILER

pytestmark = pytest.mark.cluster


def test_the_progress_record_needs_no_grant_beyond_the_reconcilers(
    dev_stack: DevStack, admin: Kube, unique: str, cleanup: Callable[..., None]
) -> None:
    api = RecordingApiClient(
        api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler"))
    )
    kube = Kube(api)
    names = [f"rbac-sh-{unique}-{i}" for i in range(3)]
    for name in names:
        cleanup(lambda name=name: purge(admin, name))
        create_es(admin, external_service(name))
    # remainingItemCount (or the fallback): the API server's count. Polled, because other
    # tests may create or delete ExternalServices between the two reads.
    eventually(
        lambda: count_external_services(kube) == len(admin.list_all(EXTERNAL_SERVICE)[0]) >= 3,
        30,
        "the count to agree with a full LIST",
    )

    now = [dt.datetime.now(dt.UTC)]
    store = ProgressStore(kube, GATEWAY_NS, clock=lambda: now[0], sleep=lambda _s: None)
    sweep = uuid.uuid4().hex[:16]
    cleanup(lambda: admin.delete(CONFIGMAP, record_name(sweep), GATEWAY_NS))
    record, created = store.start(sweep, 2, "trigger")
    assert created and record.missing == [0, 1]
    assert store.start(sweep, 2, "trigger")[1] is False  # a redelivered trigger
    live = admin.get(CONFIGMAP, record_name(sweep), GATEWAY_NS)
    assert live is not None and live["metadata"]["labels"] == {LABEL_SWEEP: sweep}

    # Another writer in between: the stale write is refused (409) and leaves no trace.
    admin.merge_patch(CONFIGMAP, record_name(sweep), {"data": {"other": "x"}}, GATEWAY_NS)
    assert store._write(record, {"shard-00": "{}"}) is False
    after = admin.get(CONFIGMAP, record_name(sweep), GATEWAY_NS)
    assert after is not None and "shard-00" not in after["data"]

    assert store.record(sweep, 0, {"token": "a"})[0] is Recorded.RECORDED
    assert store.record(sweep, 0, {"token": "b"})[0] is Recorded.DUPLICATE
    state, final = store.record(sweep, 1, {"token": "c"})
    assert state is Recorded.COMPLETES and final is not None
    assert store.take_over(final, 1, "d")
    store.mark_done(final, {"by": 1})
    done = store.load(sweep)
    assert done is not None and done.done is not None and sorted(done.results) == [0, 1]

    now[0] += dt.timedelta(hours=1)
    expired = [r for r in store.others(600)[0] if r.sweep == sweep]
    assert len(expired) == 1 and store.remove(expired[0])
    assert admin.get(CONFIGMAP, record_name(sweep), GATEWAY_NS) is None

    needed = needed_by(api.requests)
    assert {(a.verb, a.resource, a.namespace) for a in needed if a.resource == "configmaps"} == {
        (verb, "configmaps", GATEWAY_NS) for verb in ("create", "get", "patch", "list", "delete")
    }, "the record is written by PATCH under a resourceVersion, never by update (PUT)"
    for overlay, subject in RECONCILER.items():
        objects = kustomize(INFRA / "overlays" / overlay, PLACEHOLDERS[overlay])
        missing = [
            p
            for p in compare(needed, grants(objects, subject), FIXED_NAMES)
            if p.startswith("missing")
        ]
        assert not missing, f"overlay {overlay}: {missing}"
